"""tracegen end to end against a real loopback server that speaks chat completions and injects faults."""

import json
import logging
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from tests.fake_openai import FakeOpenAIServer, Script
from tracegen.main import main
from tracegen.store import read_traces

FAST_RETRY = ["--retry_backoff_s", "0.01", "--retry_max_backoff_s", "0.05"]


@pytest.fixture
def server():
    with FakeOpenAIServer() as s:
        yield s


def run(tmp_path, base_urls, prompts, *flags, n=1, name="run"):
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": f"p{i}", "domain": "math", "prompt": p}) + "\n"
                                for i, p in enumerate(prompts)))
    out = tmp_path / name
    urls = [base_urls] if isinstance(base_urls, str) else base_urls
    code = main(["--problems", str(problems), "--output_dir", str(out), "--base_url", *urls,
                 "--n", str(n), "--concurrency", "8", *FAST_RETRY, *flags])
    return code, out


def rows(out):
    return sorted(read_traces(out).to_pylist(), key=lambda r: (int(r["problem_id"][1:]), r["sample_index"],
                                                                r["created_at"]))


def test_reasoning_from_each_place(tmp_path, server):
    prompts = ["[reasoning:field][answer:1]", "[reasoning:content_field][answer:2]", "[reasoning:tags][answer:3]",
               "[reasoning:none][answer:4]"]
    code, out = run(tmp_path, server.base_url, prompts)
    assert code == 0
    got = [(r["reasoning_source"], r["content"], r["reasoning"].startswith("Let me think") if r["reasoning"]
            else None) for r in rows(out)]
    assert got[0] == ("field", "The answer is \\boxed{1}.", True)
    assert got[1] == ("field", "The answer is \\boxed{2}.", True)
    assert got[2] == ("think_tags", "The answer is \\boxed{3}.", True)
    assert got[3][0] == "none" and got[3][1].endswith("\\boxed{4}.") and got[3][2] is None


def test_transient_faults_are_retried_with_exact_counts(tmp_path, server):
    prompts = ["[fail:429x2:retry=0.3]", "[fail:500x2]", "[fail:503x1]", "[fail:dropx2]", "[fail:resetx1]",
               "[fail:malformedx1]", "[fail:partialx1]", "[fail:429x1][fail:dropx1]", "fine"]
    start = time.monotonic()
    code, out = run(tmp_path, server.base_url, prompts, n=2)
    assert code == 0
    traces = rows(out)
    assert len(traces) == 18 and all(r["error"] is None for r in traces)
    attempts = {r["problem_id"]: r["attempts"] for r in traces}
    assert attempts == {"p0": 3, "p1": 3, "p2": 2, "p3": 3, "p4": 2, "p5": 2, "p6": 2, "p7": 3, "p8": 1}
    assert [server.attempts(p) for p in prompts] == [3, 3, 2, 3, 2, 2, 2, 3, 1]
    assert len(server.chat_requests()) == 21
    assert min(r["latency_s"] for r in traces if r["problem_id"] == "p0") >= 0.6  # Retry-After: 0.3 twice
    assert time.monotonic() - start < 10


def test_retry_after_http_date_and_timeouts(tmp_path, server):
    prompts = ["[fail:429x1:retry=date+2]", "[fail:slowx1:secs=3]"]
    code, out = run(tmp_path, server.base_url, prompts, "--timeout_s", "1")
    assert code == 0
    by_id = {r["problem_id"]: r for r in rows(out)}
    assert by_id["p0"]["attempts"] == 2 and by_id["p0"]["latency_s"] >= 1.0  # HTTP-date ~2 s ahead (1 s resolution)
    assert by_id["p1"]["attempts"] == 2 and by_id["p1"]["error"] is None


def test_length_and_repetition_are_outcomes_not_retries(tmp_path, server):
    code, out = run(tmp_path, server.base_url, ["[finish:length]", "[finish:repetition]", "[tokens:90]"],
                    "--max_tokens", "64")
    assert code == 0
    got = [(r["finish_reason"], r["attempts"], r["completion_tokens"]) for r in rows(out)]
    assert got[0][:2] == ("length", 1) and got[1][:2] == ("repetition", 1) and got[2] == ("length", 1, 64)
    assert len(server.chat_requests()) == 3


def test_failures_become_error_rows_and_a_rerun_retries_only_them(tmp_path, server, caplog):
    prompts = ["ok one", "[fail:400]", "[fail:always500]", "[fail:500x3]", "ok two"]
    code, out = run(tmp_path, server.base_url, prompts, "--max_retries", "2", n=2)
    assert code == 1  # a batch scheduler notices
    traces = rows(out)
    errors = {r["problem_id"]: r["error"] for r in traces if r["error"]}
    assert set(errors) == {"p1", "p2", "p3"}
    assert errors["p1"].startswith("HTTP 400") and errors["p2"].startswith("HTTP 500")
    assert [server.attempts(p) for p in prompts] == [1, 1, 3, 3, 1]  # 400 is not retried
    summary = json.loads((out / "tracegen.summary.json").read_text())["this_run"]
    assert summary["errors"] == 6 and summary["finish_reasons"]["error"] == 6
    assert {f["problem_id"] for f in summary["first_failures"]} == {"p1", "p2", "p3"}

    code, out = run(tmp_path, server.base_url, prompts, "--max_retries", "2", n=2)
    assert code == 1  # p1 and p2 still fail; p3 now succeeds (its 4th request)
    assert [server.attempts(p) for p in prompts] == [1, 2, 6, 4, 1]
    traces = rows(out)
    ok = [r for r in traces if r["error"] is None]
    assert len(ok) == len({r["trace_id"] for r in ok}) == 6
    assert Counter(r["problem_id"] for r in ok) == {"p0": 2, "p3": 2, "p4": 2}
    assert len(traces) == 6 + 2 * 2 + 2 * 2 + 2  # error rows are kept as history


def test_refuse_n_with_one_sample_per_request(tmp_path, server):
    code, _ = run(tmp_path, server.base_url, ["[refuse_n]"], n=3)
    assert code == 1 and server.attempts("[refuse_n]") == 1
    code, out = run(tmp_path, server.base_url, ["[refuse_n]"], "--samples_per_request", "1", n=3, name="split")
    assert code == 0
    assert [r["sample_index"] for r in rows(out)] == [0, 1, 2]
    assert all(r.body["n"] == 1 for r in server.chat_requests()[1:])
    assert len({r["content"] for r in rows(out)}) >= 1


def test_raising_n_later_adds_only_the_new_samples(tmp_path, server):
    code, out = run(tmp_path, server.base_url, ["a", "b"], n=2)
    first = {r["trace_id"]: r for r in rows(out)}
    code, out = run(tmp_path, server.base_url, ["a", "b"], n=5)
    assert code == 0
    traces = rows(out)
    assert len(traces) == 10 and len({r["trace_id"] for r in traces}) == 10
    assert [r.body["n"] for r in server.chat_requests()] == [2, 2, 3, 3]
    assert all(first[t] == r for t, r in ((r["trace_id"], r) for r in traces) if t in first)


def test_the_run_keeps_the_problems_it_was_asked_about(tmp_path, server):
    code, out = run(tmp_path, server.base_url, ["a", "b", "c"], "--limit", "2")
    (path,) = (out / "problems").glob("*.parquet")
    assert code == 0 and path.name.endswith(".0of1.parquet")
    assert pq.read_table(path).to_pylist() == [
        {"id": f"p{i}", "domain": "math", "prompt": p, "answer": None, "tests": None, "source": None, "meta": None}
        for i, p in enumerate("ab")]
    code, out = run(tmp_path, server.base_url, ["a", "b", "c"])  # same source, all of it: the file follows
    assert [path] == list((out / "problems").glob("*.parquet"))
    assert pq.read_table(path)["id"].to_pylist() == ["p0", "p1", "p2"]


def test_top_logprobs_go_to_the_side_table_as_token_ids(tmp_path, server):
    code, out = run(tmp_path, server.base_url, ["[tokens:12][answer:5]", "[finish:length]"], "--top_logprobs", "3",
                    "--max_tokens", "16", n=2)
    assert code == 0
    traces = {r["trace_id"]: r for r in rows(out)}
    body = server.chat_requests()[0].body
    assert body["logprobs"] is True and body["top_logprobs"] == 3 and body["return_tokens_as_token_ids"] is True
    table = pq.read_table(next((out / "logprobs").glob("part-*.parquet"))).to_pylist()
    assert {r["trace_id"] for r in table} == set(traces)
    from tests.fake_openai import token_id
    for lp in table:
        trace = traces[lp["trace_id"]]
        words = (trace["reasoning"] or "").split() + (trace["content"] or "").split()
        assert lp["token_ids"] == [token_id(w) for w in words]
        assert len(lp["token_ids"]) == len(lp["logprobs"]) == trace["completion_tokens"]
        assert all(len(ids) == 3 and len(lps) == 3 for ids, lps in zip(lp["top_ids"], lp["top_logprobs"], strict=True))
        assert all(tok in ids for tok, ids in zip(lp["token_ids"], lp["top_ids"], strict=True))
        # the rest, from the values the server sent: its alternatives halve (p0, (1-p0)/2, (1-p0)/4), so the mass
        # outside the top-3 equals the third's (1 - the float16 sum would be off by up to 1e-3 absolute)
        assert lp["rest_logprobs"] == [min(row) for row in lp["top_logprobs"]]


def test_several_base_urls_share_the_load(tmp_path):
    script = Script()
    with FakeOpenAIServer(script) as a, FakeOpenAIServer(script) as b:
        code, out = run(tmp_path, [a.base_url, b.base_url], [f"q{i} [fail:500x1]" for i in range(20)])
        assert code == 0 and len(rows(out)) == 20
        assert len(a.chat_requests()) >= 10 and len(b.chat_requests()) >= 10
        assert len(a.chat_requests()) + len(b.chat_requests()) == 40
        # a retry goes to the other server when there is one
        first = {r.body["messages"][-1]["content"] for r in a.chat_requests()[:5]}
        assert all(b.attempts(p) for p in first)


def test_api_key_is_sent_but_never_stored_or_logged(tmp_path, monkeypatch, caplog):
    secret = "sk-very-secret-123"
    monkeypatch.setenv("TEACHER_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer(api_key=secret) as s:
        code, out = run(tmp_path, s.base_url, ["q", "[fail:500x1]"], "--api_key_env", "TEACHER_KEY",
                        "--price_input_per_mtok", "0.5", "--price_output_per_mtok", "2")
        assert code == 0
        assert {r.headers["authorization"] for r in s.chat_requests()} == {f"Bearer {secret}"}
    assert secret not in caplog.text
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert "TEACHER_KEY" in (out / "tracegen.config.yaml").read_text()
    summary = json.loads((out / "tracegen.summary.json").read_text())["this_run"]
    expected = (summary["prompt_tokens"] * 0.5 + summary["completion_tokens"] * 2) / 1e6
    assert summary["cost_usd"] == pytest.approx(expected, abs=1e-4) and summary["cost_usd"] > 0


def test_wrong_key_or_model_stops_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "wrong")
    with FakeOpenAIServer(api_key="right") as s:
        code, out = run(tmp_path, s.base_url, ["q"], "--api_key_env", "TEACHER_KEY")
        assert code == 2 and not out.exists()
    with FakeOpenAIServer(strict_model=True) as s:
        code, out = run(tmp_path, s.base_url, ["q"], "--model", "other")
        assert code == 2 and not out.exists()


def test_unreachable_server_and_bad_input_write_nothing(tmp_path, caplog):
    from tracegen.server import free_port

    code, out = run(tmp_path, f"http://127.0.0.1:{free_port()}/v1", ["q"])
    assert code == 2 and not out.exists()
    assert "cannot reach" in caplog.text
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "domain": "math", "prompt": "x"}\n{"id": "a"}\n')
    code = main(["--problems", str(tmp_path / "bad.jsonl"), "--output_dir", str(tmp_path / "bad"),
                 "--base_url", "http://127.0.0.1:9/v1"])
    assert code == 2 and not (tmp_path / "bad").exists()
    assert "bad.jsonl:2: missing field 'domain'" in caplog.text


def test_config_errors_name_the_setting(tmp_path, caplog):
    (tmp_path / "p.jsonl").write_text('{"id": "a", "domain": "math", "prompt": "x"}\n')
    (tmp_path / "c.yaml").write_text(f"problems: {tmp_path / 'p.jsonl'}\noutput_dir: {tmp_path / 'o'}\n"
                                     "base_url: http://127.0.0.1:9/v1\n")
    (tmp_path / "typo.yaml").write_text((tmp_path / "c.yaml").read_text() + "nn: 3\n")
    assert main(["--config", str(tmp_path / "typo.yaml"), "--top_logprobs", "50"]) == 2
    assert "typo.yaml: unknown keys ['nn']" in caplog.text  # named first, not hidden behind top_logprobs
    for flags, message in [(["--top_logprobs", "50"], "top_logprobs: 50"), (["--shard", "2/2"], "shard: '2/2'"),
                           (["--api_key_env", "NOPE_NOT_SET"], "NOPE_NOT_SET is not set"),
                           (["--serve_model", "x"], "set exactly one")]:
        caplog.clear()
        assert main(["--config", str(tmp_path / "c.yaml"), *flags]) == 2, flags
        assert message in caplog.text, flags
    assert not (tmp_path / "o").exists()


def test_a_key_revoked_mid_run_stops_the_job_with_the_setting_named(tmp_path):
    import asyncio

    from tracegen.config import parse_config
    from tracegen.http_engine import FatalEndpointError, HttpEngine
    from tracegen.main import WorkItem, generate_all, make_clients
    from tracegen.store import ShardWriter

    with FakeOpenAIServer(api_key="new-key") as s:
        cfg = parse_config(["--problems", "x.jsonl", "--output_dir", str(tmp_path), "--base_url", s.base_url,
                            "--model", "fake-teacher", *FAST_RETRY])
        work = [WorkItem(f"p{i}", [{"role": "user", "content": f"q{i}"}], "k", [0]) for i in range(10)]
        writer = ShardWriter(tmp_path, (0, 1), 100, logprobs=False)

        async def go():
            clients = make_clients(cfg, [s.base_url])  # the old key ("EMPTY")
            return await generate_all(cfg, HttpEngine(cfg, clients), work, writer)

        with pytest.raises(FatalEndpointError, match="HTTP 401.*api_key_env"):
            asyncio.run(go())
        writer.close()
        assert len(s.chat_requests()) <= cfg.concurrency  # stopped at once, not after every request failed
