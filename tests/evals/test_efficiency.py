"""Efficiency in evals: every figure is present, positive and sensibly ordered; the toy teacher (4 layers) is
not faster than its 2-layer student at batch 1 under the same engine, measured interleaved in one run; the
config-derived size equals the real model's; report.md gains the columns and the plot; a real vLLM server
serves a compressed-tensors W8A8 student and is measured over HTTP (slow)."""

import json
import statistics

import pytest
from transformers import AutoModelForCausalLM

from data.toyworld.problems import read_jsonl
from evals.config import EvalsConfig, measures_efficiency
from evals.efficiency import HfTimer, Target, model_shape
from evals.main import main
from tracegen.config import EngineConfig
from tracegen.problems import make_renderer


def flags(toyworld, out, *more):
    return ["--benchmarks", "toy", "--custom_benchmarks", json.dumps({"toy": str(toyworld.test)}), "--limit", "2",
            "--n", "1", "--max_tokens", "8", "--output_dir", str(out), "--grader_workers", "1",
            "--efficiency_prompts", "2", "--efficiency_tokens", "8", "--batch_size", "8", *more]


def test_hf_efficiency_record_is_complete_and_positive(toyworld, tmp_path):
    out = tmp_path / "evals"
    assert main(flags(toyworld, out, "--engine", "hf", "--model", str(toyworld.student))) == 0
    e = json.loads((out / "scores.json").read_text())["student-init"]["toy"]["efficiency"]
    model = AutoModelForCausalLM.from_pretrained(toyworld.student)
    assert e["parameters"] == sum(p.numel() for p in model.parameters())
    assert e["flops_per_token"] > 2 * (e["parameters"] - model.model.embed_tokens.weight.numel())
    tensors = [*model.parameters(), *model.buffers()]  # float32, the tied head once
    assert e["weights_bytes"] == sum(t.numel() * 4 for t in tensors)
    for name in ("ttft_ms", "per_token_ms"):
        assert 0 < e[name]["p50"] <= e[name]["p95"], name
    assert e["per_token_ms"]["n"] == 2 * 7  # two requests of 8 tokens: 7 gaps each
    assert e["ttft_ms"]["p50"] > e["per_token_ms"]["p50"] / 10  # prefill is not free
    assert e["throughput_batch"] == 8 and e["throughput_tokens"] == 8 * 8 and e["throughput_tokens_per_s"] > 0
    assert e["peak_memory_bytes"] > e["rss_before_load_bytes"] > 0
    assert e["hardware"]["cpus"] >= 1 and e["hardware"]["torch"] and e["engine"].startswith("hf (transformers")
    report = (out / "report.md").read_text()
    assert "| params | weights MiB | ms/token (p50) | tokens/s |" in report and "## Efficiency" in report
    assert "![accuracy vs per-token latency](efficiency.png)" in report and (out / "efficiency.png").stat().st_size


def test_the_teacher_is_not_faster_than_its_half_size_student(toyworld):
    """Interleaved prompt by prompt in one process, so that load on the machine hits both alike."""
    render = make_renderer(None, None)
    prompts = [render(p) for p in read_jsonl(toyworld.test)[:6]]
    timers = {size: HfTimer(Target.of(EvalsConfig(output_dir="unused", temperature=0.0),
                                      EngineConfig(engine="hf", model=str(path))))
              for size, path in (("student", toyworld.student), ("teacher", toyworld.teacher))}
    gaps = {"student": [], "teacher": []}
    for size in gaps:
        timers[size].batch1(prompts[0], 4)  # warm-up
    for messages in prompts:
        for size, timer in timers.items():
            gaps[size] += timer.batch1(messages, 16)[1]
    student, teacher = statistics.median(gaps["student"]), statistics.median(gaps["teacher"])
    assert teacher >= student, (teacher, student)
    shape = {size: model_shape(str(path)) for size, path in (("student", toyworld.student),
                                                            ("teacher", toyworld.teacher))}
    assert shape["teacher"]["matmul_weights"] > 1.5 * shape["student"]["matmul_weights"]
    assert shape["teacher"]["attention_width"] == 2 * shape["student"]["attention_width"]
    assert timers["teacher"].weights_bytes() > timers["student"].weights_bytes()


def test_efficiency_is_off_for_a_remote_base_url_and_config_is_checked(toyworld, tmp_path, caplog):
    cfg = EvalsConfig(output_dir="x")
    assert not measures_efficiency(cfg, EngineConfig(base_url=["http://127.0.0.1:9/v1"], model="m"))
    assert measures_efficiency(cfg, EngineConfig(engine="hf", model="m"))
    assert measures_efficiency(cfg, EngineConfig(serve_model="m"))
    assert main(flags(toyworld, tmp_path, "--engine", "hf", "--model", "m", "--efficiency_tokens", "1")) == 2
    assert "efficiency_tokens: must be >= 2" in caplog.text


@pytest.mark.slow
def test_a_vllm_server_serves_the_w8a8_student_and_is_measured_over_http(toyworld, tmp_path):
    from sft.quantize import main as quantize

    student = tmp_path / "student-w8a8"
    assert quantize(["--model", str(toyworld.student), "--output_dir", str(student), "--scheme", "w8a8",
                     "--backend", "compressed-tensors"]) == 0
    out = tmp_path / "evals"
    serve = "--serve_args=--max-model-len 512 --gpu-memory-utilization 0.1 --enforce-eager"
    assert main(flags(toyworld, out, "--serve_model", str(student), serve, "--concurrency", "4")) == 0
    toy = json.loads((out / "scores.json").read_text())["student-w8a8"]["toy"]
    assert toy["errors"] == 0 and toy["mean_tokens"] > 0
    e = toy["efficiency"]
    assert e["engine"].startswith("http (managed vLLM server") and e["throughput_batch"] == 4
    assert 0 < e["ttft_ms"]["p50"] and 0 < e["per_token_ms"]["p50"] <= e["per_token_ms"]["p95"]
    assert e["throughput_tokens"] == 4 * 8 and e["peak_memory_bytes"] > 0  # the server's processes
    assert e["weights_bytes"] < 0.5 * 4 * e["parameters"] and e["rss_before_load_bytes"] is None
