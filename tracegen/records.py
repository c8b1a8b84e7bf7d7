"""The trace and logprob record schemas (documented in data/README.md), their keys, and reasoning splitting.

Everything that decides a teacher's output goes into the request key, so a rerun of the same command
finds its finished work and a changed setting never mixes with old traces.
"""

import hashlib
import json
import math
import re
from dataclasses import dataclass

import pyarrow as pa

TRACE_SCHEMA = pa.schema([
    ("trace_id", pa.string()),
    ("request_key", pa.string()),
    ("problem_id", pa.string()),
    ("sample_index", pa.int32()),
    ("model", pa.string()),
    ("messages", pa.string()),  # JSON list of {"role", "content"}: the prompt exactly as sent
    ("reasoning", pa.string()),
    ("content", pa.string()),
    ("reasoning_source", pa.string()),  # "field" | "think_tags" | "none"
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
    ("reasoning_tokens", pa.int32()),
    ("latency_s", pa.float32()),
    ("attempts", pa.int32()),
    ("error", pa.string()),  # null, or the final error of a request that gave up
    ("sampling", pa.string()),  # JSON of the effective parameters
    ("created_at", pa.timestamp("ms", tz="UTC")),
])

LOGPROB_SCHEMA = pa.schema([
    ("trace_id", pa.string()),
    ("token_ids", pa.list_(pa.int32())),
    ("logprobs", pa.list_(pa.float32())),
    ("top_ids", pa.list_(pa.list_(pa.int32()))),
    # float16: ~3 decimal digits are plenty for KD targets and halve the side table (3.7 bytes per top-k
    # entry with zstd, measured on the toy teacher's logprobs, vs 8.6 with float32).
    ("top_logprobs", pa.list_(pa.list_(pa.float16()))),
    # log of the mass outside the listed entries, per position, computed before any rounding: rebuilt later
    # as 1 - sum(float16 top-k), it rounds to 0 or to twice the truth for a peaked teacher (a KD loss floor)
    ("rest_logprobs", pa.list_(pa.float16())),
    ("prompt_token_ids", pa.list_(pa.int32())),  # the prompt as the teacher saw it (sft checks its own)
])


# The problems a run was asked about, as tracegen validated them (tests and meta as JSON text), so a run
# directory is self-contained: filter reads gold answers and tests from here, not from the original source.
PROBLEM_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("domain", pa.string()),
    ("prompt", pa.string()),
    ("answer", pa.string()),
    ("tests", pa.string()),
    ("source", pa.string()),
    ("meta", pa.string()),
])


def problem_row(problem: dict) -> dict:
    as_json = lambda v: None if v is None else json.dumps(v, sort_keys=True, ensure_ascii=False)  # noqa: E731
    return {**problem, "tests": as_json(problem["tests"]), "meta": as_json(problem["meta"])}


def source_key(source: dict) -> str:
    """Names a problem source (file or dataset, split, column map...): its problems file in the run."""
    return _digest(source)[:16]


def _digest(obj) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def request_key(messages: list[dict], model: str, endpoint: str, sampling: dict) -> str:
    """Hash of everything that decides the output. `n` is not part of it: sample i of a problem is the
    same trace whether it was asked for alone or among n, so raising n later only adds samples."""
    return _digest({"messages": messages, "model": model, "endpoint": endpoint, "sampling": sampling})


def trace_id(key: str, problem_id: str, sample_index: int) -> str:
    """Unique per sample: two problems with the same text (duplicates exist in real datasets) share a
    request key but never a trace id."""
    return _digest([key, problem_id, sample_index])


_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)


def split_reasoning(message: dict) -> tuple[str | None, str | None, str]:
    """(reasoning, content, reasoning_source) from a chat-completion message.

    Order: `reasoning` (vLLM 0.3x), `reasoning_content` (DeepSeek API, SGLang, older vLLM), then
    `<think>...</think>` in the content. A content that has `</think>` but no opening tag is a model whose
    chat template already emitted `<think>` in the prompt; an unclosed `<think>` is a truncated trace.
    """
    content = message.get("content")
    for name in ("reasoning", "reasoning_content"):
        if message.get(name):
            return message[name], content, "field"
    if content and ("<think>" in content or "</think>" in content):
        if "<think>" not in content:
            reasoning, _, answer = content.partition("</think>")
            return reasoning.strip("\n"), answer.lstrip("\n"), "think_tags"
        match = _THINK.search(content)
        answer = content[match.end():].lstrip("\n")
        return match.group(1).strip("\n"), answer, "think_tags"
    return None, content, "none"


@dataclass
class Sample:
    """One choice of a response, or a failed request's placeholder (error set)."""
    reasoning: str | None = None
    content: str | None = None
    reasoning_source: str = "none"
    finish_reason: str | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    rest_logprobs: list[float] | None = None


@dataclass
class Response:
    samples: list[Sample]
    model: str | None = None
    prompt_tokens: int | None = None
    prompt_token_ids: list[int] | None = None
    latency_s: float = 0.0
    attempts: int = 0
    error: str | None = None


def logprob_row(trace: str, sample: Sample, response: Response) -> dict:
    """A LOGPROB_SCHEMA row. `rest_logprobs` comes from the engine (exact, from the full distribution) or else
    from the listed entries as the server sent them (float32 values summed in float64: the rest mass is then
    known to about 1e-7, the server's own rounding)."""
    rest = sample.rest_logprobs
    if rest is None and sample.top_logprobs is not None:
        rest = [rest_logprob(ids, values) for ids, values in zip(sample.top_ids, sample.top_logprobs, strict=True)]
    return {"trace_id": trace, "token_ids": sample.token_ids, "logprobs": sample.logprobs, "top_ids": sample.top_ids,
            "top_logprobs": sample.top_logprobs, "rest_logprobs": rest, "prompt_token_ids": response.prompt_token_ids}


def rest_logprob(ids: list[int], logprobs: list[float]) -> float:
    """log(1 - the mass of the listed entries), each id counted once (vLLM may list the sampled token twice);
    -inf when they hold it all (or, by the server's rounding, a little more)."""
    listed = dict(zip(ids, logprobs, strict=True)).values()
    total = math.fsum(math.exp(x) for x in listed)
    return math.log1p(-total) if total < 1.0 else -math.inf
