"""tests/gpu/check.py --tiny: the GPU check's own code (the sft stage's trainers for full SFT, LoRA and sparse KD,
padding-free, then the evals engine) on a CPU, in a real subprocess; and the peak table it divides by."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tests.gpu.check import MODES, QWEN25_15B, attention_flops, mfu, peak_tflops

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a subprocess end to end, about a minute on a 2-core machine
def test_the_tiny_check_trains_every_mode_at_every_length_and_samples(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, "tests/gpu/check.py", "--tiny", "--steps", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"]["name"] == "cpu" and report["attn_implementation"] == "sdpa"
    assert report["checkpointing"] == "selective"  # TRL's selective checkpointing, as on a GPU
    runs = {(r["mode"], r["tokens_per_row"]): r for r in report["runs"]}
    assert set(runs) == {(mode, length) for mode in MODES for length in (64, 256)}
    for run in runs.values():
        assert "result" not in run, run  # no run ran out of memory or failed
        assert run["step_s"] > 0 and run["tokens_per_s"] > 0 and run["parameters"] > 0
        assert run["examples_per_row"] == (4 if run["mode"] == "sft_packed" else 1)
        assert run["mfu"] is None  # no peak on a CPU
    assert runs[("lora", 64)]["parameters"] == runs[("sft", 64)]["parameters"]  # the base model's, 6N for both
    assert all(value > 0 for ratio in report["ratios"].values() for value in ratio.values())
    assert report["targets"]["sft_16k_mfu_at_least_40%"] is None  # neither 16k tokens nor a peak here
    assert isinstance(report["targets"]["kd_step_at_most_1.25x_sft"], bool)
    engine = report["engine"]
    assert engine["engine"] == "hf" and engine["prompts"] == 4 and engine["completion_tokens"] > 0
    assert "KD/SFT step" in done.stdout and "packed/SFT step" in done.stdout and "engine hf: 4 prompts" in done.stdout


def test_peaks_are_found_by_the_names_gpus_report():
    assert peak_tflops("NVIDIA H200") == 989
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops("NVIDIA L40S") == 362 and peak_tflops("NVIDIA A10G") == 70
    assert peak_tflops("Some Future GPU") is None


def test_the_student_has_qwen2_5_1_5b_s_shape():
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_15B))
    assert model.num_parameters() == 1_543_714_304  # Qwen2.5-1.5B's count, tied embeddings once
    # at 16k tokens causal attention adds 46% to 6N's FLOPs; 6N x tokens per second at the peak is MFU 1
    assert attention_flops(QWEN25_15B, 16384) / (6 * 1_543_714_304) == pytest.approx(0.456, abs=1e-3)
    assert mfu(1_543_714_304, 16384, 6 * 1_543_714_304 * 16384 / 989e12, 989) == 1.0
