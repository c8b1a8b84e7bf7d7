"""kill -9 tracegen mid-run, rerun it, and check nothing was lost, duplicated or rewritten."""

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

from tests.fake_openai import FakeOpenAIServer
from tracegen.records import TRACE_SCHEMA
from tracegen.store import read_journal, read_traces

ROOT = Path(__file__).resolve().parents[2]
PROBLEMS, N = 60, 2


def durable_rows(out: Path) -> dict[str, dict]:
    """What a crash at this instant must not lose: finished parts plus every complete journal batch."""
    tables = [read_traces(out)] + [read_journal(j, TRACE_SCHEMA)[0] for j in (out / "traces").glob(".*.journal.arrow")]
    return {r["trace_id"]: r for r in pa.concat_tables(tables).to_pylist()}


def start(problems: Path, out: Path, base_url: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tracegen", "--problems", str(problems), "--output_dir", str(out),
           "--base_url", base_url, "--n", str(N), "--concurrency", "4", "--shard_rows", "7",
           "--top_logprobs", "2"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_kill_dash_nine_then_resume(tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": f"p{i}", "domain": "math", "prompt": f"q{i} [tokens:40]"}) + "\n"
                                for i in range(PROBLEMS)))
    out = tmp_path / "run"
    seen: dict[str, dict] = {}
    with FakeOpenAIServer(latency_s=0.08) as server:
        for kill_after in (4, 30, 70):  # durable traces before each kill
            proc = start(problems, out, server.base_url)
            deadline = time.monotonic() + 60
            while (out / "traces").exists() is False or len(durable_rows(out)) < kill_after:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            before = durable_rows(out)
            assert all(before[t] == row for t, row in seen.items()), "a durable trace changed"
            seen = before
        proc = start(problems, out, server.base_url)
        assert proc.wait(120) == 0, proc.stderr.read().decode()

    final = read_traces(out).to_pylist()
    ids = [r["trace_id"] for r in final]
    assert len(ids) == len(set(ids)) == PROBLEMS * N
    assert {(r["problem_id"], r["sample_index"]) for r in final} == {(f"p{i}", s) for i in range(PROBLEMS)
                                                                     for s in range(N)}
    by_id = {r["trace_id"]: r for r in final}
    assert all(by_id[t] == row for t, row in seen.items()), "a trace written before the last kill changed"
    assert not list((out / "traces").glob(".*.journal.arrow"))
    logprob_ids = pq.read_table(out / "logprobs", columns=["trace_id"])["trace_id"]
    assert sorted(logprob_ids.to_pylist()) == sorted(ids)  # one logprob row per trace, none orphaned
    # requests lost in flight were re-asked, but never more than the in-flight window per kill
    assert len(server.chat_requests()) <= PROBLEMS + 3 * 4
