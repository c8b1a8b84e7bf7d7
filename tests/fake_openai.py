"""A fake OpenAI-compatible teacher (vLLM flavoured) whose prompts script its answers and its faults.

Standard library only (``http.server``, keep-alive), so faults are real on the wire. In a test::

    with FakeOpenAIServer() as server:                 # serves on a background thread
        ...  # point tracegen / openai.OpenAI at server.base_url
        server.chat_requests()[-1].body["n"]          # what the client sent (also .headers, .prompt)
        server.attempts(prompt)                        # chat requests seen with that last user message

As a process (the tracegen benchmark): ``python tests/fake_openai.py --port 0 --canned-tokens 4000`` prints its
base_url and answers every chat request with the same 4000-token completion, precomputed, so the client is measured.

Endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` (non-streaming; ``n``, ``seed``, ``max_tokens``,
``logprobs``/``top_logprobs`` and vLLM's ``return_tokens_as_token_ids``). Tokens are the whitespace-separated
words of reasoning then content (``<think>``/``</think>`` are words too), so ``usage.completion_tokens`` is
``len(logprobs.content)`` and a token's id is ``token_id(word)``. The reasoning starts "Let me think step by step."
and the content is "The answer is \\boxed{A}."; the output depends only on messages, seed and choice index.
Each token's top-k logprobs are the sampled word at p0 in (0.5, 0.99), then alternatives at (1-p0)/2, (1-p0)/4...

Directives, anywhere in the last user message:

``[reasoning:field|content_field|tags|none]``  where the reasoning goes: ``message.reasoning`` (the default, vLLM),
                                          ``message.reasoning_content`` (DeepSeek), ``<think>`` tags in the
                                          content, or plain text before the answer
``[tokens:N]``                            completion length in tokens (default 48)
``[answer:A]`` / ``[answers:A|B]``        the boxed answer (choice i gets the (i mod k)-th); default: a hash
``[finish:length|repetition]``            reasoning only, no answer, that finish_reason
``[refuse_n]``                            400 when n > 1
``[fail:KINDxK:opt=v]``                   the first K requests with this prompt fail with KIND (no ``xK``: all);
                                          several apply in turn: ``[fail:429x1][fail:dropx1]``

Fault kinds: ``429`` (``Retry-After: 1``; ``retry=0.3`` or ``retry=date+2``, an HTTP date 2 s ahead), ``500``,
``503``, ``always500``, ``400`` (context length, not retryable), ``drop`` (closed without a response), ``reset``
(a TCP RST), ``partial`` (half the body, then closed), ``malformed`` (a complete, invalid JSON body) and ``slow``
(``secs=S`` seconds, default 1, before the answer). Attempts are counted per prompt on the Script, so servers
built on one Script share them.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import email.utils
import json
import math
import random
import re
import secrets
import socket
import struct
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFIX = "Let me think step by step.".split()
WORDS = """we need find the value of x so consider equation both sides then check case first second simplify
    compute sum product term factor divide multiply substitute gives hence therefore note that since because
    try again verify result carefully actually number integer remainder total square root prime""".split()
DIRECTIVE = re.compile(r"\[(reasoning|tokens|answers?|finish|refuse_n|fail)(?::([^\[\]]*))?\]")
FAULT = re.compile(r"(429|500|503|always500|400|drop|reset|partial|malformed|slow)(?:x(\d+))?"
                   r"((?::(?:retry|secs)=[\w.+]+)*)")
ERRORS = {"429": (429, "rate_limit_exceeded"), "500": (500, None), "503": (503, None), "always500": (500, None),
          "400": (400, "context_length_exceeded")}
FIELDS = {"field": "reasoning", "content_field": "reasoning_content"}
CHOICES = {"reasoning": ("field", "content_field", "tags", "none"), "finish": ("length", "repetition")}


def token_id(word: str) -> int:
    """The fake vocabulary id of a word (stable across processes)."""
    return zlib.crc32(word.encode()) % 50000


@dataclasses.dataclass(eq=False)
class Script:
    """What a server does; servers built on one Script share its per-prompt attempt counts."""

    model: str = "fake-teacher"
    api_key: str | None = None  # when set, /v1/* without "Authorization: Bearer <key>" gets 401
    strict_model: bool = False  # 404 for a request naming another model, like vLLM
    latency_s: float = 0.0  # before every chat answer
    canned_tokens: int | None = None  # answer every chat request with one precomputed completion this long
    record_limit: int | None = None  # keep only the last N request records
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # chat requests per prompt
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def next_attempt(self, prompt: str) -> int:
        """Count a request with ``prompt``; return how many came before it."""
        with self.lock:
            self.counts[prompt] += 1
            return self.counts[prompt] - 1


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # the parsed JSON (None for a GET)
    prompt: str | None  # the last user message of a chat request


@dataclasses.dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    fault: str | None = None  # the injected fault kind; the handler carries out drop, reset and partial


# ---- completions


@dataclasses.dataclass
class Directives:
    reasoning: str = "field"
    tokens: int = 48
    answers: tuple[str, ...] = ()
    finish: str = "stop"
    refuse_n: bool = False
    faults: list[tuple[str, int | None, dict[str, str]]] = dataclasses.field(default_factory=list)


def parse_directives(prompt: str) -> Directives:
    """The prompt's directives; ValueError names a malformed one."""
    d = Directives()
    for name, arg in DIRECTIVE.findall(prompt):
        if name == "fail":
            if not (m := FAULT.fullmatch(arg)):
                raise ValueError(f"fake_openai: bad directive [fail:{arg}]")
            options = dict(opt.split("=") for opt in m[3].split(":")[1:])
            d.faults.append((m[1], int(m[2]) if m[2] else None, options))
        elif name in ("answer", "answers"):
            d.answers = tuple(arg.split("|"))
        elif name == "refuse_n":
            d.refuse_n = True
        elif name == "tokens" and arg.isdigit() or arg in CHOICES.get(name, ()):
            setattr(d, name, int(arg) if name == "tokens" else arg)
        else:
            raise ValueError(f"fake_openai: bad directive [{name}:{arg}]")
    return d


def choice_tokens(d: Directives, answer: str, rng: random.Random) -> list[tuple[str, str, bool]]:
    """One choice's tokens as (separator before, word, in the reasoning field)."""
    tags = d.reasoning == "tags"
    answer_words = f"The answer is \\boxed{{{answer}}}.".split() if d.finish == "stop" else []
    size = max(d.tokens - len(answer_words) - tags - (tags and bool(answer_words)), 1)
    reasoning = (PREFIX + [rng.choice(WORDS) for _ in range(size)])[:size]
    tokens = [("\n" if tags and i == 0 else " ", w, d.reasoning in FIELDS) for i, w in enumerate(reasoning)]
    if tags:
        tokens = [("", "<think>", False), *tokens] + [("\n", "</think>", False)] * bool(answer_words)
    return tokens + [("\n\n" if i == 0 else " ", w, False) for i, w in enumerate(answer_words)]


def logprob_entry(word: str, k: int, as_ids: bool, rng: random.Random) -> dict[str, Any]:
    p0 = 0.5 + 0.49 * rng.random()
    words = ([word] + [w for w in WORDS if w != word])[:k]
    probs = [p0 if i == 0 else (1 - p0) * 0.5**i for i in range(k)]

    def entry(w: str, p: float) -> dict[str, Any]:
        token = f"token_id:{token_id(w)}" if as_ids else w
        return {"token": token, "logprob": math.log(p), "bytes": list(token.encode())}

    return {**entry(word, p0), "top_logprobs": [entry(w, p) for w, p in zip(words, probs, strict=True)]}


def render_choice(index: int, tokens: list, finish: str, d: Directives, body: dict, rng: random.Random) -> dict:
    def text(in_field: bool) -> str | None:
        return "".join(sep + w for sep, w, f in tokens if f == in_field).lstrip() or None

    message = {"role": "assistant", "content": text(False)}
    if d.reasoning in FIELDS:
        message[FIELDS[d.reasoning]] = text(True)
    logprobs = None
    if body.get("logprobs"):
        k, as_ids = body.get("top_logprobs") or 0, bool(body.get("return_tokens_as_token_ids"))
        logprobs = {"content": [logprob_entry(w, k, as_ids, rng) for _, w, _ in tokens]}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def chat_completion(body: dict, d: Directives, prompt: str) -> dict:
    """The chat.completion object for a request; deterministic in messages, seed and choice index."""
    answers = d.answers or (str(zlib.crc32(prompt.encode()) % 1000),)
    choices, completion, reasoning = [], 0, 0
    for index in range(body.get("n") or 1):
        rng = random.Random(json.dumps([body["messages"], body.get("seed"), index]))
        tokens = choice_tokens(d, answers[index % len(answers)], rng)
        finish = d.finish
        if body.get("max_tokens") and len(tokens) > body["max_tokens"]:
            tokens, finish = tokens[: body["max_tokens"]], "length"
        choices.append(render_choice(index, tokens, finish, d, body, rng))
        completion, reasoning = completion + len(tokens), reasoning + sum(t[2] for t in tokens)
    prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in body["messages"])
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
             "total_tokens": prompt_tokens + completion}
    if d.reasoning in FIELDS:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return {"id": f"chatcmpl-{secrets.token_hex(8)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"), "choices": choices, "usage": usage}


# ---- replies


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def error(status: int, message: str, code: str | None = None) -> Reply:
    return Reply(status, dumps({"error": {"message": message, "type": "fake_openai", "code": code or status}}))


def pick_fault(faults: list, attempt: int) -> tuple[str, dict[str, str]] | None:
    """The fault for the attempt-th (0-based) request with a prompt, or None to answer."""
    for kind, count, options in faults:
        if count is None or attempt < count:
            return kind, options
        attempt -= count
    return None


def fault_error(kind: str, options: dict[str, str]) -> Reply:
    status, code = ERRORS[kind]
    reply = error(status, f"{'maximum context length exceeded' if status == 400 else 'error'} (fake_openai)", code)
    retry = options.get("retry", "1" if status == 429 else None)
    if retry and retry.startswith("date"):
        retry = email.utils.formatdate(time.time() + float(retry[5:] or 0), usegmt=True)
    if retry:
        reply.headers["retry-after"] = retry
    return reply


def chat_reply(script: Script, body: dict, prompt: str) -> Reply:
    attempt = script.next_attempt(prompt)
    try:
        d = parse_directives(prompt)
    except ValueError as e:
        return error(400, str(e))
    kind, options = pick_fault(d.faults, attempt) or (None, {})
    if kind in ERRORS:
        return fault_error(kind, options)
    if d.refuse_n and (body.get("n") or 1) > 1:
        return error(400, "n>1 is not supported")
    if script.strict_model and body.get("model") != script.model:
        return error(404, f"The model `{body.get('model')}` does not exist.")
    reply = Reply(200, dumps(chat_completion(body, d, prompt)), fault=kind)
    if kind == "malformed":
        reply.body = reply.body[: len(reply.body) // 2]
    if kind == "slow":
        time.sleep(float(options.get("secs", 1)))
    return reply


def last_user_text(body: dict) -> str:
    return next((m["content"] for m in reversed(body["messages"]) if m.get("role") == "user"), "")


# ---- server


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self.answer(None)

    def do_POST(self) -> None:
        self.answer(json.loads(self.rfile.read(int(self.headers.get("content-length", 0)))))

    def answer(self, body: Any) -> None:
        reply = self.server.fake.reply(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        if reply.fault in ("drop", "reset"):
            if reply.fault == "reset":  # close with SO_LINGER 0: the peer gets RST, not FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        self.send_response(reply.status)
        for name, value in {"content-type": "application/json", **reply.headers}.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(reply.body)))
        self.end_headers()
        if reply.fault == "partial":
            self.wfile.write(reply.body[: len(reply.body) // 2])
            self.close_connection = True
        else:
            self.wfile.write(reply.body)

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # a benchmark opens 64 connections at once
    fake: FakeOpenAIServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up (a timeout) is no bug
            super().handle_error(request, client_address)


class FakeOpenAIServer:
    """``with FakeOpenAIServer(script) as s:`` or ``FakeOpenAIServer(api_key=...)`` (a new Script of those fields)."""

    def __init__(self, script: Script | None = None, port: int = 0, **fields: Any):
        self.script = script or Script(**fields)
        self.http = _Server(("127.0.0.1", port), Handler)
        self.http.fake = self
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        self.requests: collections.deque[RequestRecord] = collections.deque(maxlen=self.script.record_limit)
        self._canned: dict[int, bytes] = {}

    def chat_requests(self) -> list[RequestRecord]:
        return [r for r in list(self.requests) if r.path == "/v1/chat/completions"]

    def attempts(self, prompt: str) -> int:
        """How many chat requests with ``prompt`` as their last user message the script has seen."""
        return self.script.counts[prompt]

    def reply(self, path: str, headers: dict[str, str], body: Any) -> Reply:
        chat = path == "/v1/chat/completions"
        prompt = last_user_text(body) if chat and self.script.canned_tokens is None else None
        self.requests.append(RequestRecord(path, headers, body, prompt))
        if self.script.api_key and headers.get("authorization") != f"Bearer {self.script.api_key}":
            return error(401, "Unauthorized: bad API key")
        if path == "/v1/models":
            return Reply(200, dumps({"object": "list", "data": [{"id": self.script.model, "object": "model"}]}))
        if not chat:
            return error(404, f"no route {path}")
        if self.script.latency_s:  # sleep(0) would still give the CPU away on a busy machine
            time.sleep(self.script.latency_s)
        if prompt is None:
            return Reply(200, self.canned(body.get("n") or 1))
        return chat_reply(self.script, body, prompt)

    def canned(self, n: int) -> bytes:
        if n not in self._canned:
            body = {"model": self.script.model, "messages": [{"role": "user", "content": "canned"}], "n": n}
            self._canned[n] = dumps(chat_completion(body, Directives(tokens=self.script.canned_tokens), "canned"))
        return self._canned[n]

    def __enter__(self) -> FakeOpenAIServer:
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.shutdown()
        self.http.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible teacher (prints its base_url first).")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--canned-tokens", type=int, default=None, help="answer every request with N tokens")
    parser.add_argument("--record-limit", type=int, default=1000, help="request records kept in memory")
    args = parser.parse_args()
    server = FakeOpenAIServer(Script(canned_tokens=args.canned_tokens, record_limit=args.record_limit), args.port)
    print(server.base_url, flush=True)
    server.http.serve_forever()


if __name__ == "__main__":
    main()
