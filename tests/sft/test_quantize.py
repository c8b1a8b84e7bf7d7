"""python -m sft.quantize on the toy student: torchao int8/int4 and compressed-tensors w8a8 checkpoints really
store int8/int4 weights, are smaller, load with transformers and generate; the check on the curated set
measures the rounding; what this CPU cannot run is refused before anything is written; a quantized student
goes through the normal evals path."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from evals.main import main as evals_main
from sft.quantize import cpu_has, import_torchao
from sft.quantize import main as quantize

import_torchao()


def run(toyworld, out, scheme, backend="torchao", *flags):
    return quantize(["--model", str(toyworld.student), "--output_dir", str(out), "--scheme", scheme,
                     "--backend", backend, "--dataset", str(toyworld.gold), "--calibration_samples", "4", *flags])


@pytest.fixture(scope="module")
def quantized(toyworld, tmp_path_factory):
    """The toy student quantized three ways (seconds each), shared by the tests below."""
    root = tmp_path_factory.mktemp("quantized")
    made = {}
    for scheme, backend in (("int8", "torchao"), ("int4", "torchao"), ("w8a8", "compressed-tensors")):
        out = root / f"{scheme}-{backend}"
        assert run(toyworld, out, scheme, backend) == 0
        made[scheme, backend] = out
    return made


def summary(path):
    return json.loads((path / "quantize.json").read_text())


def stored(path, suffix):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.endswith(suffix)}


def generates(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Ann has 3 apples."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 6
    return model


def test_torchao_int8_stores_int8_is_smaller_and_loads(toyworld, quantized):
    out = quantized["int8", "torchao"]
    s = summary(out)
    qdata = stored(out, "_weight_qdata")
    assert len(qdata) == 14 and all(t.dtype == torch.int8 for t in qdata.values())  # 7 Linear x 2 layers
    assert s["stored_dtypes"] == {"I8": 14} and s["library"] == "torchao 0.18.0"
    assert s["weights_bytes_after"] < 0.5 * s["weights_bytes_before"]  # fp32 Linear weights -> int8
    model = generates(out)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8
    assert type(model.lm_head.weight) in (torch.Tensor, torch.nn.Parameter)  # the output head stays float
    check = s["check"]
    assert check["conversations"] == 4 and check["tokens"] > 100
    assert 0 <= check["mean_kl"] < 0.01 and check["top1_agreement"] > 0.95


def test_torchao_int4_holds_4_bit_values_and_rounds_coarser_than_int8(toyworld, quantized):
    out = quantized["int4", "torchao"]
    qdata = stored(out, "_weight_qdata")
    assert all(t.dtype == torch.int8 and t.min() >= -8 and t.max() <= 7 for t in qdata.values())
    assert any(t.min() == -8 or t.max() == 7 for t in qdata.values())  # the whole 4-bit range is used
    model = generates(out)
    assert model.model.layers[1].self_attn.q_proj.weight.target_dtype == torch.int4
    assert summary(out)["weights_bytes_after"] < summary(out)["weights_bytes_before"]
    int4, int8 = summary(out)["check"], summary(quantized["int8", "torchao"])["check"]
    assert int4["mean_kl"] > int8["mean_kl"]


def test_compressed_tensors_w8a8_is_a_checkpoint_vllm_reads(toyworld, quantized):
    out = quantized["w8a8", "compressed-tensors"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    group = config["config_groups"]["group_0"]
    assert group["weights"]["num_bits"] == 8 and group["input_activations"]["dynamic"] is True
    assert config["ignore"] == ["lm_head"]
    weights = {k: v for k, v in stored(out, ".weight").items() if "proj" in k}
    assert len(weights) == 14 and all(v.dtype == torch.int8 for v in weights.values())
    assert summary(out)["weights_bytes_after"] < 0.5 * summary(out)["weights_bytes_before"]
    generates(out)  # transformers decompresses it


def test_rerun_is_idempotent_and_another_scheme_is_refused(toyworld, quantized, caplog):
    out = quantized["int8", "torchao"]
    written = (out / "model.safetensors").stat().st_mtime_ns
    assert run(toyworld, out, "int8") == 0 and (out / "model.safetensors").stat().st_mtime_ns == written
    assert run(toyworld, out, "int4") == 2 and "holds torchao/int8" in caplog.text


def test_what_this_machine_cannot_run_is_refused_before_writing(toyworld, tmp_path, caplog):
    cases = [("fp8", "torchao", "fp8 needs a GPU with compute capability >= 8.9"),
             ("int8", "compressed-tensors", "no 8-bit weight-only kernel")]
    if not cpu_has("avx512f"):
        cases.append(("int4", "compressed-tensors", "has no 4-bit weight kernel (cpu_gemm_wna16"))
    if torch.cuda.is_available():
        pytest.skip("the refusals are those of a CPU machine")
    for scheme, backend, message in cases:
        caplog.clear()
        assert run(toyworld, tmp_path / scheme, scheme, backend) == 2, scheme
        assert message in caplog.text and not (tmp_path / scheme).exists()
    assert quantize(["--model", str(tmp_path), "--output_dir", str(tmp_path / "x")]) == 2
    assert "is not a model directory (no config.json)" in caplog.text


def test_a_quantized_student_is_graded_through_the_normal_evals_path(toyworld, quantized, tmp_path):
    out = tmp_path / "evals"
    flags = ["--engine", "hf", "--benchmarks", "toy", "--custom_benchmarks", json.dumps({"toy": str(toyworld.test)}),
             "--limit", "3", "--n", "1", "--max_tokens", "16", "--output_dir", str(out), "--grader_workers", "1",
             "--efficiency_prompts", "1", "--efficiency_tokens", "4", "--batch_size", "4"]
    assert evals_main([*flags, "--model", str(quantized["int8", "torchao"]), "--model_name", "student-int8"]) == 0
    toy = json.loads((out / "scores.json").read_text())["student-int8"]["toy"]
    assert toy["n"] == 1 and toy["num_problems"] == 3 and toy["errors"] == 0 and toy["mean_tokens"] > 0
    e = toy["efficiency"]
    assert e["weights_bytes"] < 0.6 * 4 * e["parameters"]  # smaller in memory than float32 weights
    assert e["per_token_ms"]["p50"] > 0 and e["throughput_tokens_per_s"] > 0
    assert "student-int8" in (out / "report.md").read_text()
