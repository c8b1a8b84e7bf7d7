"""Grade model-written Python against a problem's tests, in the sandbox (evals/sandbox.py).

    from evals.code_grader import CodeGrader
    grader = CodeGrader(workers=8)
    verdicts = grader.grade([(problem["tests"], completion, problem["prompt"]), ...])
    verdicts[0].correct, verdicts[0].reason, verdicts[0].passed, verdicts[0].total

The candidate is the last ```python (or ```py) fenced block of the completion after `</think>`,
else the last bare ``` block, else the raw text; a completion whose `<think>` never closes has no
candidate. Each candidate runs in ONE sandboxed subprocess that executes all of its tests (a small
harness prints one JSON result), and a thread pool runs `workers` candidates at a time.

The Problem record's `tests` field (a JSON string or the same dict) is one of:

| kind | fields | what runs | correct when |
|---|---|---|---|
| `functional` | `test`: Python source (HumanEval: defines `check(candidate)`; MBPP: bare `assert`s); `entry_point` (optional): the function's name; `prompt` (optional): code prefix, default the Problem prompt | candidate + `test` + `check(entry_point)` (that call only with `entry_point`) as one program, limit `Limits.wall_s` (10 s) | the program runs to its end (a sentinel printed last, so `sys.exit(0)` in the candidate fails) and exits 0 |
| `evalplus` | `task_id` (`HumanEval/N` or `Mbpp/N`: picks the input decoding and special oracles), `entry_point`, `canonical_solution`, `prompt` (the code the canonical solution continues), `base_input`, `plus_input` (lists of argument lists, the release's JSON as is), `atol` (0 = exact; float outputs then get 1e-6) | the canonical solution makes the expected outputs (in the candidate's harness, just before it; cached per problem and shipped to later candidates when they pickle under 8 MB); then `entry_point` is called on every base, then plus input, each limited to max(4 s, 4 x the canonical time), stopping at the first failure; 4 GiB | every output equals the expected one; floats: same type and within `atol` + 1e-7 relative; evalplus's oracles: HumanEval/32 any root with abs(poly) <= atol; MBPP set equality for 8 tasks (similar_elements, ...), "not None" for check_str / text_match_three / text_starta_endb, surface_Area, digit_distance_nums |
| `stdio` | `cases`: list of `{"input": str, "output": str}`; `time_limit_s` (optional, default 6): per case | the candidate as a script, once per case (a fork of the harness) with stdin = `input` | every case exits 0 and its stdout equals `output` after whitespace normalisation (leading/trailing blank space dropped, each line stripped and its runs of spaces/tabs collapsed to one space) |

For both function kinds a candidate without `def <entry_point>` gets the code prefix prepended
(HumanEval's convention: the model wrote only the body); one with it gets the prefix's top-level
imports (models often drop `from typing import List`). `evalplus_tests(row)` makes the `evalplus`
dict from a HumanEval+ / MBPP+ release row. Reasons read "ok", "no_code", "failed: <first failure>",
"timeout: ...", "memory: ...", "output_limit: ...", "killed: ...", "error: <the problem's own fault>".
Like evalplus, the function harnesses run the candidate in the harness's own process: code written
to tamper with the harness could forge a pass; the sandbox stops buggy and reward-hacking code
(`exit(0)`, reading expected stdout), not an adversary aiming at this file.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import math
import os
import re
import secrets
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from evals.sandbox import Limits, RunResult, run_program

CODE_GRADER_VERSION = "code-v1 (evalplus-style harness, python -I -S sandbox)"
MIN_INPUT_TIME_S = 4.0  # evalplus defaults: per-input limit = max(4 s, 4 x canonical time)
INPUT_TIME_FACTOR = 4.0
MAX_TASK_TIME_S = 120.0  # evalplus caps a task at 60 s each for base and plus
DEFAULT_CASE_TIME_S = 6.0
EVALPLUS_MEMORY_MB = 4096  # evalplus's cap; the harness also holds every expected output (Mbpp/255: 1.5 GiB)
EXPECTED_CACHE_BYTES = 8 << 20  # larger expected outputs are recomputed per candidate, not shipped


@dataclass(frozen=True)
class CodeVerdict:
    correct: bool
    reason: str  # "ok" | "no_code" | "failed: ..." | "timeout: ..." | "memory: ..." | "error: ..."
    passed: int  # tests passed (fail-fast: those before the first failure)
    total: int


# ----------------------------------------------------------------------------- public API


class CodeGrader:
    """Grades (tests, completion, prompt) triples in parallel; caches evalplus expected outputs."""

    def __init__(self, workers: int | None = None, limits: Limits = Limits(), fail_fast: bool = True):
        self.workers = workers or os.cpu_count() or 1
        self.limits = limits
        self.fail_fast = fail_fast  # evalplus's default: stop a candidate at its first failing input
        # evalplus problem key -> (pickled expected outputs or None when too big, canonical times),
        # or the error string when the canonical solution itself failed
        self._expected: dict[str, tuple[str | None, list[float]] | str] = {}

    def grade(self, items: Iterable[tuple[str | dict, str, str]]) -> list[CodeVerdict]:
        """Verdicts for (tests, completion, prompt) triples, in order."""
        jobs = [(tests, extract_code(completion), prompt) for tests, completion, prompt in items]
        # The first candidate of an uncached evalplus problem computes its expected outputs: grade
        # those first, so the others of the same problem can reuse them.
        first, seen = [], set()
        for i, (tests, _, _) in enumerate(jobs):
            loaded = _try_load(tests)
            key = _key(loaded) if loaded and loaded.get("kind") == "evalplus" else None
            if key and key not in self._expected and key not in seen:
                seen.add(key)
                first.append(i)
        rest = sorted(set(range(len(jobs))) - set(first))
        verdicts: list[CodeVerdict | None] = [None] * len(jobs)
        with ThreadPoolExecutor(self.workers) as pool:
            for batch in (first, rest):
                for i, verdict in zip(
                    batch, pool.map(lambda i: self._grade_or_error(*jobs[i]), batch), strict=True
                ):
                    verdicts[i] = verdict
        return verdicts

    def grade_one(self, tests: str | dict, candidate: str, prompt: str = "") -> CodeVerdict:
        """Grade an already-extracted candidate; malformed `tests` raise ValueError/KeyError."""
        tests = _load_tests(tests)
        kind = tests.get("kind")
        if kind not in ("functional", "evalplus", "stdio"):
            raise ValueError(f"tests kind {kind!r} is not one of functional, evalplus, stdio")
        if not candidate.strip():
            return CodeVerdict(False, "no_code", 0, _count(tests))
        if kind == "functional":
            return self._functional(tests, candidate, prompt)
        if kind == "evalplus":
            return self._evalplus(tests, candidate, prompt)
        return self._stdio(tests, candidate)

    def _grade_or_error(self, tests, candidate: str, prompt: str) -> CodeVerdict:
        try:
            return self.grade_one(tests, candidate, prompt)
        except (ValueError, KeyError, TypeError) as e:  # one bad problem record must not end the run
            return CodeVerdict(False, f"error: bad tests: {type(e).__name__}: {e}"[:300], 0, 0)

    # -- functional: one program that must run to its end
    def _functional(self, tests: dict, candidate: str, prompt: str) -> CodeVerdict:
        entry = tests.get("entry_point")
        program = _with_prefix(candidate, entry, tests.get("prompt", prompt)) + "\n\n" + tests["test"] + "\n"
        if entry:
            program += f"\ncheck({entry})\n"
        # Exit code 0 is not enough: `sys.exit(0)` inside the candidate would skip the tests.
        nonce = secrets.token_hex(8)
        res = run_program(program + f"\nprint({nonce!r})\n", limits=self.limits)
        if res.status != "ok":
            return CodeVerdict(False, _run_reason(res), 0, 1)
        if nonce not in res.stdout.splitlines():
            return CodeVerdict(False, "failed: the program exited before its tests finished", 0, 1)
        return CodeVerdict(True, "ok", 1, 1)

    # -- evalplus: expected outputs from the canonical solution, then the candidate on every input
    def _evalplus(self, tests: dict, candidate: str, prompt: str) -> CodeVerdict:
        key, total = _key(tests), _count(tests)
        cached = self._expected.get(key)
        if isinstance(cached, str):
            return CodeVerdict(False, f"error: {cached}", 0, total)
        payload = {
            **_evalplus_payload(
                tests, _with_prefix(candidate, tests["entry_point"], tests.get("prompt", prompt))
            ),
            "canonical": tests.get("prompt", "") + tests["canonical_solution"],
            "fail_fast": self.fail_fast,
            "min_time": MIN_INPUT_TIME_S,
            "time_factor": INPUT_TIME_FACTOR,
            "cache_bytes": EXPECTED_CACHE_BYTES if cached is None else 0,
        }
        if cached is not None and cached[0] is not None:
            payload.update(expected=cached[0], times=cached[1])  # skip the canonical run
            wall = min(MAX_TASK_TIME_S, sum(max(MIN_INPUT_TIME_S, INPUT_TIME_FACTOR * t) for t in cached[1]))
        else:
            wall = 2 * MAX_TASK_TIME_S  # the canonical solution runs first, in the same harness
        limits = replace(
            self.limits,
            memory_mb=max(self.limits.memory_mb, EVALPLUS_MEMORY_MB),
            output_bytes=max(self.limits.output_bytes, 2 * EXPECTED_CACHE_BYTES),  # base64 outputs
        )
        verdict, result = self._verdict(_EVALPLUS_HARNESS, payload, total, wall, limits)
        if result and "canonical_error" in result:
            self._expected[key] = f"canonical solution failed: {result['canonical_error']}"
            return CodeVerdict(False, f"error: {self._expected[key]}", 0, total)
        if result and "times" in result and key not in self._expected:
            self._expected[key] = (result.get("expected"), result["times"])
        return verdict

    # -- stdio: the candidate as a script per case
    def _stdio(self, tests: dict, candidate: str) -> CodeVerdict:
        cases = tests["cases"]
        per_case = float(tests.get("time_limit_s", DEFAULT_CASE_TIME_S))
        # Only digests of the expected outputs enter the sandbox, so a candidate cannot read them.
        digests = [{"input": c["input"], "digest": _output_digest(c["output"])} for c in cases]
        payload = {"code": candidate, "cases": digests, "time_limit": per_case, "fail_fast": self.fail_fast}
        wall = min(MAX_TASK_TIME_S, per_case * len(cases))
        return self._verdict(_STDIO_HARNESS, payload, len(cases), wall)[0]

    def _verdict(self, harness, payload, total, wall, limits=None) -> tuple[CodeVerdict, dict | None]:
        wall += 2.0  # interpreter start-up and JSON
        limits = replace(limits or self.limits, wall_s=wall, cpu_s=math.ceil(wall) + 1)
        result, res = _run_harness(harness, payload, limits)
        if result is None:
            return CodeVerdict(False, _run_reason(res), 0, total), None
        if "failure" not in result:  # the candidate did not even load, or the canonical failed
            return CodeVerdict(
                False, f"failed: {result.get('error') or result.get('canonical_error')}", 0, total
            ), result
        if result["passed"] == total:
            return CodeVerdict(True, "ok", total, total), result
        return CodeVerdict(False, f"failed: {result['failure']}", result["passed"], total), result


def extract_code(completion: str) -> str:
    """The candidate program in a model completion (see the module docstring)."""
    if "</think>" in completion:
        completion = completion.rsplit("</think>", 1)[1]
    elif "<think>" in completion:
        return ""  # the reasoning never finished: there is no answer
    blocks = _fenced_blocks(completion)
    python = [code for lang, code in blocks if lang in ("python", "py", "python3")]
    bare = [code for lang, code in blocks if not lang]
    return (python or bare or [completion])[-1]


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each closed ``` block, pairing fences line by line."""
    blocks, lang, lines = [], None, []
    for line in text.splitlines(keepends=True):
        fence = line.strip().startswith("```")
        if lang is None and fence:
            lang, lines = line.strip()[3:].strip().lower(), []
        elif lang is not None and line.strip() == "```":
            blocks.append((lang, "".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def evalplus_tests(row: dict) -> dict:
    """The `evalplus` tests dict for one row of HumanEvalPlus.jsonl / MbppPlus.jsonl."""
    fields = ("task_id", "entry_point", "canonical_solution", "prompt", "base_input", "plus_input", "atol")
    return {"kind": "evalplus", **{f: row[f] for f in fields}}


# ----------------------------------------------------------------------------- helpers


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


def _with_prefix(candidate: str, entry_point: str | None, prefix: str) -> str:
    if not entry_point or not prefix:
        return candidate
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", candidate, re.MULTILINE):
        return "\n".join([*_imports(prefix), candidate])
    return prefix + candidate


def _imports(code: str) -> list[str]:
    """The top-level import statements of `code` (none if it does not parse)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    return [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]


def _evalplus_payload(tests: dict, code: str) -> dict[str, Any]:
    dataset = "mbpp" if tests["task_id"].lower().startswith("mbpp") else "humaneval"
    base, plus = _inputs(tests, "base_input"), _inputs(tests, "plus_input")
    return {
        "code": code,
        "entry_point": tests["entry_point"],
        "dataset": dataset,
        "task_no": int(tests["task_id"].rsplit("/", 1)[1]),
        "inputs": base + plus,
        "split": ["base"] * len(base) + ["plus"] * len(plus),
        "atol": float(tests.get("atol") or 0),
    }


def _run_harness(harness: str, payload: dict, limits: Limits) -> tuple[dict | None, RunResult]:
    """Run a harness program; its result is the last stdout line tagged with a fresh nonce."""
    nonce = secrets.token_hex(8)
    res = run_program(harness, stdin=json.dumps({**payload, "nonce": nonce}), limits=limits)
    for line in reversed(res.stdout.splitlines()):
        if line.startswith(nonce + " ") and res.status == "ok":
            return json.loads(line[len(nonce) + 1 :]), res
    return None, res


def _run_reason(res: RunResult) -> str:
    if res.status == "ok":
        return "ok"
    if res.status == "failed":
        return f"failed: {res.reason}"
    return f"{res.status}: {res.reason}"


# ----------------------------------------------------------------------------- harness programs
# Everything below runs inside the sandbox: the functions are pasted into the harness program by
# source (inspect.getsource), so they may only use the standard library and each other.


def _harness_io():
    """Read the JSON payload, then point fds 0/1/2 at /dev/null; returns (payload, emit)."""
    import json
    import os
    import sys

    payload = json.loads(sys.stdin.read())
    result_fd = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)

    def emit(result):
        data = (payload["nonce"] + " " + json.dumps(result) + "\n").encode()
        while data:  # a pipe may take a large write in pieces
            data = data[os.write(result_fd, data) :]

    return payload, emit


def _mbpp_decode(task_no, args):
    """MBPP+ stores tuples, sets and complex numbers as JSON lists/strings; restore them per task."""

    def deep(x):
        return tuple(deep(i) for i in x) if isinstance(x, list) else x

    if task_no in (2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596,
                   616, 630, 726, 740, 744, 809):  # fmt: skip
        return [tuple(a) for a in args]
    if task_no in (63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780):
        return [[tuple(x) for x in a] for a in args]
    if task_no in (75, 413, 444, 753):
        return [[tuple(x) for x in args[0]], args[1]]
    if task_no in (106, 750):
        return [args[0], tuple(args[1])]
    if task_no == 115:  # an empty set was released as [] and is decoded as {} (a dict), as evalplus does
        return [[set(x) if isinstance(x, list) and x else {} for x in args[0]]]
    if task_no == 124:
        return [float(args[0]), complex(args[1])]
    if task_no in (250, 405, 446, 617, 720, 763, 808):
        return [tuple(args[0]), *args[1:]]
    if task_no in (259, 401, 445):
        return [tuple(tuple(x) for x in a) for a in args]
    if task_no == 278:
        return [tuple(tuple(x) if isinstance(x, list) else x for x in args[0])]
    if task_no == 307:
        return [tuple(args[0]), args[1], args[2]]
    if task_no == 722:
        return [{k: tuple(v) for k, v in args[0].items()}, *args[1:]]
    if task_no == 252:
        return [complex(args[0])]
    if task_no in (580, 615, 791):
        return list(deep(args))
    return args


def _close(out, exp, atol):
    """numpy.allclose(out, exp, rtol=1e-7, atol) for numbers and (nested) lists/tuples."""
    if isinstance(exp, (list, tuple)):
        if not isinstance(out, (list, tuple)) or len(out) != len(exp):
            return False
        return all(_close(o, e, atol) for o, e in zip(out, exp, strict=True))
    if not isinstance(out, (int, float, complex)) or not isinstance(exp, (int, float, complex)):
        return False
    if out == exp:
        return True
    return abs(out - exp) <= atol + 1e-7 * abs(exp)  # nan compares False, like numpy


def _same(out, exp, inp, atol, dataset, entry_point):
    """evalplus's verdict for one input: exact match, its per-task oracles, then float closeness."""
    import math

    exact = out == exp
    if dataset == "mbpp":
        if entry_point == "are_equivalent":  # Mbpp/164: evalplus accepts any output
            return True
        if entry_point == "sum_div":
            exact = exact or out == 0
        elif entry_point == "surface_Area":
            b, h = inp
            exact = exact or abs(out - round(b * b + 2 * b * math.sqrt((b / 2) ** 2 + h * h))) <= atol
        elif entry_point == "digit_distance_nums":
            a, b = (str(v) for v in inp)
            a, b = a.zfill(len(b)), b.zfill(len(a))
            exact = exact or out == sum(abs(int(x) - int(y)) for x, y in zip(a, b, strict=True))
        elif entry_point in ("similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
                             "larg_nnum", "intersection_array", "find_dissimilar", "Diff"):  # fmt: skip
            exact = set(out) == set(exp)
        elif entry_point in ("check_str", "text_match_three", "text_starta_endb"):
            exact = out == exp if isinstance(out, bool) else exp == (out is not None)
    if dataset == "humaneval" and entry_point == "find_zero":
        xs = inp[0]
        return abs(sum(c * math.pow(out, i) for i, c in enumerate(xs))) <= atol
    floats = isinstance(exp, float) or (
        isinstance(exp, (list, tuple)) and len(exp) > 0 and all(isinstance(v, float) for v in exp)
    )
    if atol == 0 and floats:
        atol = 1e-6
    if exact or atol == 0:
        return bool(exact)
    return type(out) is type(exp) and _close(out, exp, atol)


def _evalplus_main():
    import signal

    payload, emit = _harness_io()
    inputs = payload["inputs"]
    if payload["dataset"] == "mbpp":
        inputs = [_mbpp_decode(payload["task_no"], args) for args in inputs]
    result = {}
    if "expected" not in payload:  # the canonical solution first: it must not see the candidate
        try:
            result = _evalplus_expected(
                _load_function(payload["canonical"], payload["entry_point"]), inputs, payload
            )
        except BaseException as e:  # MemoryError, or a broken release row
            return emit({"canonical_error": f"{type(e).__name__}: {e}"[:500]})
        payload.update(result)
    try:
        fn = _load_function(payload["code"], payload["entry_point"])
    except BaseException as e:
        return emit({"error": f"loading the program: {type(e).__name__}: {e}"[:500], **result})
    signal.signal(signal.SIGALRM, _on_alarm)
    emit({**_evalplus_check(fn, inputs, payload), **result})


def _load_function(code, name):
    namespace = {"__name__": "__main__"}
    exec(compile(code, "solution.py", "exec"), namespace)
    return namespace[name]


class _InputTimeout(BaseException):  # BaseException: a candidate's `except Exception` can't eat it
    pass


def _on_alarm(signum, frame):
    raise _InputTimeout()


def _evalplus_expected(fn, inputs, payload):
    """The canonical outputs and times, as evalplus's trusted_exec makes them; the pickled outputs
    go back (for the parent to cache) only if they are under payload["cache_bytes"]."""
    import base64
    import copy
    import pickle
    import time

    outputs, times = [], []
    for args in inputs:
        args = copy.deepcopy(args)
        start = time.perf_counter()
        outputs.append(fn(*args))
        times.append(time.perf_counter() - start)
    if payload["dataset"] == "mbpp" and payload["entry_point"] in (
        "check_str",
        "text_match_three",
        "text_starta_endb",
    ):
        outputs = [o is not None for o in outputs]  # match objects: evalplus keeps only "not None"

    class TooBig(Exception):
        pass

    class Counter:  # sizes the pickle without building it
        n = 0

        def write(self, data):
            self.n += len(data)
            if self.n > payload["cache_bytes"]:
                raise TooBig()

    payload["_outputs"] = outputs
    try:
        pickle.dump(outputs, Counter())
    except TooBig:
        return {"times": times, "expected": None}
    return {"times": times, "expected": base64.b64encode(pickle.dumps(outputs)).decode()}


def _evalplus_check(fn, inputs, payload):
    """Call the candidate on every input under its time limit; count passes up to the first failure."""
    import base64
    import pickle
    import signal

    expected = payload.pop("_outputs", None)
    if expected is None:
        expected = pickle.loads(base64.b64decode(payload["expected"]))
    limits = [max(payload["min_time"], payload["time_factor"] * t) for t in payload["times"]]
    passed, failure = 0, None
    for i, args in enumerate(inputs):
        where = f"{payload['split'][i]} input {i}"
        try:
            signal.setitimer(signal.ITIMER_REAL, limits[i])
            try:
                out = fn(*args)  # each input is used once; the canonical run had deep copies
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            same = _same(out, expected[i], args, payload["atol"], payload["dataset"], payload["entry_point"])
            failure = None if same else f"{where}: wrong output"
        except _InputTimeout:
            failure = f"{where}: time limit {limits[i]:.1f}s"
        except BaseException as e:
            failure = f"{where}: {type(e).__name__}: {e}"[:300]
        if failure is None:
            passed += 1
        elif payload["fail_fast"]:
            break
    return {"passed": passed, "failure": failure}


def _stdio_case(code, stdin_text, time_limit):
    """Run the compiled candidate in a forked child with the case's stdin; (exit code, stdout, stderr)."""
    import os
    import select
    import signal
    import sys

    for name, text in (("case.in", stdin_text), ("case.out", ""), ("case.err", "")):
        with open(name, "w") as f:
            f.write(text)
    pid = os.fork()
    if pid == 0:  # the child: becomes the candidate's process
        rc = 1
        try:
            for fd, name in enumerate(("case.in", "case.out", "case.err")):
                os.dup2(os.open(name, os.O_WRONLY if fd else os.O_RDONLY), fd)
            sys.stdin = open(0, closefd=False)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
            try:
                exec(code, {"__name__": "__main__"})
                rc = 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                import traceback

                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)
    pidfd = os.pidfd_open(pid)
    timed_out = not select.select([pidfd], [], [], time_limit)[0]
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    status = os.waitpid(pid, 0)[1]
    os.close(pidfd)
    with open("case.out", errors="replace") as f:
        out = f.read()
    with open("case.err", errors="replace") as f:
        err = f.read()[-300:]
    return ("timeout" if timed_out else os.waitstatus_to_exitcode(status)), out, err


def _output_digest(text):
    """sha256 of stdout with outer whitespace stripped and each line's whitespace runs collapsed."""
    import hashlib

    lines = [" ".join(line.split()) for line in text.strip().splitlines()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _stdio_main():
    payload, emit = _harness_io()
    try:
        code = compile(payload["code"], "solution.py", "exec")
    except BaseException as e:
        return emit({"error": f"{type(e).__name__}: {e}"[:500]})

    passed, failure = 0, None
    for i, case in enumerate(payload["cases"]):
        rc, out, err = _stdio_case(code, case["input"], payload["time_limit"])
        if rc == "timeout":
            failure = f"case {i}: time limit {payload['time_limit']}s"
        elif rc != 0:
            lines = err.strip().splitlines() or ["(no stderr)"]
            failure = f"case {i}: exit code {rc}: {lines[-1]}"
        elif _output_digest(out) != case["digest"]:
            failure = f"case {i}: wrong output"
        else:
            failure = None
            passed += 1
        if failure and payload["fail_fast"]:
            break
    emit({"passed": passed, "failure": failure})


def _harness(main, *helpers) -> str:
    sources = [inspect.getsource(f) for f in (*helpers, main)]
    # os._exit: the verdict is out; the candidate's leftover threads or atexit hooks must not hang it.
    return "\n\n".join(sources) + f"\n\n{main.__name__}()\nimport os\nos._exit(0)\n"


_EVALPLUS_HARNESS = _harness(
    _evalplus_main,
    *(_harness_io, _load_function, _mbpp_decode, _close, _same, _InputTimeout, _on_alarm),
    *(_evalplus_expected, _evalplus_check),
)
_STDIO_HARNESS = _harness(_stdio_main, _harness_io, _stdio_case, _output_digest)
