"""The fake server's contract that the tracegen and evals tests lean on: token counts, determinism, logprob shape,
and each fault kind as it looks on the wire (the tracegen tests prove the client side of each)."""

import email.utils
import json
import math
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fake_openai import FakeOpenAIServer, token_id


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer(strict_model=True) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=5) as c:
        yield c


def post(client, prompt, timeout=5, **body):
    payload = {"model": "fake-teacher", "messages": [{"role": "user", "content": prompt}], **body}
    return client.post("/chat/completions", json=payload, timeout=timeout)


def raw_exchange(server, prompt) -> bytes:
    """Send one chat request on a bare socket and read until the server closes it."""
    body = json.dumps({"model": "fake-teacher", "messages": [{"role": "user", "content": prompt}]}).encode()
    with socket.create_connection(server.http.server_address, timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest.mark.parametrize("mode, field", [("field", "reasoning"), ("content_field", "reasoning_content"),
                                         ("tags", None), ("none", None)])
def test_tokens_are_the_words_of_reasoning_then_content(client, mode, field):
    response = post(client, f"q [reasoning:{mode}][tokens:20][answer:4]").json()
    choice, usage = response["choices"][0], response["usage"]
    message = choice["message"]
    words = (message.get(field) or "").split() + message["content"].split()
    assert len(words) == usage["completion_tokens"] == 20 and choice["finish_reason"] == "stop"
    assert message["content"].endswith("The answer is \\boxed{4}.") and words[0] in ("Let", "<think>")
    if mode == "tags":
        assert re.fullmatch(r"<think>\nLet me think step by step\. [^<]+\n</think>\n\nThe answer is \\boxed\{4\}\.",
                            message["content"])
    assert usage.get("completion_tokens_details") == ({"reasoning_tokens": 16} if field else None)
    assert not {"reasoning", "reasoning_content"} - {field} & set(message)


def test_output_depends_only_on_messages_seed_and_choice(client):
    first = post(client, "Count. [answers:7|8]", n=3).json()["choices"]
    again = post(client, "Count. [answers:7|8]", n=3).json()["choices"]
    assert first == again and len({c["message"]["reasoning"] for c in first}) == 3
    assert [c["message"]["content"][-3] for c in first] == ["7", "8", "7"]
    assert post(client, "Count. [answers:7|8]", seed=1).json()["choices"][0] != first[0]
    cut = post(client, "Count. [answers:7|8]", max_tokens=10).json()["choices"][0]
    assert (cut["finish_reason"], cut["message"]["content"]) == ("length", None)
    assert cut["message"]["reasoning"].split() == first[0]["message"]["reasoning"].split()[:10]
    for finish in ("length", "repetition"):
        c = post(client, f"Hard [finish:{finish}][tokens:12]").json()["choices"][0]
        assert (c["finish_reason"], c["message"]["content"]) == (finish, None)
        assert len(c["message"]["reasoning"].split()) == 12


def test_logprobs_are_the_sampled_words_among_halving_alternatives(client):
    plain = post(client, "Q [tokens:25]").json()["choices"][0]
    choice = post(client, "Q [tokens:25]", logprobs=True, top_logprobs=3, return_tokens_as_token_ids=True).json()
    choice = choice["choices"][0]
    assert choice["message"] == plain["message"]  # asking for logprobs does not change the text
    words = plain["message"]["reasoning"].split() + plain["message"]["content"].split()
    entries = choice["logprobs"]["content"]
    assert [e["token"] for e in entries] == [f"token_id:{token_id(w)}" for w in words]
    for e in entries:
        top = [t["logprob"] for t in e["top_logprobs"]]
        assert e["top_logprobs"][0]["token"] == e["token"] and e["bytes"] == list(e["token"].encode())
        assert math.log(0.5) < top[0] < 0 and top[1] == pytest.approx(top[2] + math.log(2))  # p0, (1-p0)/2, /4
        assert sum(map(math.exp, top)) + math.exp(top[2]) == pytest.approx(1.0)  # the rest equals the third
    words_only = post(client, "Q [tokens:25]", logprobs=True).json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in words_only] == words and all(e["top_logprobs"] == [] for e in words_only)


@pytest.mark.parametrize("directive, status, headers", [
    ("[fail:429x1]", 429, {"retry-after": "1"}), ("[fail:429x1:retry=0.3]", 429, {"retry-after": "0.3"}),
    ("[fail:500x1]", 500, {}), ("[fail:503x1]", 503, {}), ("[fail:400x1]", 400, {})])
def test_error_faults_then_success(server, client, directive, status, headers):
    prompt = f"E {directive}"
    failed = post(client, prompt)
    assert failed.status_code == status and failed.json()["error"]["message"]
    assert {k: failed.headers[k] for k in headers} == headers
    assert post(client, prompt).status_code == 200 and server.attempts(prompt) == 2


def test_error_fault_variants(client):
    date = post(client, "D [fail:429x1:retry=date+2]").headers["retry-after"]
    assert 0.5 <= email.utils.parsedate_to_datetime(date).timestamp() - time.time() <= 3
    assert [post(client, "A [fail:always500]").status_code for _ in range(3)] == [500] * 3
    assert post(client, "C [fail:400]").json()["error"]["code"] == "context_length_exceeded"
    seq = "S [fail:429x1][fail:500x2]"
    assert [post(client, seq).status_code for _ in range(4)] == [429, 500, 500, 200]


def test_connection_faults_are_real_on_the_wire(server):
    assert raw_exchange(server, "D [fail:dropx1]") == b""  # closed (FIN) without a byte
    with pytest.raises(ConnectionResetError):
        raw_exchange(server, "R [fail:resetx1]")
    head, _, body = raw_exchange(server, "P [fail:partialx1]").partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1])
    assert head.startswith(b"HTTP/1.1 200") and 0 < len(body) < length
    head, _, body = raw_exchange(server, "M [fail:malformedx1]").partition(b"\r\n\r\n")
    assert int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1]) == len(body)
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    for prompt in ("D [fail:dropx1]", "R [fail:resetx1]", "P [fail:partialx1]", "M [fail:malformedx1]"):
        assert json.loads(raw_exchange(server, prompt).partition(b"\r\n\r\n")[2])["choices"]


def test_slow_then_fast(client):
    with pytest.raises(httpx.ReadTimeout):
        post(client, "W [fail:slowx1:secs=1]", timeout=0.2)
    start = time.monotonic()
    assert post(client, "W [fail:slowx1:secs=1]").status_code == 200 and time.monotonic() - start < 0.5


def test_refusals_are_loud(client):
    assert "n>1" in post(client, "N [refuse_n]", n=2).json()["error"]["message"]
    assert post(client, "N [refuse_n]").status_code == 200
    assert "[fail:explode]" in post(client, "x [fail:explode]").json()["error"]["message"]
    assert post(client, "x [reasoning:sideways]").status_code == 400
    assert "[fail:slowx1:sec=1]" in post(client, "x [fail:slowx1:sec=1]").json()["error"]["message"]
    assert post(client, "x", model="other").status_code == 404  # strict_model
    with FakeOpenAIServer(api_key="sk-right") as s:
        assert client.get(f"{s.base_url}/models", headers={"authorization": "Bearer sk-wrong"}).status_code == 401
        models = client.get(f"{s.base_url}/models", headers={"authorization": "Bearer sk-right"}).json()
        assert [m["id"] for m in models["data"]] == ["fake-teacher"]
        assert s.requests[-1].headers["authorization"] == "Bearer sk-right"


def test_canned_command_line_server():
    cmd = [sys.executable, str(Path(__file__).with_name("fake_openai.py")), "--port", "0", "--canned-tokens", "300"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        try:
            base_url = proc.stdout.readline().strip()
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", base_url)
            with httpx.Client(base_url=base_url, timeout=5) as client:
                one, two = post(client, "anything [fail:500]", n=2).json(), post(client, "other").json()
            assert one["usage"]["completion_tokens"] == 600 and two["usage"]["completion_tokens"] == 300
            assert one["choices"][0]["message"]["content"] == two["choices"][0]["message"]["content"]
        finally:
            proc.kill()
