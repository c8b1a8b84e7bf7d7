"""engine: hf and engine: vllm generate in this process, with the HTTP engine's records and resume."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.fake_openai import FakeOpenAIServer
from tracegen.main import main
from tracegen.records import LOGPROB_SCHEMA, TRACE_SCHEMA
from tracegen.store import read_traces

ROOT = Path(__file__).resolve().parents[2]


def flags(toyworld, out, *more, limit=4, engine="hf"):
    return ["--problems", str(toyworld.test), "--limit", str(limit), "--output_dir", str(out), "--engine", engine,
            "--model", str(toyworld.student), "--n", "2", "--top_logprobs", "3", "--max_tokens", "16",
            "--temperature", "1.0", *more]


def part_schema(out, sub="traces"):
    return pq.read_schema(next((out / sub).glob("part-*.parquet")))


def check_records(out, eos_id, samples):
    traces = read_traces(out).to_pylist()
    assert len(traces) == len({t["trace_id"] for t in traces}) == samples
    logprobs = {r["trace_id"]: r for r in pq.read_table(out / "logprobs").to_pylist()}
    assert set(logprobs) == {t["trace_id"] for t in traces}
    for t in traces:
        lp = logprobs[t["trace_id"]]
        assert t["error"] is None and t["attempts"] == 1 and t["prompt_tokens"] > 10
        assert len(lp["token_ids"]) == len(lp["logprobs"]) == len(lp["top_ids"]) == t["completion_tokens"] <= 16
        assert all(len(ids) == 3 for ids in lp["top_ids"])
        assert all(row == sorted(row, reverse=True) for row in lp["top_logprobs"])
        assert all(-40 < x <= 0 for x in lp["logprobs"])
        assert len(lp["prompt_token_ids"]) == t["prompt_tokens"]
        # the rest (mass outside the top-k) completes each position's distribution (to float16 rounding)
        totals = [sum(math.exp(x) for x in row) + math.exp(rest) for row, rest in zip(lp["top_logprobs"],
                                                                                   lp["rest_logprobs"], strict=True)]
        assert totals == pytest.approx([1.0] * len(totals), abs=3e-3)
        if t["finish_reason"] == "stop":
            assert lp["token_ids"][-1] == eos_id
        else:
            assert t["finish_reason"] == "length" and t["completion_tokens"] == 16
    return traces, logprobs


def test_hf_engine_records_match_the_http_engines(toyworld, tmp_path):
    assert main(flags(toyworld, tmp_path / "hf", "--batch_size", "3", "--shard_rows", "2")) == 0
    traces, _ = check_records(tmp_path / "hf", eos_id=2, samples=8)
    assert {t["model"] for t in traces} == {str(toyworld.student)}
    assert len(list((tmp_path / "hf" / "traces").glob("part-*.parquet"))) == 4  # written as it goes
    with FakeOpenAIServer() as server:
        assert main(["--problems", str(toyworld.test), "--limit", "2", "--output_dir", str(tmp_path / "http"),
                     "--base_url", server.base_url, "--top_logprobs", "3"]) == 0
    assert part_schema(tmp_path / "hf") == part_schema(tmp_path / "http") == TRACE_SCHEMA
    assert part_schema(tmp_path / "hf", "logprobs") == part_schema(tmp_path / "http", "logprobs") == LOGPROB_SCHEMA


def test_hf_engine_resumes_and_keys_adapters_apart(toyworld, tmp_path):
    out = tmp_path / "run"
    assert main(flags(toyworld, out, limit=2)) == 0
    first = {t["trace_id"]: t for t in read_traces(out).to_pylist()}
    assert main(flags(toyworld, out, limit=4)) == 0
    traces = read_traces(out).to_pylist()
    assert len(traces) == len({t["trace_id"] for t in traces}) == 8
    assert all(first[t["trace_id"]] == t for t in traces if t["trace_id"] in first)

    # a LoRA adapter (non-zero, so it changes the model) is a different teacher: new keys, same problems
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(toyworld.student),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(toyworld.student).save_pretrained(tmp_path / "adapter")
    assert main(flags(toyworld, out, "--adapter", str(tmp_path / "adapter"), limit=2)) == 0
    traces = read_traces(out).to_pylist()
    assert len(traces) == 12 and len({t["trace_id"] for t in traces}) == 12


def test_missing_vllm_is_one_clear_line(toyworld, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` does where it is not installed
    assert main(flags(toyworld, tmp_path / "run", engine="vllm")) == 2
    assert "engine: vllm needs vLLM: pip install -e '.[vllm]'" in caplog.text
    assert not (tmp_path / "run").exists()


def test_in_process_config_errors(toyworld, tmp_path, caplog):
    assert main(flags(toyworld, tmp_path / "run", "--base_url", "http://127.0.0.1:9/v1")) == 2
    assert "engine: hf loads `model` in this process" in caplog.text
    assert main(["--problems", str(toyworld.test), "--output_dir", str(tmp_path / "r"), "--engine", "hf",
                 "--model", str(tmp_path / "no-such-model")]) == 2
    assert not (tmp_path / "r" / "traces").exists()


@pytest.mark.slow
def test_vllm_offline_engine_agrees_with_hf(toyworld, tmp_path):
    # enforce_eager: vLLM's torch.compile of the model costs ~40 s of start-up on a CPU and samples no differently
    kwargs = {"max_model_len": 512, "gpu_memory_utilization": 0.2, "enforce_eager": True}
    vllm_flags = flags(toyworld, tmp_path / "vllm", "--engine_kwargs", json.dumps(kwargs), engine="vllm")
    proc = subprocess.run([sys.executable, "-m", "tracegen", *vllm_flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vllm_traces, vllm_lp = check_records(tmp_path / "vllm", eos_id=2, samples=8)
    assert part_schema(tmp_path / "vllm") == TRACE_SCHEMA
    assert main(flags(toyworld, tmp_path / "hf")) == 0
    hf_traces, hf_lp = check_records(tmp_path / "hf", eos_id=2, samples=8)
    # the first token's distribution depends only on the prompt: both engines must see the same one
    first = {}
    for traces, lps in ((vllm_traces, vllm_lp), (hf_traces, hf_lp)):
        for t in traces:
            lp = lps[t["trace_id"]]
            first.setdefault(t["problem_id"], []).append((lp["top_ids"][0], lp["top_logprobs"][0]))
    for problem_id, rows in first.items():
        # the same top-k set with the same logprobs; the order of near-ties may differ between engines
        by_id = [dict(zip(ids, values, strict=True)) for ids, values in rows]
        assert all(d.keys() == by_id[0].keys() for d in by_id), (problem_id, [list(d) for d in by_id])
        assert max(abs(d[i] - by_id[0][i]) for d in by_id for i in d) < 0.05
