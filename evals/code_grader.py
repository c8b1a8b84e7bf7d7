"""Grade model-written Python against a problem's tests, in the sandbox (evals/sandbox.py).

    from evals.code_grader import CodeGrader
    grader = CodeGrader(workers=8)
    verdicts = grader.grade([(problem["tests"], completion, problem["prompt"]), ...])
    verdicts[0].correct, verdicts[0].category, verdicts[0].detail, verdicts[0].extracted

The candidate is extracted by evals/code_extract.py; each candidate runs in ONE sandbox run of a
program of evals/jail/, and a thread pool runs `workers` candidates at a time. Nothing the candidate
says is believed: what crosses out of the sandbox is plain data (evals/jail/plain.py), judged here or
by a test process the candidate cannot reach. The Problem record's `tests` field (a JSON string or the
same dict) is one of:

| kind | fields | what runs | correct when |
|---|---|---|---|
| `functional` | `test`: Python source (HumanEval: defines `check(candidate)`; MBPP: bare `assert`s); `entry_point` (optional): the function's name; `prompt` (optional): code prefix, default the Problem prompt | jail/functional_run.py: the candidate (with the prefix, below) in one process, the prefix + `test` + `check(entry_point)` (that call only with `entry_point`) in another that calls the candidate's functions with plain-data arguments and results; limit `Limits.wall_s` (10 s) | the tests run to their end |
| `evalplus` | `task_id` (`HumanEval/N` or `Mbpp/N`: picks the input decoding and special oracles), `entry_point`, `canonical_solution`, `prompt` (the code the canonical solution continues), `base_input`, `plus_input` (lists of argument lists, the release's JSON as is), `atol` (0 = exact; float outputs then get 1e-6) | jail/evalplus_run.py, once with the canonical solution (expected outputs and times, cached per problem), then with the candidate on every base, then plus input, each limited from outside to max(4 s, 4 x the canonical time) (+ 4 x its encoding time), all inputs to 60 s (or 3 x the canonical's total, when longer), stopping at the first failure; 4 GiB | every output equals the expected one (evals/evalplus_check.py: text first, then evalplus's oracles and float closeness) |
| `stdio` | `cases`: list of `{"input": str, "output": str}`; `time_limit_s` (optional, default 6): per case | jail/stdio_run.py: the candidate as a script, once per case (a fork) with stdin = `input` | every case exits 0 and the digest of its stdout equals that of `output` after whitespace normalisation (outer blank space dropped, each line stripped, runs of spaces/tabs collapsed) |

For both function kinds a candidate without `def <entry_point>` gets the code prefix prepended; one
with it gets the prefix's top-level imports (evals/code_extract.py). `evalplus_tests(row)` makes the
`evalplus` dict from a HumanEval+ / MBPP+ release row. Categories: "correct"; "no_answer" (no code);
"wrong" (a failed test, a wrong or non-plain output, a per-input time limit, memory, a crash);
"timeout" (the whole run's wall clock); "error" (the problem's own fault: malformed tests, a
canonical solution that fails, or a sandbox that would not start).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from evals.code_extract import extract_code, with_prefix
from evals.evalplus_check import same_output
from evals.grading import Verdict
from evals.jail.mbpp_inputs import decode_inputs
from evals.jail.plain import printed_digest
from evals.sandbox import Limits, RunResult, isolation, run_jail

CODE_GRADER_VERSION = "code-v2 (plain-data results checked outside the sandbox)"
MIN_INPUT_TIME_S = 4.0  # evalplus defaults: per-input limit = max(4 s, 4 x canonical time)
INPUT_TIME_FACTOR = 4.0
MAX_TASK_TIME_S = 60.0  # one candidate holds a slot at most this long (evalplus: 60 s each for base and plus) ...
TASK_TIME_FACTOR = 3.0  # ... or this many times the canonical solution's own total, when that is longer
MAX_CANONICAL_TIME_S = 240.0  # the benchmark's own solution, once per problem
LOAD_TIME_S = 10.0  # interpreter start-up plus the candidate's top-level code
SLACK_S = 0.5  # pipe and encoding time on top of a per-input limit
DEFAULT_CASE_TIME_S = 6.0
EVALPLUS_MEMORY_MB = 4096  # evalplus's cap (Mbpp/255's canonical outputs alone take 1.5 GiB)
HASH_OVER = 1 << 20  # outputs with longer plain-data text cross as a sha256 ...
FLOAT_HASH_OVER = 16 << 20  # ... or this long, when they hold floats (compared with a tolerance)
LINE_BYTES = 24 << 20  # the longest result line read back


@dataclass(frozen=True)
class Expected:
    """A problem's canonical outputs (("text", t) or ("sha", digest) each), times (call, encoding), or
    why it failed."""

    outputs: list[tuple[str, str]]
    times: list[tuple[float, float]]
    error: str | None = None


# ----------------------------------------------------------------------------- public API


class CodeGrader:
    """Grades (tests, completion, prompt) triples in parallel; caches evalplus expected outputs."""

    def __init__(self, workers: int | None = None, limits: Limits = Limits(), fail_fast: bool = True):
        self.workers = workers or os.cpu_count() or 1
        self.limits = limits
        self.fail_fast = fail_fast  # evalplus's default: stop a candidate at its first failing input
        self._expected: dict[str, Expected] = {}
        self.layers = isolation().describe()  # probed (and logged) once, before any candidate runs

    def grade(self, items: Iterable[tuple[str | dict, str, str]]) -> list[Verdict]:
        """Verdicts for (tests, completion, prompt) triples, in order."""
        jobs = [(tests, extract_code(completion), prompt) for tests, completion, prompt in items]
        with ThreadPoolExecutor(self.workers) as pool:
            # The canonical solutions first, once per uncached problem, so that candidates share them.
            todo = {}
            for tests, _, _ in jobs:
                loaded = _try_load(tests)
                if loaded and loaded.get("kind") == "evalplus" and _key(loaded) not in self._expected:
                    todo[_key(loaded)] = loaded
            for key, expected in zip(todo, pool.map(_expected_outputs, todo.values()), strict=True):
                self._expected[key] = expected
            return list(pool.map(lambda job: self._grade_or_error(*job), jobs))

    def grade_one(self, tests: str | dict, candidate: str, prompt: str = "") -> Verdict:
        """Grade an already-extracted candidate; malformed `tests` raise ValueError/KeyError."""
        tests = _load_tests(tests)
        kind = tests.get("kind")
        if kind not in ("functional", "evalplus", "stdio"):
            raise ValueError(f"tests kind {kind!r} is not one of functional, evalplus, stdio")
        if not candidate.strip():
            return Verdict("no_answer", "no code", None, "code", 0, _count(tests))
        if kind == "functional":
            verdict = self._functional(tests, candidate, prompt)
        elif kind == "evalplus":
            verdict = self._evalplus(tests, candidate, prompt)
        else:
            verdict = self._stdio(tests, candidate)
        return replace(verdict, extracted=candidate, method="code")

    def _grade_or_error(self, tests, candidate: str, prompt: str) -> Verdict:
        try:
            return self.grade_one(tests, candidate, prompt)
        except (ValueError, KeyError, TypeError) as e:  # one bad problem record must not end the run
            return Verdict("error", f"bad tests: {type(e).__name__}: {e}"[:300], candidate or None, "code")

    # -- functional: the tests in one process, the candidate in another
    def _functional(self, tests: dict, candidate: str, prompt: str) -> Verdict:
        entry, prefix = tests.get("entry_point"), tests.get("prompt", prompt)
        code = with_prefix(candidate, entry, prefix)
        stdin = _parts({"code": code}, {"test": tests["test"], "prefix": prefix if entry else "",
                                        "entry_point": entry})
        res = run_jail("functional_run.py", stdin, replace(self.limits, output_bytes=LINE_BYTES))
        line = res.stdout.split("\n", 1)[0]
        result = _json_dict(line)
        if result.get("passed") is True:
            return Verdict("correct", "ok", None, passed=1, total=1)
        if isinstance(result.get("failed"), str):
            return Verdict("wrong", result["failed"], None, total=1)
        if isinstance(result.get("error"), str):
            return Verdict("error", result["error"], None, total=1)
        return _run_verdict(res, 0, 1)

    # -- evalplus: the candidate on every input, each output judged here as it arrives
    def _evalplus(self, tests: dict, candidate: str, prompt: str) -> Verdict:
        expected = self._expected.get(_key(tests)) or _expected_outputs(tests)
        total = _count(tests)
        if expected.error:
            return Verdict("error", f"canonical solution failed: {expected.error}", None, total=total)
        code = with_prefix(candidate, tests["entry_point"], tests.get("prompt", prompt))
        watch = _EvalplusWatch(tests, expected, self.fail_fast)
        res = run_jail("evalplus_run.py", _parts(_evalplus_payload(tests, code, copy_inputs=False)),
                       _evalplus_limits(self.limits, watch.task_limit), watch)
        if watch.failure is None and watch.passed == total:
            return Verdict("correct", "ok", None, passed=total, total=total)
        if watch.failure is None and res.status == "timeout":
            watch.failure = watch.time_failure() if watch.loaded else (
                f"loading the program: time limit {LOAD_TIME_S:.1f}s")
        if watch.failure is not None:
            return Verdict("wrong", watch.failure, None, passed=watch.passed, total=total)
        return _run_verdict(res, watch.passed, total)

    # -- stdio: the candidate as a script per case; digests of its stdout judged here
    def _stdio(self, tests: dict, candidate: str) -> Verdict:
        cases = tests["cases"]
        per_case = float(tests.get("time_limit_s", DEFAULT_CASE_TIME_S))
        payload = {"code": candidate, "inputs": [c["input"] for c in cases], "time_limit": per_case}
        watch = _StdioWatch([printed_digest(c["output"]) for c in cases], per_case, self.fail_fast)
        res = run_jail("stdio_run.py", _parts(payload), replace(self.limits, wall_s=MAX_TASK_TIME_S), watch)
        if watch.failure is None and watch.passed == len(cases):
            return Verdict("correct", "ok", None, passed=len(cases), total=len(cases))
        if watch.failure is not None:
            return Verdict("wrong", watch.failure, None, passed=watch.passed, total=len(cases))
        return _run_verdict(res, watch.passed, len(cases))


def evalplus_tests(row: dict) -> dict:
    """The `evalplus` tests dict for one row of HumanEvalPlus.jsonl / MbppPlus.jsonl."""
    fields = ("task_id", "entry_point", "canonical_solution", "prompt", "base_input", "plus_input", "atol")
    return {"kind": "evalplus", **{f: row[f] for f in fields}}


# ----------------------------------------------------------------------------- watching a run


class _EvalplusWatch:
    """Judges each output line as it comes; the deadline follows the current input's limit."""

    def __init__(self, tests: dict, expected: Expected, fail_fast: bool):
        self.tests, self.expected, self.fail_fast = tests, expected, fail_fast
        self.split = ["base"] * len(_inputs(tests, "base_input")) + ["plus"] * len(_inputs(tests, "plus_input"))
        self.inputs = _inputs(tests, "base_input") + _inputs(tests, "plus_input")
        self.limits = [max(MIN_INPUT_TIME_S, INPUT_TIME_FACTOR * t) + INPUT_TIME_FACTOR * te
                       for t, te in expected.times]
        self.task_limit = task_limit(expected)
        self.mbpp = _dataset(tests) == "mbpp"
        self.loaded, self.seen, self.passed, self.failure = False, 0, 0, None
        self.start = time.monotonic()
        self.deadline = self.start + LOAD_TIME_S

    def where(self) -> str:
        return f"{self.split[self.seen]} input {self.seen}" if self.seen < len(self.split) else "after the last input"

    def limit(self) -> float:
        return self.limits[self.seen] if self.seen < len(self.limits) else 0.0

    def time_failure(self) -> str:
        if time.monotonic() >= self.start + self.task_limit:
            return f"{self.where()}: time limit for all inputs {self.task_limit:.0f}s"
        return f"{self.where()}: time limit {self.limit():.1f}s"

    def feed(self, line: bytes) -> bool:
        header, _, text = line.decode("utf-8", "replace").partition("\t")
        msg = _json_dict(header)
        if not self.loaded:
            self.loaded = msg.get("loaded") is True
            if not self.loaded:
                self.failure = str(msg.get("error") or "the program sent no start line")[:500]
                return True
        elif self.seen >= len(self.inputs):
            self.failure = "more outputs than inputs"
        elif "raised" in msg:
            self.failure = f"{self.where()}: {str(msg['raised'])[:300]}"
            self.seen += 1
        else:
            if not self._same(msg, text or None):
                self.failure = f"{self.where()}: wrong output"
            else:
                self.passed += 1
            self.seen += 1
        if self.failure and self.fail_fast:
            return True
        now = time.monotonic()
        self.deadline = min(now + self.limit() + SLACK_S, self.start + self.task_limit)
        return self.seen == len(self.inputs)

    def _same(self, msg: dict, text: str | None) -> bool:
        i = self.seen
        args = self.inputs[i]
        if self.mbpp:
            args = decode_inputs(int(self.tests["task_id"].rsplit("/", 1)[1]), args)
        sha = msg.get("sha") if isinstance(msg.get("sha"), str) else None
        return same_output(text, sha, self.expected.outputs[i], args, float(self.tests.get("atol") or 0),
                           _dataset(self.tests), self.tests["entry_point"])


class _StdioWatch:
    def __init__(self, digests: list[str], per_case: float, fail_fast: bool):
        self.digests, self.per_case, self.fail_fast = digests, per_case, fail_fast
        self.seen, self.passed, self.failure = 0, 0, None
        self.start = time.monotonic()
        self.deadline = self.start + LOAD_TIME_S + per_case

    def feed(self, line: bytes) -> bool:
        msg = _json_dict(line.decode("utf-8", "replace"))
        i = self.seen
        if "error" in msg or i >= len(self.digests):
            self.failure = str(msg.get("error", "more results than cases"))[:500]
        elif msg.get("rc") == "timeout":
            self.failure = f"case {i}: time limit {self.per_case}s"
        elif msg.get("rc") != 0:
            self.failure = f"case {i}: exit code {msg.get('rc')}: {str(msg.get('err'))[:300]}"
        elif msg.get("digest") != self.digests[i]:
            self.failure = f"case {i}: wrong output"
        else:
            self.passed += 1
        self.seen += 1
        if self.failure and (self.fail_fast or "rc" not in msg):
            return True
        self.deadline = min(time.monotonic() + self.per_case + SLACK_S, self.start + MAX_TASK_TIME_S)
        return self.seen == len(self.digests)


# ----------------------------------------------------------------------------- expected outputs


class _CanonicalWatch:
    def __init__(self, n: int):
        self.n, self.outputs, self.times, self.error = n, [], [], None
        self.loaded = False
        self.deadline = time.monotonic() + MAX_CANONICAL_TIME_S

    def feed(self, line: bytes) -> bool:
        header, _, text = line.decode("utf-8", "replace").partition("\t")
        msg = _json_dict(header)
        if not self.loaded:
            self.loaded = msg.get("loaded") is True
            self.error = None if self.loaded else str(msg.get("error"))
            return not self.loaded
        if "raised" in msg:
            self.error = f"input {len(self.outputs)}: {msg['raised']}"
            return True
        self.outputs.append(("sha", msg["sha"]) if "sha" in msg else ("text", text))
        self.times.append((float(msg["t"]), float(msg["te"])))
        return len(self.outputs) == self.n


def _expected_outputs(tests: dict) -> Expected:
    """Run the canonical solution (the prompt + canonical_solution) on every input, in the sandbox."""
    try:
        code = tests.get("prompt", "") + tests["canonical_solution"]
        payload = _evalplus_payload(tests, code, copy_inputs=True)
    except (ValueError, KeyError, TypeError) as e:
        return Expected([], [], f"bad tests: {type(e).__name__}: {e}")
    watch = _CanonicalWatch(len(payload["inputs"]))
    limits = _evalplus_limits(Limits(), MAX_CANONICAL_TIME_S)
    res = run_jail("evalplus_run.py", _parts(payload), limits, watch)
    if watch.error is None and len(watch.outputs) == watch.n:
        return Expected(watch.outputs, watch.times)
    return Expected([], [], watch.error or f"{res.status}: {res.reason}")


# ----------------------------------------------------------------------------- helpers


def task_limit(expected: Expected) -> float:
    """How long one candidate may take for all inputs of an evalplus problem."""
    return max(MAX_TASK_TIME_S, TASK_TIME_FACTOR * sum(t + te for t, te in expected.times))


def _evalplus_limits(limits: Limits, seconds: float) -> Limits:
    return replace(limits, wall_s=seconds + LOAD_TIME_S, cpu_s=int(seconds + LOAD_TIME_S),
                   memory_mb=max(limits.memory_mb, EVALPLUS_MEMORY_MB), output_bytes=LINE_BYTES)


def _evalplus_payload(tests: dict, code: str, copy_inputs: bool) -> dict:
    return {"code": code, "entry_point": tests["entry_point"], "dataset": _dataset(tests),
            "task_no": int(tests["task_id"].rsplit("/", 1)[1]),
            "inputs": _inputs(tests, "base_input") + _inputs(tests, "plus_input"),
            "copy_inputs": copy_inputs, "hash_over": HASH_OVER, "float_hash_over": FLOAT_HASH_OVER}


def _dataset(tests: dict) -> str:
    return "mbpp" if tests["task_id"].lower().startswith("mbpp") else "humaneval"


def _run_verdict(res: RunResult, passed: int, total: int) -> Verdict:
    """The verdict of a run that ended without a result: the wall clock, a crash, or a sandbox error."""
    if res.status == "timeout":
        return Verdict("timeout", res.reason, None, passed=passed, total=total)
    if res.status == "error":
        return Verdict("error", f"sandbox: {res.reason}", None, passed=passed, total=total)
    if res.status == "ok":
        return Verdict("wrong", "the program ended without a result", None, passed=passed, total=total)
    return Verdict("wrong", f"{res.status}: {res.reason}", None, passed=passed, total=total)


def _parts(*parts: dict) -> bytes:
    """The jail programs' stdin: each part as `<length>\\n<JSON>` (jail/channel.py)."""
    out = b""
    for part in parts:
        data = json.dumps(part).encode()
        out += b"%d\n" % len(data) + data
    return out


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _try_load(tests: str | dict) -> dict | None:
    try:
        return _load_tests(tests)
    except ValueError:
        return None


def _load_tests(tests: str | dict) -> dict:
    loaded = json.loads(tests) if isinstance(tests, str) else tests
    if not isinstance(loaded, dict) or "kind" not in loaded:
        raise ValueError(f"tests must be a JSON object with a 'kind', got {str(tests)[:80]!r}")
    return loaded


def _key(tests: dict) -> str:
    return hashlib.sha256(json.dumps(tests, sort_keys=True).encode()).hexdigest()


def _count(tests: dict) -> int:
    kind = tests.get("kind")
    if kind == "evalplus":
        return len(_inputs(tests, "base_input")) + len(_inputs(tests, "plus_input"))
    return len(tests["cases"]) if kind == "stdio" else 1


def _inputs(tests: dict, field: str) -> list:
    value = tests.get(field) or []  # MbppPlus v0.2.0 releases Mbpp/793's plus_input as {}
    if not isinstance(value, list):
        raise ValueError(f"tests[{field!r}] must be a list of argument lists, got {type(value).__name__}")
    return value
