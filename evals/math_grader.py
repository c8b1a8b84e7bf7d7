"""Math answer checking: pull the final answer out of a completion, compare it with the gold
answer using math-verify, in worker processes that are killed and replaced on a hard deadline.

    from evals.math_grader import MathGrader, extract_answer
    with MathGrader(workers=4, timeout_s=5.0) as grader:
        verdicts = grader.grade([(gold, completion), ...])          # or grade_answers([(gold, answer)])
    verdicts[0].correct, verdicts[0].category, verdicts[0].extracted, verdicts[0].method

Extraction (`extract_answer`) reads only the text after `</think>` (a completion whose `<think>` never
closes has no answer) and takes, in order: the last `\\boxed{...}` / `\\fbox{...}` (balanced braces);
else whichever of "the answer is X" / "Answer: X" / GSM8K's "#### X" comes last (method "answer_is" or
"hash"); else the last number ("last_number").

Workers are processes (forkserver), so call the grader from under `if __name__ == "__main__":` in a
script. Comparison is math-verify's `verify(parse(gold), parse(answer))`, gold first (it is not symmetric),
both wrapped as `$...$` with thousands separators removed from plain numbers ("1,234" -> "1234").
Two shortcuts skip math-verify and can never disagree with it on a "correct": identical strings,
and equal plain numbers; two plain integers that differ are a mismatch (math-verify compares
integers exactly). Each (gold, answer) pair is checked once per grader (cached). math-verify's own
timeouts use SIGALRM and can still hang in C code, so they are off and the parent enforces
`timeout_s` per item instead: a hung check is category "timeout", a dead worker "error", and the run goes on.
Verdicts are evals.grading.Verdict: category correct | wrong | no_answer | timeout | error, and a detail.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import re
import resource
import time
from collections import deque
from collections.abc import Iterable
from fractions import Fraction
from importlib.metadata import version
from multiprocessing.connection import Connection, wait

from evals.grading import Verdict

GRADER_VERSION = f"math-v1 (math-verify {version('math-verify')})"
WORKER_MEMORY_BYTES = 4 << 30  # RLIMIT_AS per worker: a blow-up becomes MemoryError, not swapping
STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine

log = logging.getLogger(__name__)
OK, MISMATCH = ("correct", "ok"), ("wrong", "mismatch")


Outcome = tuple[str, str]  # (category, detail) of one check, as the workers send it


# ----------------------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"(?:final\s+answer|the\s+answer)\s*(?:is|:)\s*:?[ \t]*([^\n]+)", re.IGNORECASE)
_ANSWER_COLON = re.compile(r"^[ \t*#]*answer[ \t*]*:[ \t*]*([^\n]+)", re.IGNORECASE | re.MULTILINE)
_HASH = re.compile(r"####[ \t]*([^\n]+)")
_SAID = ((_ANSWER_IS, "answer_is"), (_ANSWER_COLON, "answer_is"), (_HASH, "hash"))
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_NUMBER_WITH_WORDS = re.compile(r"^(-?\d[\d,]*(?:\.\d+)?)\s+[A-Za-z]{2,}[A-Za-z .]*$")
_PLAIN_NUMBER = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$|^[+-]?\.\d+$")


def extract_answer(text: str) -> tuple[str | None, str]:
    """(final answer, method) from a model completion; (None, "none") when there is none."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:
        return None, "none"  # the reasoning never finished
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip(), "boxed"
    # Of "the answer is X" / "Answer: X" / "#### X", the last one in the text is the final answer.
    said = [(m.start(), method, m) for rx, method in _SAID for m in rx.finditer(text)]
    for _, method, m in sorted(said, key=lambda s: s[0], reverse=True):
        answer = _clean(m.group(1))
        if answer:
            return answer, method
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].rstrip(","), "last_number"
    return None, "none"


def _last_boxed(text: str) -> str | None:
    for m in reversed(list(_BOXED.finditer(text))):
        depth = 0
        for i in range(m.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[m.end() : i]
    return None


def _clean(answer: str) -> str:
    """Strip markdown, sentence punctuation, math delimiters and trailing unit words."""
    answer = answer.strip().strip("*").strip().rstrip(".").strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) > len(left) + len(right):
            answer = answer[len(left) : -len(right)].strip()
    answer = re.sub(r"^\\?\$\s*(?=[\d.])", "", answer)  # currency: "$18" -> "18"
    words = _NUMBER_WITH_WORDS.match(answer)  # "18 dollars" -> "18"
    return words.group(1) if words else answer


# ----------------------------------------------------------------------------- comparison


def _normalise(answer: str) -> str:
    answer = answer.strip()
    if _PLAIN_NUMBER.match(answer):
        answer = answer.replace(",", "")
    return answer


def _shortcut(gold: str, pred: str) -> Outcome | None:
    """The outcome when math-verify's answer is certain without asking it, else None."""
    if gold == pred:
        return OK
    if _PLAIN_NUMBER.match(gold) and _PLAIN_NUMBER.match(pred):
        if Fraction(gold) == Fraction(pred):
            return OK
        if "." not in gold + pred:
            return MISMATCH
    return None


def _wrap(answer: str) -> str:
    return "$" + re.sub(r"(?<!\\)\$", "", answer) + "$"


def _verify(gold: str, pred: str) -> Outcome:
    """math-verify's verdict, run in a worker."""
    from math_verify import verify

    gold_parsed = _parse(gold)
    if not gold_parsed:
        return "error", f"math-verify found no expression in the gold answer {gold[:80]!r}"
    return OK if verify(list(gold_parsed), list(_parse(pred)), timeout_seconds=None) else MISMATCH


@functools.lru_cache(maxsize=8192)
def _parse(answer: str) -> tuple:
    # Golds repeat across samples and answers across golds; sympy objects are immutable.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    return tuple(parse(_wrap(answer), extraction_config=config, parsing_timeout=None))


def _worker_main(conn: Connection, memory_bytes: int) -> None:
    """Worker loop: receive lists of (index, gold, pred), answer (index, (category, detail)) one at a time."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings
    _verify("1", "1")  # import and warm up before saying ready, so no deadline pays for it
    conn.send("ready")
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            return
        for index, gold, pred in batch:
            try:
                reason = _verify(gold, pred)
            except Exception as e:  # math-verify swallows most; whatever escapes is this item's
                reason = "error", f"{type(e).__name__}: {e}"[:300]
            conn.send((index, reason))


# ----------------------------------------------------------------------------- the grader


class _Worker:
    def __init__(self, ctx, memory_bytes: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, memory_bytes), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.inflight: deque[tuple[int, str, str]] = deque()
        self.since = time.monotonic()  # when the current item (or the start-up) began

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


class MathGrader:
    """Grades (gold, completion) pairs in parallel worker processes; use as a context manager."""

    def __init__(self, workers: int | None = None, timeout_s: float = 5.0, chunk_size: int = 32):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.n_workers = max(1, workers or os.cpu_count() or 1)
        self.timeout_s = timeout_s
        self.chunk_size = chunk_size
        self._workers: list[_Worker] = []
        self._cache: dict[tuple[str, str], Outcome] = {}
        self._ctx = multiprocessing.get_context("forkserver")
        # Workers fork from a server that already imported math-verify (~1 s), so a replacement
        # after a timeout starts in milliseconds.
        self._ctx.set_forkserver_preload(["math_verify", "sympy"])

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def grade(self, items: Iterable[tuple[str, str]]) -> list[Verdict]:
        """Verdicts for (gold, completion) pairs, in order."""
        golds, answers, methods = [], [], []
        for gold, completion in items:
            answer, method = extract_answer(completion)
            golds.append(gold)
            answers.append(answer)
            methods.append(method)
        return self._grade(golds, answers, methods)

    def grade_answers(self, items: Iterable[tuple[str, str]]) -> list[Verdict]:
        """Verdicts for (gold, already-extracted answer) pairs, in order."""
        pairs = list(items)
        answers = [a.strip() if a and a.strip() else None for _, a in pairs]
        return self._grade([g for g, _ in pairs], answers, ["given"] * len(pairs))

    def _grade(self, golds: list[str], answers: list[str | None], methods: list[str]) -> list[Verdict]:
        keys = [
            None if a is None else (_normalise(g), _normalise(a)) for g, a in zip(golds, answers, strict=True)
        ]
        todo = []
        for key in dict.fromkeys(k for k in keys if k is not None and k not in self._cache):
            quick = _shortcut(*key)
            if quick:
                self._cache[key] = quick
            else:
                todo.append(key)
        if todo:
            todo.sort()  # same gold, same chunk: the worker's parse cache gets the hits
            self._cache.update(zip(todo, self._run(todo), strict=True))
        verdicts = []
        for key, answer, method in zip(keys, answers, methods, strict=True):
            category, detail = ("no_answer", "no answer") if key is None else self._cache[key]
            verdicts.append(Verdict(category, detail, answer, method))
        return verdicts

    def _run(self, pairs: list[tuple[str, str]]) -> list[Outcome]:
        """Check pairs in the workers; every pair gets an outcome, whatever the workers do."""
        while len(self._workers) < self.n_workers:
            self._workers.append(_Worker(self._ctx, WORKER_MEMORY_BYTES))
        queue = deque((i, g, p) for i, (g, p) in enumerate(pairs))
        results: dict[int, Outcome] = {}
        while len(results) < len(pairs):
            for w in self._workers:
                if w.ready and not w.inflight and queue:
                    self._send(w, queue)
            for conn in wait([w.conn for w in self._workers], timeout=self._next_deadline()):
                self._receive(next(w for w in self._workers if w.conn is conn), results, queue)
            self._enforce_deadlines(results, queue)
        return [results[i] for i in range(len(pairs))]

    def _send(self, w: _Worker, queue: deque) -> None:
        size = max(1, min(self.chunk_size, len(queue) // (2 * len(self._workers))))
        batch = [queue.popleft() for _ in range(min(size, len(queue)))]
        w.inflight.extend(batch)
        w.since = time.monotonic()
        w.conn.send(batch)

    def _receive(self, w: _Worker, results: dict[int, Outcome], queue: deque) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            w.proc.join(1)
            if not w.ready:  # it could not even import math-verify: retrying would loop forever
                raise RuntimeError(f"math worker died while starting (exit code {w.proc.exitcode})") from None
            self._replace(w, results, queue, ("error", f"math worker died (exit code {w.proc.exitcode})"))
            return
        if msg == "ready":
            w.ready = True
        else:
            index, reason = msg
            results[index] = reason
            w.inflight.popleft()
        w.since = time.monotonic()

    def _enforce_deadlines(self, results: dict[int, Outcome], queue: deque) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w.inflight and now - w.since > self.timeout_s:
                self._replace(w, results, queue, ("timeout", f"check over {self.timeout_s}s"))
            elif not w.ready and now - w.since > STARTUP_TIMEOUT_S:
                raise RuntimeError(f"math worker did not start within {STARTUP_TIMEOUT_S}s")

    def _replace(self, w: _Worker, results: dict[int, Outcome], queue: deque, reason: Outcome) -> None:
        """Kill a stuck or dead worker: its current item gets `reason`, the rest go back in line."""
        if w.inflight:
            index, gold, pred = w.inflight.popleft()
            results[index] = reason
            log.warning("math check %s (%s) for gold=%r answer=%r", *reason, gold[:80], pred[:80])
        queue.extendleft(reversed(w.inflight))
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self._ctx, WORKER_MEMORY_BYTES)

    def _next_deadline(self) -> float:
        busy = [w.since + self.timeout_s for w in self._workers if w.inflight]
        return max(0.0, min(busy) - time.monotonic()) + 0.01 if busy else 0.5
