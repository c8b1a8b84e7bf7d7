"""python -m sft.prune: importance picks what contributes nothing (the pruned model computes the same logits), the
checkpoint loads with transformers (and, slow, with vLLM, whose logprobs match) and its parameter count is the
report's; the toy teacher pruned to the student base's size; settings it cannot honour are refused by name."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sft.prune import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def planted(toyworld, tmp_path_factory):
    """A 4-layer Llama whose layer 2 is the identity (o_proj and down_proj zero), whose MLP channels 0-15 never fire
    (gate and up rows zero) and whose second key/value group outputs nothing (v_proj rows zero), in every layer."""
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gate_proj.weight[:16] = 0
            layer.mlp.up_proj.weight[:16] = 0
            layer.self_attn.v_proj.weight[32:] = 0
            if i == 2:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    path = tmp_path_factory.mktemp("planted")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prune(model: Path, out: Path, *flags: str, calibration: Path) -> int:
    return main(["--model", str(model), "--output_dir", str(out), "--calibration", str(calibration),
                 "--calibration_samples", "8", "--batch_size", "8", *flags])


def logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_what_contributes_nothing_is_pruned_and_the_logits_stay(toyworld, planted, tmp_path):
    out = tmp_path / "pruned"
    assert prune(planted, out, "--num_layers", "3", "--num_key_value_heads", "1", "--intermediate_size", "80",
                 calibration=toyworld.gold) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["layers_kept"] == [0, 1, 3]
    assert min(report["block_influence"]) == report["block_influence"][2] == pytest.approx(0.0, abs=1e-9)
    assert report["kv_groups_kept"] == {"0": [0], "1": [0], "3": [0]}
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["num_attention_heads"],
            config["intermediate_size"], config["head_dim"]) == (3, 1, 2, 80, 32)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.num_parameters() == report["parameters_after"] < report["parameters_before"]
    assert report["parameters_after"] == sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, 500, (2, 24))
    torch.testing.assert_close(logits(out, ids), logits(planted, ids), rtol=1e-4, atol=1e-4)
    assert report["calibration"]["loss_after"] == pytest.approx(report["calibration"]["loss_before"], abs=1e-3)


def test_the_toy_teacher_pruned_to_the_student_bases_size(toyworld, tmp_path):
    """Depth 4 -> 2 and MLP 512 -> 384: exactly the student base's parameter count (the ablation's comparison)."""
    out = tmp_path / "pruned-teacher"
    assert prune(toyworld.teacher, out, "--num_layers", "2", "--intermediate_size", "384",
                 calibration=toyworld.train) == 0  # problems.jsonl: prompts as user turns
    report = json.loads((out / "prune_report.json").read_text())
    manifest = json.loads(toyworld.manifest.read_text())
    assert report["parameters_after"] == manifest["models"]["student"]["params"]
    assert report["parameters_before"] == manifest["models"]["teacher"]["params"]
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() == report["parameters_after"]
    assert len(report["layers_kept"]) == 2 and report["intermediate_size"] == 384
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert prune(toyworld.teacher, out, "--num_layers", "2", "--intermediate_size", "384",
                 calibration=toyworld.train) == 0  # a rerun: already done, nothing rewritten
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp and not out.with_name(out.name + ".tmp").exists()
    assert prune(toyworld.teacher, out, "--num_layers", "3", calibration=toyworld.train) == 2  # not overwritten
    assert json.loads((out / "prune_report.json").read_text()) == report


def test_settings_it_cannot_honour_are_refused_by_name(toyworld, planted, tmp_path, caplog):
    cases = [((toyworld.teacher, "--num_key_value_heads", "1"), "num_key_value_heads / hidden_size: vLLM's qwen2"),
             ((planted, "--num_layers", "9"), "num_layers: 9 is more than the model's 4"),
             ((planted, "--intermediate_size", "0"), "intermediate_size: must be >= 1"),
             ((tmp_path / "nothing",), "model: cannot load")]
    for (model, *flags), message in cases:
        caplog.clear()
        assert prune(model, tmp_path / "out", *flags, calibration=toyworld.gold) == 2
        assert message in caplog.text
    assert main(["--model", str(planted), "--output_dir", str(tmp_path / "out"), "--calibration",
                 str(tmp_path / "none.jsonl")]) == 2
    assert "calibration: no such file" in caplog.text
    assert not (tmp_path / "out").exists()


VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    path, ids = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=path, dtype="float32", max_model_len=256, gpu_memory_utilization=0.2, seed=0,
              enforce_eager=True)  # torch.compile's ~40 s of start-up on a CPU would check nothing more
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    rows = out[0].prompt_logprobs[1:]
    print("RESULT", json.dumps([row[ids[i + 1]].logprob for i, row in enumerate(rows)]))
""")


@pytest.mark.slow
def test_vllm_serves_a_width_and_depth_pruned_toy_teacher(toyworld, tmp_path):
    """Heads, embedding channels, MLP channels and layers pruned; vLLM's prompt logprobs equal transformers'."""
    out = tmp_path / "pruned"
    assert prune(toyworld.teacher, out, "--num_layers", "3", "--num_key_value_heads", "1", "--hidden_size", "64",
                 "--intermediate_size", "256", calibration=toyworld.gold) == 0
    report = json.loads((out / "prune_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.hidden_size == 64 and model.config.num_attention_heads == 1
    assert model.num_parameters() == report["parameters_after"]
    ids = list(range(5, 45))
    proc = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(out), json.dumps(ids)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[7:])
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    want = logprobs.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(served), want, rtol=0, atol=2e-3)


def test_help_lists_every_setting(capsys):
    import dataclasses

    from sft.prune import PruneArguments

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    page = capsys.readouterr().out
    assert page.startswith("usage: python -m sft.prune")
    assert not [f.name for f in dataclasses.fields(PruneArguments) if f"--{f.name} " not in page]
