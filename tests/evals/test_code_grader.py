"""Code grader: candidate extraction, plain data, the three `tests` kinds, and the real HumanEval(+)/MBPP+ sets."""

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from evals import code_grader
from evals.code_extract import extract_code
from evals.code_grader import CODE_GRADER_VERSION, CodeGrader, evalplus_tests
from evals.jail import plain

BENCHMARKS = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"

ADD_PROMPT = 'from typing import List\n\n\ndef add(a: float, b: float) -> float:\n    """Sum."""\n'
ADD = {
    "kind": "evalplus",
    "task_id": "HumanEval/9001",
    "entry_point": "add",
    "prompt": ADD_PROMPT,
    "canonical_solution": "    return a + b\n",
    "base_input": [[1, 2], [3, 4]],
    "plus_input": [[10**6, 1], [0.1, 0.2]],
    "atol": 0,
}


@pytest.fixture(scope="module")
def grader():
    return CodeGrader(workers=4)


def _grade(grader, tests, completion, prompt=""):
    [verdict] = grader.grade([(tests, completion, prompt)])
    return verdict


def _brief(verdict) -> tuple:
    return verdict.category, verdict.detail, verdict.passed, verdict.total


def _release(rel: str) -> list[dict]:
    path = BENCHMARKS / rel
    if not path.exists():
        pytest.skip(f"{path} not found (benchmarks live beside the repository)")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- extraction


def test_extract_code_takes_last_python_block_after_think():
    text = "<think>```python\nbad()\n```</think>Try:\n```python\nx = 1\n```\nor better\n```py\nx = 2\n```\n"
    assert extract_code(text) == "x = 2\n"


def test_extract_code_fallbacks():
    assert extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert extract_code("```text\nnot code\n```\n```python\nx = 1\n```") == "x = 1\n"
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"
    assert extract_code("<think>```python\nx = 1\n```") == ""  # reasoning never finished


# ----------------------------------------------------------------------------- plain data


def test_plain_data_round_trips_builtin_values_in_canonical_text():
    value = [1, 2**100, -0.5, float("inf"), 1 + 2j, "s\t\n", b"\x00", (1, (2,)), {3, 1, 2}, frozenset({1}),
             {(1, 2): [None, True]}, {"b": 1, "a": 2}]
    text, floats = plain.dumps(value)
    assert plain.loads(text) == value and floats
    assert "\n" not in text and "\t" not in text  # one result line
    assert plain.dumps({2, 1, 3}) == plain.dumps({3, 2, 1})  # equal values, equal text
    assert list(plain.loads(plain.dumps({"b": 1, "a": 2})[0])) == ["b", "a"]  # dict order shows in iteration
    assert plain.loads(plain.dumps(map(str, [1, 2]))[0]) == ["1", "2"]  # iterators cross as lists


def test_plain_data_leaves_every_custom_method_behind():
    always = {"__eq__": lambda s, o: True, "__hash__": lambda s: 0}
    yes, my_int = type("Yes", (), always)(), type("MyInt", (int,), always)(3)
    forged = type("Forged", (), {**always, "__class__": property(lambda s: int)})()
    rebuilt = plain.loads(plain.dumps([yes, my_int, forged, Counter("aab"), print])[0])
    assert type(rebuilt[1]) is int and rebuilt[1] == 3  # an int subclass crosses as its value
    assert type(rebuilt[3]) is dict and rebuilt[3] == {"a": 2, "b": 1}
    for opaque in (rebuilt[0], rebuilt[2], rebuilt[4]):  # anything else: a name and a truth value
        assert isinstance(opaque, plain.Opaque) and bool(opaque)
        assert opaque != plain.Opaque(opaque.type_name, True) and opaque != 1 and opaque != rebuilt[1]


# ----------------------------------------------------------------------------- functional


def test_functional_body_gets_the_prompt_and_passes(grader):
    tests = {"kind": "functional", "entry_point": "add", "test": "def check(f):\n    assert f(2, 3) == 5\n"}
    body = "```python\n    return a + b\n```"
    verdict = _grade(grader, tests, body, ADD_PROMPT)
    assert _brief(verdict) == ("correct", "ok", 1, 1) and verdict.extracted == "    return a + b\n"
    # A full def keeps the prompt's imports (the model left out `from typing import List`).
    full = "def add(a: List[int], b) -> int:\n    return a + b\n"
    assert _grade(grader, tests, full, ADD_PROMPT).correct


def test_functional_failures_name_the_cause(grader):
    tests = {"kind": "functional", "entry_point": "add", "test": "def check(f):\n    assert f(2, 3) == 5\n"}
    wrong = _grade(grader, tests, "    return a - b\n", ADD_PROMPT)
    assert wrong.category == "wrong" and wrong.passed == 0
    assert wrong.detail == "AssertionError:  (tests line 2: assert f(2, 3) == 5)"
    broken = _grade(grader, tests, "def add(a, b:\n    pass\n", ADD_PROMPT)
    assert broken.category == "wrong" and broken.detail.startswith("loading the program: SyntaxError")
    empty = _grade(grader, tests, "```python\n\n```", ADD_PROMPT)
    assert (empty.category, empty.extracted) == ("no_answer", None)


def test_functional_bare_asserts_mbpp_style(grader):
    tests = json.dumps({"kind": "functional", "test": "assert sq(3) == 9\nassert sq(-2) == 4\n"})
    assert _grade(grader, tests, "def sq(x):\n    return x * x\n").correct
    assert not _grade(grader, tests, "def sq(x):\n    return x + x\n").correct


# ----------------------------------------------------------------------------- evalplus


def test_evalplus_correct_candidate_passes_every_input(grader):
    verdict = _grade(grader, ADD, "    return a + b\n", ADD_PROMPT)
    assert _brief(verdict) == ("correct", "ok", 4, 4)
    # floats compare with atol 1e-6 (evalplus's default for float outputs), ints exactly
    close = "    s = a + b\n    return round(s, 9) if isinstance(s, float) else s\n"
    assert _grade(grader, ADD, close, ADD_PROMPT).correct
    off = "    s = a + b\n    return s + 1e-3 if isinstance(s, float) else s\n"
    assert _grade(grader, ADD, off, ADD_PROMPT).detail == "plus input 3: wrong output"


def test_evalplus_wrong_candidate_fails_fast_or_counts(grader):
    wrong = _grade(grader, ADD, "    return a - b\n", ADD_PROMPT)
    assert (wrong.correct, wrong.passed, wrong.total) == (False, 0, 4)
    assert (wrong.category, wrong.detail) == ("wrong", "base input 0: wrong output")
    half = "    return a + b if a < 5 else 0\n"
    counting = CodeGrader(workers=1, fail_fast=False).grade([(ADD, half, ADD_PROMPT)])[0]
    assert (counting.correct, counting.passed, counting.total) == (False, 3, 4)


def test_evalplus_input_time_limit(grader, monkeypatch):
    monkeypatch.setattr(code_grader, "MIN_INPUT_TIME_S", 0.5)
    verdict = _grade(grader, ADD, "    while True:\n        pass\n", ADD_PROMPT)
    assert (verdict.category, verdict.detail) == ("wrong", "base input 0: time limit 0.5s")


def test_evalplus_mbpp_inputs_are_decoded_and_oracles_apply(grader):
    # Mbpp/2 passes tuples (released as JSON lists) and compares outputs as sets.
    tests = {
        "kind": "evalplus",
        "task_id": "Mbpp/2",
        "entry_point": "similar_elements",
        "prompt": '"""\nWrite a function to find the shared elements.\n"""\n',
        "canonical_solution": "\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
        "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]]],
        "plus_input": {},  # as Mbpp/793 is released: no plus inputs
        "atol": 0,
    }
    picky = "def similar_elements(a, b):\n    assert isinstance(a, tuple)\n    return sorted(set(a) & set(b), reverse=True)\n"
    assert _brief(_grade(grader, tests, picky)) == ("correct", "ok", 1, 1)


def test_evalplus_find_zero_oracle(grader):
    rows = {
        "kind": "evalplus",
        "task_id": "HumanEval/32",
        "entry_point": "find_zero",
        "prompt": "def find_zero(xs):\n",
        "canonical_solution": "    return -xs[0] / xs[1]\n",
        "base_input": [[[2.0, 4.0]]],
        "plus_input": [],
        "atol": 1e-4,
    }
    # any x with |poly(x)| <= atol is a root, not only the one the canonical solution returns
    assert _grade(grader, rows, "def find_zero(xs):\n    return -xs[0] / xs[1] + 1e-6\n").correct
    assert not _grade(grader, rows, "def find_zero(xs):\n    return 1.0\n").correct


def test_broken_tests_and_canonical_become_errors(grader):
    bad_canonical = {**ADD, "canonical_solution": "    return a +\n"}
    verdict = _grade(grader, bad_canonical, "    return a + b\n", ADD_PROMPT)
    assert verdict.category == "error"
    assert verdict.detail.startswith("canonical solution failed: loading the program: SyntaxError")
    assert _grade(grader, "{not json", "x = 1").detail.startswith("bad tests: JSONDecodeError")
    assert _brief(_grade(grader, {"kind": "quiz"}, "x = 1"))[:2] == (
        "error", "bad tests: ValueError: tests kind 'quiz' is not one of functional, evalplus, stdio")
    with pytest.raises(ValueError, match="kind 'quiz'"):
        grader.grade_one({"kind": "quiz"}, "x = 1")


# ----------------------------------------------------------------------------- stdio

SUM = {
    "kind": "stdio",
    "cases": [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}],
    "time_limit_s": 2,
}


@pytest.mark.parametrize(
    "program",
    [
        "a, b = map(int, input().split())\nprint(a + b)",
        "import sys\na, b = map(int, sys.stdin.buffer.read().split())\nsys.stdout.write(f'  {a + b}  \\n\\n')",
        "print(sum(map(int, open(0).read().split())))",
        "import os, sys\nprint(sum(map(int, sys.stdin.readline().split())))\nsys.stdout.flush()\nos._exit(0)",
        "def main():\n    print(sum(map(int, input().split())))\n\nif __name__ == '__main__':\n    main()",
    ],
)
def test_stdio_accepts_common_io_styles(grader, program):
    assert _brief(_grade(grader, SUM, f"```python\n{program}\n```")) == ("correct", "ok", 2, 2)


def test_stdio_failures(grader):
    wrong = _grade(grader, SUM, "print(3)")
    assert _brief(wrong) == ("wrong", "case 1: wrong output", 1, 2)
    crash = _grade(grader, SUM, "raise ValueError('boom')")
    assert (crash.category, crash.detail) == ("wrong", "case 0: exit code 1: ValueError: boom")
    slow = _grade(grader, {**SUM, "time_limit_s": 0.5}, "while True:\n    pass")
    assert (slow.category, slow.detail) == ("wrong", "case 0: time limit 0.5s")


def test_stdio_expected_output_is_not_visible_to_the_candidate(grader):
    tests = {"kind": "stdio", "cases": [{"input": "", "output": "SECRET-7d1f"}]}
    snoop = (
        "import gc, os, sys\n"
        "seen = [o for o in gc.get_objects() if isinstance(o, (str, dict))]\n"
        "text = ' '.join(str(o) for o in seen) + ' '.join(open(f).read() for f in os.listdir('.') if os.path.isfile(f))\n"
        "i = text.find('SECRET-')\n"
        "print(text[i:i + 11] if i >= 0 else 'nothing')\n"
    )
    assert _grade(grader, tests, snoop).detail == "case 0: wrong output"


def test_grade_keeps_order_and_version():
    items = [(SUM, "print(sum(map(int, input().split())))", ""), (SUM, "print(0)", "")] * 4
    verdicts = CodeGrader(workers=3).grade(items)
    assert [v.correct for v in verdicts] == [True, False] * 4
    assert CODE_GRADER_VERSION.startswith("code-v2")


# ----------------------------------------------------------------------------- real benchmarks

# Deliberately broken variants: `return None`, and the canonical answer off by one.
OFF_BY_ONE = """

_real_{e} = {e}


def {e}(*args, **kwargs):
    out = _real_{e}(*args, **kwargs)
    if isinstance(out, bool):
        return not out
    if isinstance(out, (int, float)):
        return out + 1
    if isinstance(out, str):
        return out + "x"
    if isinstance(out, (list, tuple)):
        return out[:-1] if out else type(out)([0])
    return 0 if out is None else None
"""


def _broken(row: dict, solution: str) -> list[str]:
    return [
        f"def {row['entry_point']}(*args, **kwargs):\n    return None\n",
        solution + OFF_BY_ONE.format(e=row["entry_point"]),
    ]


def _failures(verdicts, rows) -> list[tuple[str, str]]:
    return [(r["task_id"], v.detail) for r, v in zip(rows, verdicts, strict=True) if not v.correct]


@pytest.mark.benchmarks
def test_humaneval_canonical_solutions_pass_and_broken_fail(grader):
    rows = _release("humaneval/HumanEval.jsonl.gz")
    assert len(rows) == 164
    tests = [{"kind": "functional", "test": r["test"], "entry_point": r["entry_point"]} for r in rows]
    verdicts = grader.grade(
        (t, r["canonical_solution"], r["prompt"]) for t, r in zip(tests, rows, strict=True)
    )
    assert _failures(verdicts, rows) == []
    for variant in (0, 1):
        broken = [_broken(r, r["prompt"] + r["canonical_solution"])[variant] for r in rows]
        verdicts = grader.grade(zip(tests, broken, (r["prompt"] for r in rows), strict=True))
        assert [r["task_id"] for r, v in zip(rows, verdicts, strict=True) if v.correct] == []


# Release rows whose own tests are wrong, with why (checked by hand).
MBPP_ASSERTION_BUGS = {"Mbpp/120": "its assertion calls math.isclose but never imports math"}


@pytest.mark.benchmarks
def test_mbppplus_canonical_solutions_pass_their_assertions(grader):
    rows = _release("mbppplus/MbppPlus.jsonl.gz")
    verdicts = grader.grade(
        ({"kind": "functional", "test": r["assertion"]}, r["canonical_solution"], "") for r in rows
    )
    assert dict(_failures(verdicts, rows)).keys() == MBPP_ASSERTION_BUGS.keys()


@pytest.mark.benchmarks
@pytest.mark.slow
def test_humanevalplus_canonical_solutions_pass_base_and_plus_and_broken_fail(grader):
    rows = _release("humanevalplus/HumanEvalPlus.jsonl.gz")
    assert len(rows) == 164
    tests = [evalplus_tests(r) for r in rows]
    verdicts = grader.grade(
        (t, r["canonical_solution"], r["prompt"]) for t, r in zip(tests, rows, strict=True)
    )
    assert _failures(verdicts, rows) == []
    assert all(
        v.total == len(r["base_input"]) + len(r["plus_input"]) for v, r in zip(verdicts, rows, strict=True)
    )
    for variant in (0, 1):
        broken = [_broken(r, r["prompt"] + r["canonical_solution"])[variant] for r in rows]
        verdicts = grader.grade(zip(tests, broken, (r["prompt"] for r in rows), strict=True))
        assert [r["task_id"] for r, v in zip(rows, verdicts, strict=True) if v.correct] == []


@pytest.mark.benchmarks
@pytest.mark.slow
def test_mbppplus_canonical_solutions_pass_base_and_plus_and_broken_fail(grader):
    rows = _release("mbppplus/MbppPlus.jsonl.gz")
    assert len(rows) == 378
    tests = [evalplus_tests(r) for r in rows]
    verdicts = grader.grade(
        (t, r["canonical_solution"], r["prompt"]) for t, r in zip(tests, rows, strict=True)
    )
    assert _failures(verdicts, rows) == []
    for variant in (0, 1):
        broken = [_broken(r, r["canonical_solution"])[variant] for r in rows]
        verdicts = grader.grade(zip(tests, broken, (r["prompt"] for r in rows), strict=True))
        assert [r["task_id"] for r, v in zip(rows, verdicts, strict=True) if v.correct] == []
