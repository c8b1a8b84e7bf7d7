"""The HTTP engine: chat completions from any OpenAI-compatible server (vLLM, SGLang, DeepSeek, OpenAI...).

One `AsyncOpenAI` client per base URL (SDK retries off: retries are ours, so they are counted and honour
Retry-After), least-busy balancing across them, and per-request retries with exponential backoff and
jitter on 429, 5xx, dropped connections, timeouts and malformed bodies. A request that still fails becomes
samples with `error` set; `finish_reason` "length"/"repetition" are outcomes, never retried. Error texts
carry the server's message with every secret replaced by *** (tracegen/secrets.py): a server may echo the key.
`prompt_logprobs` scores given token ids through /v1/completions (the teacher of sft's kd: on_policy) with the
same retries and balancing (`call`), raising RequestFailed instead of recording a failed sample.
"""

import asyncio
import email.utils
import json
import logging
import random
import time

import httpx
import openai

from tracegen.records import Response, Sample, split_reasoning
from tracegen.secrets import Redactor, public_url

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 524, 529}
# Errors no retry can fix: the whole job is misconfigured, so it stops instead of failing every request.
FATAL_STATUS = {401: "api_key_env", 403: "api_key_env", 404: "model / base_url"}


class FatalEndpointError(RuntimeError):
    """The endpoint refuses every request (bad key, unknown model): the message names the setting."""


class MalformedResponse(Exception):
    pass


class RequestFailed(Exception):
    """A request that still failed when its retries were spent (or at once, on a status no retry can fix)."""

    def __init__(self, error: str, attempts: int):
        super().__init__(error)
        self.error, self.attempts = error, attempts


class HttpEngine:
    def __init__(self, cfg, clients: list[openai.AsyncOpenAI]):
        self.cfg = cfg
        self.clients = clients
        self.in_flight = [0] * len(clients)
        self.redact = Redactor(cfg.secrets())

    async def generate(self, messages: list[dict], n: int) -> Response:
        """n samples for one prompt, with retries; never raises for a per-request failure."""
        body = self._body(messages, n)
        start = time.monotonic()

        async def send(client):
            raw = await client.chat.completions.with_raw_response.create(**body)
            return parse_response(raw.content, n, self.cfg.top_logprobs, self.cfg.max_tokens)

        try:
            response, attempts = await self.call(send)
        except RequestFailed as e:
            return self.failed(n, e.error, attempts=e.attempts, latency_s=time.monotonic() - start)
        response.latency_s, response.attempts = time.monotonic() - start, attempts
        return response

    async def prompt_logprobs(self, token_ids: list[int], k: int) -> list[dict | None]:
        """vLLM's `prompt_logprobs` of a token-id prompt (position 0: None; then {token id: {logprob, rank}}: the k
        most likely tokens and the prompt's own), from /v1/completions, with the retries of `call` (which raises)."""
        async def send(client):
            raw = await client.completions.with_raw_response.create(
                model=self.cfg.model, prompt=token_ids, max_tokens=1, temperature=1.0, extra_body={"prompt_logprobs": k})
            return parse_prompt_logprobs(raw.content, len(token_ids))

        return (await self.call(send))[0]

    async def call(self, send):
        """(send(client), attempts) through the retries, on the least busy client. Raises FatalEndpointError for
        what no retry can fix and RequestFailed (with the last error) when the retries are spent."""
        last, error = None, None
        for attempt in range(1, self.cfg.max_retries + 2):
            index = self._pick(avoid=last)
            self.in_flight[index] += 1
            try:
                return await send(self.clients[index]), attempt
            except openai.APIStatusError as e:
                if e.status_code in FATAL_STATUS:
                    raise FatalEndpointError(
                        f"{public_url(str(self.clients[index].base_url))}: HTTP {e.status_code} "
                        f"{self._message(e)} (check {FATAL_STATUS[e.status_code]})") from None
                error = f"HTTP {e.status_code}: {self._message(e)}"
                if e.status_code not in RETRY_STATUS:
                    break
                delay = _retry_after(e.response) or self._backoff(attempt)
            except (openai.APIConnectionError, MalformedResponse) as e:  # timeouts are connection errors too
                error = self.redact(f"{type(e).__name__}: {e}")
                delay = self._backoff(attempt)
            finally:
                self.in_flight[index] -= 1
            last = index
            if attempt <= self.cfg.max_retries:
                log.debug("retrying in %.1fs after %s", delay, error)
                await asyncio.sleep(delay)
        raise RequestFailed(error, attempt)

    @staticmethod
    def failed(n: int, error: str, attempts: int = 0, latency_s: float = 0.0) -> Response:
        return Response(samples=[Sample() for _ in range(n)], latency_s=latency_s, attempts=attempts, error=error)

    def _message(self, e: openai.APIStatusError) -> str:
        """The server's error message, secrets masked before it is cut to length (a cut could split one)."""
        body = e.body if isinstance(e.body, dict) else {}
        inner = body.get("error") if isinstance(body.get("error"), dict) else {}
        return self.redact(str(body.get("message") or inner.get("message") or e.message or ""))[:300]

    def _body(self, messages: list[dict], n: int) -> dict:
        cfg = self.cfg
        body = {"model": cfg.model, "messages": messages, "n": n, "temperature": cfg.temperature,
                "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
        if cfg.seed is not None:
            body["seed"] = cfg.seed
        extra = dict(cfg.extra_body or {})
        if cfg.top_logprobs:
            body["logprobs"], body["top_logprobs"] = True, cfg.top_logprobs
            extra["return_tokens_as_token_ids"] = True  # ids straight from the server, never re-tokenized
        if cfg.wants_token_ids:
            extra["return_token_ids"] = True
        if cfg.chat_template_kwargs:
            extra["chat_template_kwargs"] = cfg.chat_template_kwargs
        if extra:
            body["extra_body"] = extra
        return body

    def _pick(self, avoid: int | None) -> int:
        """The least busy client; after a failure, another one when there is a choice."""
        order = sorted(range(len(self.clients)), key=lambda i: (i == avoid, self.in_flight[i], random.random()))
        return order[0]

    def _backoff(self, attempt: int) -> float:
        cap = min(self.cfg.retry_max_backoff_s, self.cfg.retry_backoff_s * 2 ** (attempt - 1))
        return random.uniform(cap / 2, cap)


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from Retry-After (seconds or an HTTP date) or retry-after-ms, with a little jitter."""
    headers = response.headers
    seconds = None
    if "retry-after-ms" in headers:
        try:
            seconds = float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    if seconds is None and "retry-after" in headers:
        value = headers["retry-after"]
        try:
            seconds = float(value)
        except ValueError:
            date = email.utils.parsedate_to_datetime(value) if value else None
            seconds = date.timestamp() - time.time() if date else None
    if seconds is None:
        return None
    return max(0.0, seconds) * random.uniform(1.0, 1.1) + 0.01


def parse_response(content: bytes, n: int, top_logprobs: int, max_tokens: int) -> Response:
    """A chat-completion body -> Response. Raises MalformedResponse for anything that is not one."""
    try:
        data = json.loads(content)
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        usage = data.get("usage") or {}
        samples = [_sample(c, top_logprobs) for c in choices]
        prompt_ids = data.get("prompt_token_ids")  # vLLM's, with return_token_ids
        prompt_ids = None if prompt_ids is None else [int(t) for t in prompt_ids]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MalformedResponse(f"malformed response body ({type(e).__name__}: {e})") from None
    if len(samples) != n:
        raise MalformedResponse(f"asked for n={n} samples, the server returned {len(samples)}")
    if n == 1:  # usage counts all choices together, so it is per-sample only when there is one
        samples[0].completion_tokens = samples[0].completion_tokens or usage.get("completion_tokens")
        details = usage.get("completion_tokens_details") or {}
        samples[0].reasoning_tokens = details.get("reasoning_tokens")
    return Response(samples=samples, model=data.get("model"), prompt_tokens=usage.get("prompt_tokens"),
                    prompt_token_ids=prompt_ids)


def parse_prompt_logprobs(content: bytes, length: int) -> list[dict | None]:
    """A completions body -> its first choice's prompt_logprobs, one entry per prompt token (None, then {token id:
    {"logprob", "rank"}}). Raises MalformedResponse for anything else, a list of another length included."""
    try:
        entries = json.loads(content)["choices"][0]["prompt_logprobs"]
        entries = [None if e is None else {int(t): v for t, v in e.items()} for e in entries]
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise MalformedResponse(f"malformed prompt_logprobs body ({type(e).__name__}: {e})") from None
    if len(entries) != length:
        raise MalformedResponse(f"sent a prompt of {length} tokens, the server returned prompt_logprobs for "
                                f"{len(entries)}: it did not score the token ids as sent")
    return entries


def _sample(choice: dict, top_logprobs: int) -> Sample:
    reasoning, content, source = split_reasoning(choice["message"])
    sample = Sample(reasoning=reasoning, content=content, reasoning_source=source,
                    finish_reason=choice.get("finish_reason"))
    token_ids = choice.get("token_ids")
    if top_logprobs:
        entries = (choice.get("logprobs") or {}).get("content")
        if entries is None:
            raise MalformedResponse("top_logprobs was asked for, the response has no logprobs")
        sample.token_ids = [_token_id(e["token"]) for e in entries]
        sample.logprobs = [float(e["logprob"]) for e in entries]
        sample.top_ids = [[_token_id(t["token"]) for t in e["top_logprobs"]] for e in entries]
        sample.top_logprobs = [[float(t["logprob"]) for t in e["top_logprobs"]] for e in entries]
        if token_ids is not None and token_ids != sample.token_ids:
            raise MalformedResponse("token_ids and logprob tokens disagree")
    if token_ids is not None:
        sample.completion_tokens = len(token_ids)
    elif sample.token_ids is not None:
        sample.completion_tokens = len(sample.token_ids)
    return sample


def _token_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise MalformedResponse(
            f"logprob token {token[:20]!r} is text, not 'token_id:N': the server ignored "
            "return_tokens_as_token_ids (top_logprobs needs a vLLM-compatible server)")
    return int(token[9:])
