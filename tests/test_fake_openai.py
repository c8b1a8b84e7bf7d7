"""Tests of the fake OpenAI server, driven through the real openai SDK (and raw httpx for headers)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import openai
import pytest

try:
    from tests.fake_openai import FakeOpenAIServer, Script, ScriptState, token_id
except ModuleNotFoundError:  # run with tests/ (not the repository root) on sys.path
    from fake_openai import FakeOpenAIServer, Script, ScriptState, token_id

API_KEY = "sk-test-fake-123"
MODEL = "fake-teacher"


# The server is plain HTTP on loopback: verify=False only spares each client loading the CA bundle (~50 ms).
def sdk(base_url: str, api_key: str = API_KEY, **kwargs) -> openai.OpenAI:
    kwargs.setdefault("timeout", 5)
    http = openai.DefaultHttpxClient(verify=False)
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, http_client=http, **kwargs)


def async_sdk(base_url: str) -> openai.AsyncOpenAI:
    http = openai.DefaultAsyncHttpxClient(verify=False)
    return openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=5, http_client=http)


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture
def client(server):
    with sdk(server.base_url) as c:
        yield c


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Think, then answer."}, {"role": "user", "content": text}]


def ask(client: openai.OpenAI, text: str, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=user(text), **kwargs)


def raw_post(server: FakeOpenAIServer, text: str, **body) -> httpx.Response:
    payload = {"model": MODEL, "messages": user(text), **body}
    return httpx.post(f"{server.base_url}/chat/completions", json=payload, timeout=5, verify=False)


# ---- endpoints and recording


def test_health_models_and_unknown_route(server, client):
    assert httpx.get(f"{server.url}/health", verify=False).status_code == 200
    assert [m.id for m in client.models.list()] == ["fake-teacher"]
    missing = httpx.get(f"{server.url}/v1/nope", verify=False)
    assert missing.status_code == 404 and "error" in missing.json()
    assert server.counters["requests"] == 3


def test_records_authorization_headers_and_body(server, client):
    ask(client, "What is 1+1? [answer:2]", temperature=0.6)
    (rec,) = server.chat_requests()
    assert rec.authorization == f"Bearer {API_KEY}"
    assert rec.headers["content-type"] == "application/json"
    assert rec.body["messages"][-1]["content"] == "What is 1+1? [answer:2]"
    assert rec.body["temperature"] == 0.6
    assert rec.prompt == "What is 1+1? [answer:2]"
    assert (rec.status, rec.fault, rec.port) == (200, None, server.port)
    assert abs(rec.time - time.time()) < 5


def test_api_key_enforced_when_configured():
    with FakeOpenAIServer(api_key=API_KEY) as srv:
        with sdk(srv.base_url, api_key="sk-wrong") as bad, pytest.raises(openai.AuthenticationError):
            ask(bad, "hi")
        with sdk(srv.base_url) as good:
            assert ask(good, "hi").choices[0].finish_reason == "stop"
        assert [r.status for r in srv.requests] == [401, 200]


# ---- response shape


def test_reasoning_field_is_the_default(client):
    r = ask(client, "What is 2+2? [tokens:20] [answer:4]")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    (choice,) = r.choices
    msg = choice.message
    assert (choice.index, choice.finish_reason, msg.role) == (0, "stop", "assistant")
    assert msg.content == "The answer is \\boxed{4}."
    assert msg.reasoning.startswith("Let me think step by step. ")
    assert "reasoning_content" not in msg.model_extra
    assert len(msg.reasoning.split()) == 16
    assert r.usage.completion_tokens == 20
    assert r.usage.completion_tokens_details.reasoning_tokens == 16
    assert r.usage.prompt_tokens == len("Think, then answer. What is 2+2? [tokens:20] [answer:4]".split())
    assert r.usage.total_tokens == r.usage.prompt_tokens + 20
    assert choice.logprobs is None


def test_reasoning_content_field(client):
    msg = ask(client, "What is 2+2? [reasoning:content_field] [tokens:20] [answer:4]").choices[0].message
    assert msg.content == "The answer is \\boxed{4}."
    assert msg.model_extra["reasoning_content"].startswith("Let me think step by step. ")
    assert "reasoning" not in msg.model_extra


def test_reasoning_inline_think_tags(client):
    r = ask(client, "What is 2+2? [reasoning:tags] [tokens:20] [answer:4]")
    content = r.choices[0].message.content
    assert re.fullmatch(
        r"<think>\nLet me think step by step\. [^<]+\n</think>\n\nThe answer is \\boxed\{4\}\.", content
    )
    assert len(content.split()) == 20 == r.usage.completion_tokens
    assert not {"reasoning", "reasoning_content"} & set(r.choices[0].message.model_extra)
    assert r.usage.completion_tokens_details is None


def test_reasoning_none(client):
    r = ask(client, "What is 2+2? [reasoning:none] [tokens:20] [answer:4]")
    content = r.choices[0].message.content
    assert content.startswith("Let me think step by step. ") and "<think>" not in content
    assert content.endswith("\n\nThe answer is \\boxed{4}.")
    assert not {"reasoning", "reasoning_content"} & set(r.choices[0].message.model_extra)


def test_default_answer_is_a_stable_hash_of_the_prompt(client):
    a = ask(client, "Find x.").choices[0].message.content
    b = ask(client, "Find x. [tokens:30] [reasoning:content_field]").choices[0].message.content
    assert a == b and re.fullmatch(r"The answer is \\boxed\{\d{1,3}\}\.", a)


def test_n_choices_deterministic(client):
    r = ask(client, "Count the ways. [answer:7] [tokens:30]", n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert {c.message.content for c in r.choices} == {"The answer is \\boxed{7}."}
    assert len({c.message.reasoning for c in r.choices}) == 3  # different samples
    assert r.usage.completion_tokens == 90 and r.usage.completion_tokens_details.reasoning_tokens == 3 * 26
    again = ask(client, "Count the ways. [answer:7] [tokens:30]", n=3)
    assert [c.model_dump() for c in again.choices] == [c.model_dump() for c in r.choices]
    assert again.id != r.id
    assert ask(client, "Count the ways. [answer:7] [tokens:30]", seed=1).choices[0] != r.choices[0]


def test_answers_cycle_over_choices(client):
    r = ask(client, "Vote. [answers:1|2|1]", n=4)
    assert [c.message.content for c in r.choices] == [f"The answer is \\boxed{{{a}}}." for a in "1211"]


# ---- logprobs


def test_logprobs_words_and_top_k(client):
    plain = ask(client, "Q1 [tokens:25]")
    r = ask(client, "Q1 [tokens:25]", logprobs=True, top_logprobs=4)
    msg = r.choices[0].message
    assert (msg.reasoning, msg.content) == (
        plain.choices[0].message.reasoning,
        plain.choices[0].message.content,
    )
    entries = r.choices[0].logprobs.content
    assert [e.token for e in entries] == msg.reasoning.split() + msg.content.split()
    assert len(entries) == r.usage.completion_tokens == 25
    for e in entries:
        assert e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == 4
        lps = [t.logprob for t in e.top_logprobs]
        assert lps == sorted(lps, reverse=True) and len(set(lps)) == 4 and lps[0] < 0
        assert (e.token, e.logprob) in [(t.token, t.logprob) for t in e.top_logprobs]
        assert sum(2.718281828459045**lp for lp in lps) <= 1.0
    assert ask(client, "Q1 [tokens:25]", logprobs=True).choices[0].logprobs.content[0].top_logprobs == []


def test_logprobs_as_token_ids(client):
    words = ask(client, "Q2 [tokens:12] [answer:9]", logprobs=True).choices[0].logprobs.content
    r = ask(
        client, "Q2 [tokens:12] [answer:9]", logprobs=True, top_logprobs=3,
        extra_body={"return_tokens_as_token_ids": True},
    )  # fmt: skip
    entries = r.choices[0].logprobs.content
    assert [e.token for e in entries] == [f"token_id:{token_id(w.token)}" for w in words]
    assert token_id("\\boxed{9}.") == zlib.crc32(b"\\boxed{9}.") % 50000  # stable across processes
    for e in entries:
        assert e.bytes == list(e.token.encode())
        assert all(re.fullmatch(r"token_id:\d+", t.token) for t in e.top_logprobs)
        assert all(t.bytes == list(t.token.encode()) for t in e.top_logprobs)
        assert (e.token, e.logprob) in [(t.token, t.logprob) for t in e.top_logprobs]
    assert r.choices[0].message.content == "The answer is \\boxed{9}."  # the text is unchanged


def test_logprob_validation(client):
    with pytest.raises(openai.BadRequestError):
        ask(client, "x", top_logprobs=2)  # without logprobs=true
    with pytest.raises(openai.BadRequestError):
        ask(client, "x", logprobs=True, top_logprobs=21)


# ---- finish reasons


def test_max_tokens_truncates_prefix(client):
    full = ask(client, "Long one [tokens:30] [answer:5]").choices[0]
    r = ask(client, "Long one [tokens:30] [answer:5]", max_tokens=10)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.content is None
    assert c.message.reasoning.split() == full.message.reasoning.split()[:10]
    assert r.usage.completion_tokens == 10
    c = ask(client, "Long one [tokens:30] [answer:5]", max_completion_tokens=28).choices[0]
    assert (c.finish_reason, c.message.content, c.message.reasoning) == (
        "length",
        "The answer",
        full.message.reasoning,
    )
    c = ask(client, "Long one [tokens:30] [answer:5]", max_tokens=30).choices[0]
    assert c.finish_reason == "stop" and c.message.content == "The answer is \\boxed{5}."


def test_finish_length_directive(client):
    r = ask(client, "Hard [finish:length] [tokens:12]")
    c = r.choices[0]
    assert (c.finish_reason, c.message.content) == ("length", None)
    assert len(c.message.reasoning.split()) == 12 == r.usage.completion_tokens
    c = ask(client, "Hard [finish:length] [tokens:12] [reasoning:tags]").choices[0]
    assert c.message.content.startswith("<think>\n") and "</think>" not in c.message.content
    assert len(c.message.content.split()) == 12


def test_finish_repetition(client):
    c = ask(client, "Loop [finish:repetition] [tokens:40]").choices[0]
    assert (c.finish_reason, c.message.content) == ("repetition", None)
    assert c.message.reasoning.count("Wait, let me re-check that step.") >= 2
    assert len(c.message.reasoning.split()) == 40


def test_refuse_n(client):
    with pytest.raises(openai.BadRequestError, match=r"n>1 is not supported"):
        ask(client, "Sample [refuse_n]", n=2)
    assert len(ask(client, "Sample [refuse_n]", n=1).choices) == 1


def test_stream_and_bad_directive_rejected(client):
    with pytest.raises(openai.BadRequestError):
        ask(client, "x", stream=True)
    with pytest.raises(openai.BadRequestError, match="fake_openai"):
        ask(client, "x [fail:explode]")
    with pytest.raises(openai.BadRequestError, match="fake_openai"):
        ask(client, "x [reasoning:sideways]")
    with pytest.raises(openai.BadRequestError, match="bad fault option"):
        ask(client, "x [fail:slowx1:sec=1]")


# ---- faults


def test_429_retry_after_then_success(server):
    prompt = "P429 [fail:429x2:retry=0.2]"
    first, second, third = (raw_post(server, prompt) for _ in range(3))
    for resp in (first, second):
        assert resp.status_code == 429
        assert resp.headers["retry-after"] == "0.2"
        assert resp.json()["error"]["code"] == "rate_limit_exceeded"
    assert third.status_code == 200 and "retry-after" not in third.headers
    assert server.attempts(prompt) == 3
    assert [r.status for r in server.chat_requests()] == [429, 429, 200]
    assert [r.fault for r in server.chat_requests()] == ["429", "429", None]
    assert server.counters["fault:429"] == 2 and server.counters["status:200"] == 1


def test_429_via_sdk_and_retry_after_variants(server, client):
    with pytest.raises(openai.RateLimitError) as info:
        ask(client, "Q [fail:429x1]")
    assert info.value.response.headers["retry-after"] == "1"  # default: integer seconds
    assert ask(client, "Q [fail:429x1]").choices[0].finish_reason == "stop"

    resp = raw_post(server, "Q [fail:429x1:retry=date+2]")
    when = email.utils.parsedate_to_datetime(resp.headers["retry-after"]).timestamp()
    assert 0.5 <= when - time.time() <= 3.0
    resp = raw_post(server, "Q [fail:429x1:retry=none:retry_ms=150]")
    assert "retry-after" not in resp.headers and resp.headers["retry-after-ms"] == "150"
    resp = raw_post(server, "Q [fail:503x1:retry=3]")
    assert (resp.status_code, resp.headers["retry-after"]) == (503, "3")


def test_server_errors(client):
    with pytest.raises(openai.InternalServerError) as info:
        ask(client, "E [fail:500x1]")
    assert info.value.status_code == 500
    with pytest.raises(openai.InternalServerError) as info:
        ask(client, "E [fail:503x1]")
    assert info.value.status_code == 503
    assert ask(client, "E [fail:503x1]").choices
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            ask(client, "E [fail:always500]")


def test_400_context_length_is_permanent(server, client):
    for _ in range(2):
        with pytest.raises(openai.BadRequestError) as info:
            ask(client, "Huge [fail:400]")
        assert info.value.code == "context_length_exceeded"
        assert "maximum context length" in info.value.message
    assert server.attempts("Huge [fail:400]") == 2


@pytest.mark.parametrize("kind", ["drop", "reset", "partial"])
def test_connection_faults_then_success(server, kind):
    prompt = f"C [fail:{kind}x1] [answer:3]"

    async def go():
        async with async_sdk(server.base_url) as c:
            with pytest.raises(openai.APIConnectionError):
                await c.chat.completions.create(model=MODEL, messages=user(prompt))
            return await c.chat.completions.create(model=MODEL, messages=user(prompt))

    assert asyncio.run(go()).choices[0].message.content == "The answer is \\boxed{3}."
    expected_status = 200 if kind == "partial" else None
    assert [(r.status, r.fault) for r in server.chat_requests()] == [(expected_status, kind), (200, None)]
    assert server.counters[f"fault:{kind}"] == 1


def test_malformed_body(server, client):
    prompt = "M [fail:malformedx1]"
    resp = raw_post(server, prompt)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert int(resp.headers["content-length"]) == len(resp.content)
    with pytest.raises(json.JSONDecodeError):
        resp.json()
    assert ask(client, prompt).choices[0].finish_reason == "stop"
    server.reset()
    with pytest.raises(ValueError):  # the SDK lets json.JSONDecodeError through
        ask(client, prompt)


def test_slow_then_fast(server):
    prompt = "S [fail:slowx1:secs=1.5]"
    t0 = time.perf_counter()
    with sdk(server.base_url, timeout=0.2) as c:
        with pytest.raises(openai.APITimeoutError):
            ask(c, prompt)
        assert ask(c, prompt).choices[0].finish_reason == "stop"
    assert time.perf_counter() - t0 < 1.0


def test_fault_sequence(client):
    prompt = "Seq [fail:429x1:retry=0][fail:dropx1][fail:500x1]"
    with pytest.raises(openai.RateLimitError):
        ask(client, prompt)
    with pytest.raises(openai.APIConnectionError):
        ask(client, prompt)
    with pytest.raises(openai.InternalServerError):
        ask(client, prompt)
    assert ask(client, prompt).choices[0].finish_reason == "stop"


def test_counts_shared_between_servers():
    script = Script()
    with FakeOpenAIServer(script) as a, FakeOpenAIServer(script) as b:
        assert a.port != b.port
        assert raw_post(a, "Shared [fail:429x1]").status_code == 429
        assert raw_post(b, "Shared [fail:429x1]").status_code == 200
        assert script.state.attempts("Shared [fail:429x1]") == 2
    state = ScriptState()
    with (
        FakeOpenAIServer(directives="[reasoning:content_field]", state=state) as a,
        FakeOpenAIServer(directives="[reasoning:tags]", state=state) as b,
    ):
        assert raw_post(a, "Mix [fail:500x1]").status_code == 500
        body = raw_post(b, "Mix [fail:500x1]").json()
        assert body["choices"][0]["message"]["content"].startswith("<think>")


def test_concurrent_retries_counted_per_prompt(server):
    prompts = [f"Problem {i} [fail:503x1] [answer:{i}]" for i in range(24)]

    async def solve(c: openai.AsyncOpenAI, prompt: str) -> str:
        while True:
            try:
                r = await c.chat.completions.create(model=MODEL, messages=user(prompt))
                return r.choices[0].message.content
            except openai.InternalServerError:
                pass

    async def go():
        async with async_sdk(server.base_url) as c:
            return await asyncio.gather(*(solve(c, p) for p in prompts))

    assert asyncio.run(go()) == [f"The answer is \\boxed{{{i}}}." for i in range(24)]
    assert all(server.attempts(p) == 2 for p in prompts)
    assert server.counters["status:503"] == 24 and server.counters["status:200"] == 24


# ---- HTTP plumbing, canned mode, command line


def test_keep_alive_and_chunked_body(server):
    with httpx.Client(base_url=server.base_url, verify=False) as http:
        for _ in range(3):
            assert (
                http.post("/chat/completions", json={"model": MODEL, "messages": user("k")}).status_code
                == 200
            )
        chunks = [json.dumps({"model": MODEL, "messages": user("chunked [answer:8]")}).encode()]
        resp = http.post("/chat/completions", content=iter(chunks))  # Transfer-Encoding: chunked
        assert resp.json()["choices"][0]["message"]["content"] == "The answer is \\boxed{8}."
    assert server.counters["connections"] == 1
    assert server.requests[-1].headers["transfer-encoding"] == "chunked"


def test_canned_mode():
    with FakeOpenAIServer(canned_tokens=300) as srv:
        with sdk(srv.base_url) as c:
            r1 = ask(c, "anything [fail:500x1]", n=2)
            r2 = ask(c, "other")
        assert len(r1.choices) == 2 and r1.usage.completion_tokens == 600
        assert r1.choices[0].message.content == "The answer is \\boxed{42}."
        assert r1.choices[0].message.reasoning.startswith("Let me think step by step.")
        assert r1.id != r2.id and r2.usage.completion_tokens == 300
        assert r2.choices[0].message.reasoning == r1.choices[0].message.reasoning


def test_command_line_server():
    script = Path(__file__).with_name("fake_openai.py")
    cmd = [sys.executable, str(script), "--port", "0", "--canned-tokens", "50", "--latency-ms", "1"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        try:
            base_url = proc.stdout.readline().strip()
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", base_url)
            assert httpx.get(base_url.removesuffix("/v1") + "/health", verify=False).status_code == 200
            with sdk(base_url) as c:
                assert ask(c, "hi").usage.completion_tokens == 50
        finally:
            proc.terminate()
            assert proc.wait(timeout=5) == 0  # SIGTERM is a clean shutdown
