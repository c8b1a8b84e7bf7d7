"""A fake OpenAI-compatible teacher server (vLLM flavoured) with fault injection.

Standard library only: a hand-written HTTP/1.1 server on ``asyncio.start_server`` (keep-alive,
Content-Length or chunked request bodies) so faults such as dropped connections or malformed bodies
are easy to produce and the server stays cheap enough to sit behind a client benchmark.

In-process use (tests)::

    with FakeOpenAIServer() as server:            # own event loop in a background thread
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        client.chat.completions.create(model="fake-teacher", messages=[...])
        server.requests[-1].headers["authorization"]  # "Bearer sk-test"
        server.attempts(prompt)                      # requests seen carrying that prompt
        server.counters["status:200"]

Separate process (benchmarks)::

    python tests/fake_openai.py --port 0 --canned-tokens 4000 [--latency-ms 0]

prints its base_url (``http://127.0.0.1:PORT/v1``) as the first stdout line and serves until killed.

Endpoints: ``GET /health`` (200, empty body), ``GET /v1/models`` (the served model),
``POST /v1/chat/completions`` (non-streaming; ``stream: true`` gets 400). Responses have vLLM's
shape: ``choices[i].message`` has ``role``, ``content`` and, depending on the placement, ``reasoning``
or ``reasoning_content``; ``logprobs`` is null or ``{"content": [{token, logprob, bytes,
top_logprobs: [...]}]}``; ``usage`` has ``completion_tokens_details.reasoning_tokens`` when the
reasoning is in a field. ``n``, ``max_tokens`` / ``max_completion_tokens`` (truncate, finish_reason
"length"), ``logprobs`` + ``top_logprobs`` (k entries per token, sorted descending, the sampled
token among them) and vLLM's ``return_tokens_as_token_ids`` (SDK ``extra_body``; tokens rendered
as ``"token_id:<id>"``) are honoured.

Tokens are the whitespace-separated words of the completion (reasoning words, then content words;
with ``[reasoning:tags]`` the ``<think>`` and ``</think>`` markers are words too), so
``usage.completion_tokens == len(logprobs.content)`` and, without token ids,
``[t.token for t in logprobs.content] == (reasoning or "").split() + (content or "").split()``.
A token's id is ``token_id(word)`` (crc32 of the word mod 50000). Output is deterministic: it
depends only on ``messages``, ``seed`` and the choice index (``max_tokens`` truncates a prefix of
the same text; asking for logprobs does not change the text).

The completion looks like an R1 trace: reasoning ``"Let me think step by step. ..."`` and content
``"The answer is \\boxed{ANSWER}."``, ANSWER from ``[answer:...]`` or else a hash of the prompt
with its directives removed (a number below 1000).

Directives, embedded anywhere in the text of the LAST user message (``Script.directives`` is
prepended to every prompt as server-wide defaults; for single-valued directives the last one wins):

==================================  ===============================================================
``[reasoning:field]``               reasoning in ``message.reasoning`` (vLLM 0.3x; the default)
``[reasoning:content_field]``       reasoning in ``message.reasoning_content`` (DeepSeek API, SGLang)
``[reasoning:tags]``                inline ``<think>\\n...\\n</think>\\n\\n`` at the start of content
``[reasoning:none]``                no reasoning anywhere: content is the steps and the answer
``[tokens:N]``                      completion length in tokens (default 48; raised to fit the answer)
``[answer:X]``                      the boxed answer is X (no ``[`` or ``]`` inside)
``[answers:A|B|C]``                 choice i answers the (i mod 3)-th value (majority-vote tests)
``[finish:length]``                 N tokens of reasoning, no answer, finish_reason "length"
``[finish:repetition]``             reasoning ending in a repeated loop, no answer, "repetition"
``[refuse_n]``                      400 "n>1 is not supported" when the request has n > 1
``[fail:KINDxK(:opt=v)*]``          the first K requests carrying this prompt fail with KIND,
                                    later ones succeed; without ``xK`` every request fails
==================================  ===============================================================

Fault kinds (``KIND``):

=============  ====================================================================================
``429``        429 rate-limit error, ``Retry-After: 1``; ``retry=0.2`` sets the value (fractions ok),
               ``retry=date+2`` sends an HTTP-date 2 s ahead, ``retry=none`` omits it,
               ``retry_ms=150`` adds ``retry-after-ms``
``500``        500 server error (``retry=`` / ``retry_ms=`` optional)
``503``        503 overloaded (``retry=`` / ``retry_ms=`` optional)
``always500``  alias of ``500`` without a count: every request gets 500
``400``        400 context-length error (``code: context_length_exceeded``): not retryable
``drop``       the request is read, then the connection is closed without a response (FIN)
``reset``      the request is read, then the connection is reset (RST)
``partial``    200 headers with the full Content-Length, half the body, then the connection closes
``malformed``  200, ``application/json``, a truncated (invalid JSON) body with a matching length
``slow``       sleep ``secs=S`` seconds (default 1) before a normal answer (client-timeout tests)
=============  ====================================================================================

Several ``[fail:...]`` directives apply in order: ``[fail:429x1][fail:dropx1]`` gives 429, then a
drop, then success. Failures are counted per prompt text (the full text of the last user message,
directives included) in ``Script.state``, whatever the connection; servers built on the same
``Script`` (or with ``state=`` the same ``ScriptState``) share the counts. A malformed directive is
answered with 400 so typos are loud.

Canned mode (``Script(canned_tokens=N)`` / ``--canned-tokens N``) ignores directives and answers every
chat request with a fixed N-token completion, bodies precomputed per ``n``: the server's cost is a
JSON parse of the request and one write, so a client benchmark measures the client.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import email.utils
import hashlib
import itertools
import json
import math
import random
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import zlib
from http import HTTPStatus
from typing import Any

DEFAULT_MODEL = "fake-teacher"
DEFAULT_TOKENS = 48
DEFAULT_RETRY_AFTER = "1"
VOCAB_SIZE = 50000
REASONING_MODES = ("field", "content_field", "tags", "none")
FINISH_REASONS = ("stop", "length", "repetition")
FAULT_KINDS = ("429", "500", "503", "400", "drop", "reset", "partial", "malformed", "slow")

PREFIX = "Let me think step by step.".split()
LOOP = "Wait, let me re-check that step.".split()
FILLER = tuple(
    """we need find the value of x so consider equation both sides then check case first second
    simplify compute sum product term factor divide multiply substitute gives hence therefore note
    that since because try again verify result carefully actually number integer remainder total
    square root prime even odd each step count ways pair""".split()
)

_DIRECTIVE_RE = re.compile(r"\[(reasoning|tokens|answers?|finish|refuse_n|fail)(?::([^\[\]]*))?\]")
_FAULT_RE = re.compile(r"(429|500|503|400|drop|reset|partial|malformed|slow|always500)(?:x(\d+))?")
_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_FAULT_OPTIONS = {
    "retry": re.compile(rf"none|{_NUMBER}|date(?:\+(?:{_NUMBER}))?"),
    "retry_ms": re.compile(_NUMBER),
    "secs": re.compile(_NUMBER),
}
MAX_N = 128


def token_id(word: str) -> int:
    """The fake vocabulary id of a word (stable across processes)."""
    return zlib.crc32(word.encode("utf-8")) % VOCAB_SIZE


# --------------------------------------------------------------------------------------------------
# Directives


class DirectiveError(ValueError):
    """A ``[name:...]`` directive that cannot be parsed."""


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str  # one of FAULT_KINDS
    count: int | None  # the first `count` attempts; None = every attempt
    options: dict[str, str]


@dataclasses.dataclass
class Directives:
    reasoning: str = "field"
    tokens: int = DEFAULT_TOKENS
    answers: tuple[str, ...] = ()
    finish: str = "stop"
    refuse_n: bool = False
    faults: list[Fault] = dataclasses.field(default_factory=list)


def parse_fault(arg: str) -> Fault:
    spec, *opts = arg.split(":")
    match = _FAULT_RE.fullmatch(spec.strip())
    if not match:
        raise DirectiveError(f"unknown fault {arg!r}")
    kind, count = match.group(1), match.group(2)
    options = {}
    for opt in opts:
        key, sep, value = (part.strip() for part in opt.partition("="))
        if not sep or key not in _FAULT_OPTIONS or not _FAULT_OPTIONS[key].fullmatch(value):
            raise DirectiveError(f"bad fault option {opt!r} in [fail:{arg}]")
        options[key] = value
    if kind == "always500":
        return Fault("500", None, options)
    return Fault(kind, int(count) if count is not None else None, options)


def parse_directives(text: str) -> Directives:
    """Parse every directive in ``text``; raise DirectiveError for a malformed one."""
    d = Directives()
    for name, arg in _DIRECTIVE_RE.findall(text):
        arg = arg.strip()
        if name == "reasoning":
            if arg not in REASONING_MODES:
                raise DirectiveError(f"[reasoning:{arg}]: expected one of {REASONING_MODES}")
            d.reasoning = arg
        elif name == "tokens":
            if not arg.isdigit() or int(arg) < 1:
                raise DirectiveError(f"[tokens:{arg}]: expected a positive integer")
            d.tokens = int(arg)
        elif name == "answer":
            d.answers = (arg,)
        elif name == "answers":
            d.answers = tuple(a.strip() for a in arg.split("|"))
        elif name == "finish":
            if arg not in FINISH_REASONS:
                raise DirectiveError(f"[finish:{arg}]: expected one of {FINISH_REASONS}")
            d.finish = arg
        elif name == "refuse_n":
            d.refuse_n = True
        else:
            d.faults.append(parse_fault(arg))
    return d


def strip_directives(text: str) -> str:
    return _DIRECTIVE_RE.sub("", text).strip()


def pick_fault(faults: list[Fault], attempt: int) -> Fault | None:
    """The fault for the attempt-th (0-based) request with this prompt, or None to succeed."""
    for fault in faults:
        if fault.count is None or attempt < fault.count:
            return fault
        attempt -= fault.count
    return None


class ScriptState:
    """Per-prompt attempt counts; thread-safe, shareable between servers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def next_attempt(self, prompt: str) -> int:
        """Count one more request with ``prompt``; return how many came before it."""
        with self._lock:
            n = self._counts[prompt]
            self._counts[prompt] = n + 1
            return n

    def attempts(self, prompt: str) -> int:
        with self._lock:
            return self._counts[prompt]

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


@dataclasses.dataclass
class Script:
    """What a server does. Share one Script (or one ScriptState) between servers to share counts."""

    model: str = DEFAULT_MODEL  # served model name (/v1/models); responses echo the request's model
    directives: str = ""  # directive text prepended to every prompt (server-wide defaults)
    canned_tokens: int | None = None  # canned mode: fixed completion of this many tokens
    latency_s: float = 0.0  # added before every chat completion answer
    api_key: str | None = None  # when set, /v1/* without "Authorization: Bearer <key>" gets 401
    strict_model: bool = False  # 404 for a model other than `model`, like vLLM
    max_logprobs: int = 20  # vLLM's --max-logprobs
    record_limit: int | None = None  # keep only the last N request records (None: all)
    state: ScriptState = dataclasses.field(default_factory=ScriptState)


# --------------------------------------------------------------------------------------------------
# Completions

Piece = tuple[str, str, bool]  # (separator before the word, word, belongs to the reasoning field)


def _rng(*parts: Any) -> random.Random:
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return random.Random(int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big"))


def reasoning_words(rng: random.Random, count: int, loop: bool = False) -> list[str]:
    """``count`` words of fake chain of thought; with ``loop`` its second half repeats LOOP."""
    words = list(PREFIX)
    target = max(count // 2, 1) if loop else count
    while len(words) < target:
        sentence = [rng.choice(FILLER) for _ in range(rng.randint(5, 11))]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        words.extend(sentence)
    words = words[:target]
    if not words[-1].endswith("."):
        words[-1] += "."
    if loop:
        words.extend(itertools.islice(itertools.cycle(LOOP), count - len(words)))
    return words


def answer_words(answer: str) -> list[str]:
    return f"The answer is \\boxed{{{answer}}}.".split()


def build_pieces(mode: str, reasoning: list[str], content: list[str], closed: bool = True) -> list[Piece]:
    """Lay out reasoning and content words as tokens for a reasoning placement."""
    in_field = mode in ("field", "content_field")
    pieces: list[Piece] = []
    if mode == "tags":
        pieces.append(("", "<think>", False))
    pieces += [("\n" if mode == "tags" and i == 0 else " ", w, in_field) for i, w in enumerate(reasoning)]
    if not closed:
        return pieces
    if mode == "tags":
        pieces.append(("\n", "</think>", False))
    pieces += [("\n\n" if i == 0 else " ", w, False) for i, w in enumerate(content)]
    return pieces


def join_pieces(pieces: list[Piece]) -> str | None:
    text = "".join(sep + word for sep, word, _ in pieces).lstrip()
    return text or None


def completion_pieces(d: Directives, answer: str, rng: random.Random) -> tuple[list[Piece], str]:
    """The untruncated tokens of one choice and its natural finish_reason."""
    tags = 1 if d.reasoning == "tags" else 0
    if d.finish in ("length", "repetition"):
        words = reasoning_words(rng, max(d.tokens - tags, 1), loop=d.finish == "repetition")
        return build_pieces(d.reasoning, words, [], closed=False), d.finish
    content = answer_words(answer)
    count = max(d.tokens - len(content) - 2 * tags, 1)
    return build_pieces(d.reasoning, reasoning_words(rng, count), content), "stop"


def token_logprob(word: str, k: int, as_ids: bool, rng: random.Random) -> dict[str, Any]:
    """One ``logprobs.content`` entry: k alternatives sorted descending, the sampled one included."""
    width = max(k, 1)
    p0 = 0.5 + 0.49 * rng.random()
    probs = [p0] + [(1.0 - p0) * 0.5**i for i in range(1, width)]
    rank = 1 if width >= 2 and rng.random() < 0.15 else 0
    others = [w for w in rng.sample(FILLER, width) if w != word][: width - 1]
    words = others[:rank] + [word] + others[rank:]

    def entry(w: str, p: float) -> dict[str, Any]:
        tok = f"token_id:{token_id(w)}" if as_ids else w
        return {"token": tok, "logprob": math.log(p), "bytes": list(tok.encode("utf-8"))}

    sampled = entry(word, probs[rank])
    sampled["top_logprobs"] = [entry(w, p) for w, p in zip(words, probs, strict=True)][:k]
    return sampled


def render_choice(
    index: int,
    pieces: list[Piece],
    mode: str,
    finish: str,
    logprobs: tuple[int, bool] | None,
    rng: random.Random,
) -> dict[str, Any]:
    reasoning = join_pieces([p for p in pieces if p[2]])
    message: dict[str, Any] = {"role": "assistant", "content": join_pieces([p for p in pieces if not p[2]])}
    if mode == "field":
        message["reasoning"] = reasoning
    elif mode == "content_field":
        message["reasoning_content"] = reasoning
    message.update(refusal=None, tool_calls=[])
    lp = None
    if logprobs is not None:
        k, as_ids = logprobs
        lp = {"content": [token_logprob(word, k, as_ids, rng) for _, word, _ in pieces]}
    return {"index": index, "message": message, "logprobs": lp, "finish_reason": finish, "stop_reason": None}


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message)
    return ""


def default_answer(prompt: str) -> str:
    digest = hashlib.blake2b(strip_directives(prompt).encode("utf-8"), digest_size=4).digest()
    return str(int.from_bytes(digest, "big") % 1000)


def chat_completion(body: dict[str, Any], d: Directives, req_id: str, model: str) -> dict[str, Any]:
    """A full chat.completion object for a validated request."""
    messages = body["messages"]
    prompt = last_user_text(messages)
    answers = d.answers or (default_answer(prompt),)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    logprobs = (
        (int(body.get("top_logprobs") or 0), bool(body.get("return_tokens_as_token_ids")))
        if body.get("logprobs")
        else None
    )
    choices, completion_tokens, reasoning_tokens = [], 0, 0
    for index in range(int(body.get("n") or 1)):
        pieces, finish = completion_pieces(
            d, answers[index % len(answers)], _rng(messages, body.get("seed"), index)
        )
        if limit is not None and len(pieces) > limit:
            pieces, finish = pieces[:limit], "length"
        rng = _rng(messages, body.get("seed"), index, "logprobs")
        choices.append(render_choice(index, pieces, d.reasoning, finish, logprobs, rng))
        completion_tokens += len(pieces)
        reasoning_tokens += sum(p[2] for p in pieces)
    prompt_tokens = sum(len(message_text(m).split()) for m in messages if isinstance(m, dict))
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": None,
    }
    if d.reasoning in ("field", "content_field"):
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return {
        "id": req_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
        "system_fingerprint": None,
        "prompt_logprobs": None,
    }


# --------------------------------------------------------------------------------------------------
# Replies


@dataclasses.dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    action: str = "send"  # send | drop | reset | partial
    delay: float = 0.0
    fault: str | None = None


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def error_reply(status: int, message: str, type_: str, code: Any = None, param: str | None = None) -> Reply:
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""
    error = {"message": message, "type": type_, "param": param, "code": code if code is not None else status}
    return Reply(status, dumps({"error": error}))


def bad_request(message: str, param: str | None = None) -> Reply:
    return error_reply(400, message, "BadRequestError", param=param)


def retry_headers(fault: Fault) -> list[tuple[str, str]]:
    retry = fault.options.get("retry", DEFAULT_RETRY_AFTER if fault.kind == "429" else "none")
    headers = []
    if retry.startswith("date"):
        delay = float(retry[5:] or 0)
        headers.append(("retry-after", email.utils.formatdate(time.time() + delay, usegmt=True)))
    elif retry != "none":
        headers.append(("retry-after", retry))
    if "retry_ms" in fault.options:
        headers.append(("retry-after-ms", fault.options["retry_ms"]))
    return headers


def fault_error(fault: Fault) -> Reply | None:
    """The error reply of an error-status fault (None for the connection-level kinds)."""
    if fault.kind == "429":
        reply = error_reply(
            429,
            "Rate limit reached for requests (injected by fake_openai).",
            "requests",
            "rate_limit_exceeded",
        )
    elif fault.kind == "500":
        reply = error_reply(500, "Internal server error (injected by fake_openai).", "server_error", None)
    elif fault.kind == "503":
        reply = error_reply(503, "The server is overloaded or not ready yet.", "server_error", None)
    elif fault.kind == "400":
        message = (
            "This model's maximum context length is 4096 tokens. However, you requested 8192 tokens "
            "(4096 in the messages, 4096 in the completion). Please reduce the length of the messages "
            "or completion."
        )
        reply = error_reply(400, message, "invalid_request_error", "context_length_exceeded", "messages")
    else:
        return None
    reply.headers = retry_headers(fault)
    return reply


def validate_chat(body: Any, d: Directives | None, script: Script) -> Reply | None:
    """A 400/404 reply for an invalid request (None when valid)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        return bad_request("'messages' must be a non-empty list", "messages")
    if body.get("stream"):
        return bad_request("streaming is not supported by the fake server", "stream")
    n = body.get("n") if body.get("n") is not None else 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        return bad_request(f"n must be an integer from 1 to {MAX_N}", "n")
    if d is not None and d.refuse_n and n > 1:
        return bad_request("n>1 is not supported", "n")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return bad_request(f"{key} must be at least 1, got {value!r}.", key)
    k = body.get("top_logprobs")
    if k is not None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            return bad_request("top_logprobs must be a non-negative integer", "top_logprobs")
        if not body.get("logprobs"):
            return bad_request("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
        if k > script.max_logprobs:
            return bad_request(f"Requested top_logprobs={k} exceeds max_logprobs={script.max_logprobs}.")
    if script.strict_model and body.get("model") != script.model:
        return error_reply(
            404, f"The model `{body.get('model')}` does not exist.", "NotFoundError", param="model"
        )
    return None


# --------------------------------------------------------------------------------------------------
# HTTP


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class HttpRequest:
    method: str
    path: str
    version: str
    headers: dict[str, str]
    body: bytes

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One received request, as ``FakeOpenAIServer.requests`` lists it."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, None when absent or not JSON
    raw_body: bytes
    time: float  # time.time() when the request had been read
    monotonic: float
    port: int  # the server's port
    connection: int  # per-server connection number (1, 2, ...)
    prompt: str | None  # text of the last user message (chat requests)
    status: int | None  # the status answered; None when dropped/reset
    fault: str | None  # the injected fault kind, if any

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise HttpError(400, "bad chunk size") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks)
            chunks.append((await reader.readexactly(size + 2))[:-2])
    length = headers.get("content-length")
    if length is None:
        return b""
    if not length.strip().isdigit():
        raise HttpError(400, "bad content-length")
    return await reader.readexactly(int(length))


async def read_request(reader: asyncio.StreamReader) -> HttpRequest | None:
    """The next request on a connection, or None at a clean end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        raise HttpError(431, "request head too large") from None
    lines = head[:-4].decode("latin-1").lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "bad request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpError(400, "bad header line")
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    body = await read_body(reader, headers)
    return HttpRequest(parts[0].upper(), parts[1].split("?", 1)[0], parts[2], headers, body)


def response_head(status: int, headers: list[tuple[str, str]], length: int, close: bool) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [f"HTTP/1.1 {status} {phrase}", "server: fake-openai", "content-type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"content-length: {length}")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# --------------------------------------------------------------------------------------------------
# Server


class FakeOpenAIServer:
    """The fake server; ``with FakeOpenAIServer(...) as s:`` runs it on a background thread.

    ``script`` is a Script (None: a new one from ``script_kwargs``, e.g. ``canned_tokens=4000``;
    both: a copy of ``script`` with those fields replaced, sharing its state).
    """

    def __init__(
        self, script: Script | None = None, host: str = "127.0.0.1", port: int = 0, **script_kwargs: Any
    ):
        if script is None:
            script = Script(**script_kwargs)
        elif script_kwargs:
            script = dataclasses.replace(script, **script_kwargs)
        self.script = script
        self.host, self.port = host, port
        self._lock = threading.Lock()
        self._records: collections.deque[RequestRecord] = collections.deque(maxlen=script.record_limit)
        self._counters: collections.Counter[str] = collections.Counter()
        self._conn_ids = itertools.count(1)
        self._req_ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(8)
        self._canned: dict[int, tuple[bytes, bytes]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._startup_error: BaseException | None = None

    # ---- public API

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the received requests, oldest first."""
        with self._lock:
            return list(self._records)

    def chat_requests(self) -> list[RequestRecord]:
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

    @property
    def counters(self) -> collections.Counter[str]:
        """A snapshot: "requests", "chat_requests", "connections", "status:<code>", "fault:<kind>",
        "completion_tokens"; missing keys read 0."""
        with self._lock:
            return collections.Counter(self._counters)

    def attempts(self, prompt: str) -> int:
        """How many chat requests carrying ``prompt`` (last user message) the script has seen."""
        return self.script.state.attempts(prompt)

    def reset(self) -> None:
        """Forget records, counters and the script's per-prompt counts."""
        with self._lock:
            self._records.clear()
            self._counters.clear()
        self.script.state.reset()

    def start(self) -> FakeOpenAIServer:
        if self._thread is not None:
            return self
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="fake-openai", daemon=True)
        self._thread.start()
        ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise self._startup_error
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- event loop thread

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._on_connection, self.host, self.port, limit=1 << 20, backlog=1024)
            )
        except BaseException as exc:  # e.g. address in use: re-raised by start()
            self._startup_error = exc
            loop.close()
            ready.set()
            return
        self.port = self._server.sockets[0].getsockname()[1]
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = next(self._conn_ids)
        self._count("connections")
        try:
            while True:
                try:
                    request = await read_request(reader)
                except HttpError as exc:
                    reply = error_reply(exc.status, str(exc), "BadRequestError")
                    writer.write(response_head(reply.status, [], len(reply.body), True) + reply.body)
                    await writer.drain()
                    break
                if request is None or not await self._execute(
                    self._safe_handle(request, conn), request, writer
                ):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # stop(): end quietly (asyncio logs a cancelled handler task)
            pass
        finally:
            self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()

    async def _execute(self, reply: Reply, request: HttpRequest, writer: asyncio.StreamWriter) -> bool:
        """Carry out a reply; return whether the connection stays open."""
        if reply.delay > 0:
            await asyncio.sleep(reply.delay)
        if reply.action == "drop":
            writer.close()
            return False
        if reply.action == "reset":
            abort_with_rst(writer)
            return False
        keep = request.keep_alive and reply.action == "send"
        head = response_head(reply.status, reply.headers, len(reply.body), not keep)
        if reply.action == "partial":
            writer.write(head + reply.body[: len(reply.body) // 2])
            await writer.drain()
            writer.close()
            return False
        writer.write(head + reply.body)
        await writer.drain()
        return keep

    # ---- request handling (synchronous, on the loop thread)

    def _count(self, *keys: str, amount: int = 1) -> None:
        with self._lock:
            for key in keys:
                self._counters[key] += amount

    def _safe_handle(self, request: HttpRequest, conn: int) -> Reply:
        try:
            return self._handle(request, conn)
        except Exception as exc:  # a bug here: answer loudly rather than hang the client
            traceback.print_exc()
            return error_reply(500, f"fake_openai internal error: {exc!r}", "InternalServerError")

    def _handle(self, request: HttpRequest, conn: int) -> Reply:
        arrived, arrived_mono = time.time(), time.monotonic()
        body: Any = None
        if request.body:
            try:
                body = json.loads(request.body)
            except ValueError:
                body = None
        prompt = None
        if (
            self.script.api_key
            and request.path.startswith("/v1/")
            and (request.headers.get("authorization") != f"Bearer {self.script.api_key}")
        ):
            reply = Reply(401, dumps({"error": "Unauthorized"}))
        elif request.path == "/health":
            reply = Reply(200) if request.method == "GET" else Reply(405)
        elif request.path == "/v1/models":
            reply = Reply(200, self._models_body()) if request.method == "GET" else Reply(405)
        elif request.path == "/v1/chat/completions":
            if request.method != "POST":
                reply = Reply(405)
            elif self.script.canned_tokens is not None:
                reply = self._canned_reply(body)
            else:
                prompt = (
                    last_user_text(body["messages"])
                    if isinstance(body, dict) and isinstance(body.get("messages"), list)
                    else None
                )
                reply = self._chat_reply(body, prompt)
            if self.script.latency_s > 0:
                reply.delay += self.script.latency_s
        else:
            reply = error_reply(404, f"no route for {request.method} {request.path}", "NotFoundError")
        record = RequestRecord(
            request.method, request.path, request.headers, body, request.body, arrived, arrived_mono,
            self.port, conn, prompt, None if reply.action in ("drop", "reset") else reply.status, reply.fault,
        )  # fmt: skip
        with self._lock:
            self._records.append(record)
            self._counters["requests"] += 1
            if request.path == "/v1/chat/completions":
                self._counters["chat_requests"] += 1
            if record.status is not None:
                self._counters[f"status:{record.status}"] += 1
            if reply.fault:
                self._counters[f"fault:{reply.fault}"] += 1
        return reply

    def _models_body(self) -> bytes:
        model = {"id": self.script.model, "object": "model", "created": 0, "owned_by": "fake-openai",
                 "root": self.script.model, "parent": None, "max_model_len": 32768}  # fmt: skip
        return dumps({"object": "list", "data": [model]})

    def _new_id(self) -> str:
        return f"chatcmpl-{self._id_prefix}{next(self._req_ids):016x}"

    def _chat_reply(self, body: Any, prompt: str | None) -> Reply:
        if prompt is None:
            return validate_chat(body, None, self.script) or bad_request("no user message", "messages")
        attempt = self.script.state.next_attempt(prompt)
        try:
            d = parse_directives(self.script.directives + "\n" + prompt)
        except DirectiveError as exc:
            return bad_request(f"fake_openai: {exc}")
        fault = pick_fault(d.faults, attempt)
        if fault is not None and (reply := fault_error(fault)) is not None:
            reply.fault = fault.kind
            return reply
        invalid = validate_chat(body, d, self.script)
        if invalid is not None:
            return invalid
        response = chat_completion(body, d, self._new_id(), body.get("model") or self.script.model)
        self._count("completion_tokens", amount=response["usage"]["completion_tokens"])
        reply = Reply(200, dumps(response))
        if fault is not None:
            reply.fault = fault.kind
            if fault.kind in ("drop", "reset", "partial"):
                reply.action = fault.kind
            elif fault.kind == "malformed":
                reply.body = reply.body[: len(reply.body) // 2]
            elif fault.kind == "slow":
                reply.delay = float(fault.options.get("secs", 1.0))
        return reply

    def _canned_reply(self, body: Any) -> Reply:
        n = body.get("n") if isinstance(body, dict) else None
        n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
        if n not in self._canned:
            self._canned[n] = self._build_canned(n)
        before, after = self._canned[n]
        return Reply(200, before + self._new_id().encode("ascii") + after)

    def _build_canned(self, n: int) -> tuple[bytes, bytes]:
        """The response body for n choices, split around its id."""
        d = Directives(tokens=self.script.canned_tokens or 1, answers=("42",))
        body = {"model": self.script.model, "n": n, "messages": [{"role": "user", "content": "canned"}]}
        placeholder = "\x00ID\x00"
        data = dumps(chat_completion(body, d, placeholder, self.script.model))
        before, after = data.split(dumps(placeholder)[1:-1], 1)
        return before, after


# --------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fake OpenAI-compatible teacher server (prints base_url first)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument(
        "--canned-tokens", type=int, default=None, help="canned mode: fixed N-token completions"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every chat answer")
    parser.add_argument("--directives", default="", help="default directives for every prompt")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--record-limit", type=int, default=1000, help="request records kept in memory")
    args = parser.parse_args(argv)
    script = Script(
        model=args.model, directives=args.directives, canned_tokens=args.canned_tokens,
        latency_s=args.latency_ms / 1000.0, api_key=args.api_key, record_limit=args.record_limit,
    )  # fmt: skip
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # the server thread inherits the mask
    with FakeOpenAIServer(script, host=args.host, port=args.port) as server:
        print(server.base_url, flush=True)
        signal.sigwait(stop_signals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
