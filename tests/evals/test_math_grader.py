"""Math grader: extraction, math-verify comparison (gold first), deadlines, and real benchmarks."""

import json
import threading
import time
from pathlib import Path

import pytest

from evals.math_grader import GRADER_VERSION, MathGrader, extract_answer

BENCHMARKS = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"
HANGS = "9^{9^{9^{9}}}"  # sympy evaluates the tower: minutes of big-integer arithmetic


@pytest.fixture(scope="module")
def grader():
    with MathGrader(workers=2, timeout_s=10.0) as g:
        yield g


def _benchmark(rel: str) -> list[dict]:
    path = BENCHMARKS / rel
    if not path.exists():
        pytest.skip(f"{path} not found (benchmarks live beside the repository)")
    return [json.loads(line) for line in path.open()]


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}}.", ("\\frac{1}{2}", "boxed")),
        ("\\boxed{1} then \\boxed{\\sqrt{x^{2}}}", ("\\sqrt{x^{2}}", "boxed")),
        ("\\fbox{42}", ("42", "boxed")),
        ("\\boxed {\\text{(B)}}", ("\\text{(B)}", "boxed")),
        ("Thus the answer is 18 dollars.\nDone", ("18", "answer_is")),
        ("The final answer is $\\frac{3}{4}$.", ("\\frac{3}{4}", "answer_is")),
        ("**Answer:** 7", ("7", "answer_is")),
        ("Answer: (C)\n", ("(C)", "answer_is")),
        ("16 - 3 = 13\n#### 1,234", ("1,234", "hash")),
        ("so the answer is 5 per box\n#### 20", ("20", "hash")),  # the later marker wins
        ("#### 20\nOn reflection, the answer is $18.", ("18", "answer_is")),
        ("first 3, then 4.5 and finally -12.", ("-12", "last_number")),
        ("no numbers here", (None, "none")),
        ("", (None, "none")),
    ],
)
def test_extract_answer_methods(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_reads_only_after_think():
    assert extract_answer("<think>maybe \\boxed{3}</think>It is \\boxed{4}") == ("4", "boxed")
    assert extract_answer("<think>so 3</think>The answer is 5") == ("5", "answer_is")
    # R1 templates put <think> in the prompt: only the closing tag is in the completion.
    assert extract_answer("reasoning 12\n</think>\n\nFinal: 13") == ("13", "last_number")
    # Unfinished reasoning (cut by max_tokens) is not an answer, whatever numbers it holds.
    assert extract_answer("<think>try 12, then \\boxed{13}") == (None, "none")


def test_extract_boxed_with_unbalanced_last_falls_back_to_earlier():
    assert extract_answer("\\boxed{2} and \\boxed{3") == ("2", "boxed")


# ----------------------------------------------------------------------------- comparison


@pytest.mark.parametrize(
    "gold, answer",
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac12"),
        ("1,234", "1234"),
        ("1234", "1,234"),
        ("\\text{(B)}", "B"),
        ("\\text{(B)}", "(B)"),
        ("10\\%", "10"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("x^2+1", "1+x^2"),
        ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
        ("18", "\\$18.00"),
        ("007", "7"),
    ],
)
def test_equivalent_forms_are_correct(grader, gold, answer):
    [v] = grader.grade_answers([(gold, answer)])
    assert v.correct, v
    assert v.category == "correct" and v.method == "given" and v.extracted == answer


@pytest.mark.parametrize(
    "gold, answer", [("1,234", "1.234"), ("3", "30"), ("\\text{(B)}", "(C)"), ("0.5", "\\frac13")]
)
def test_different_answers_are_mismatches(grader, gold, answer):
    [v] = grader.grade_answers([(gold, answer)])
    assert not v.correct and (v.category, v.detail) == ("wrong", "mismatch"), v


def test_gold_goes_first(grader):
    # math-verify is asymmetric: a relation in the gold accepts the interval as an answer,
    # an interval in the gold does not accept the bare relation.
    right_way, wrong_way = grader.grade_answers([("1<x<2", "(1,2)"), ("(1,2)", "1<x<2")])
    assert right_way.correct and not wrong_way.correct


def test_grade_extracts_and_reports_method(grader):
    verdicts = grader.grade(
        [
            ("18", "She makes 9 * 2 = $18 every day.\n#### 18"),
            ("\\frac{1}{2}", "<think>it is 2</think>So the probability is $\\boxed{0.5}$."),
            ("5", "I am not sure."),
            ("5", "<think>5 5 5"),
        ]
    )
    assert [(v.correct, v.method, v.category) for v in verdicts] == [
        (True, "hash", "correct"),
        (True, "boxed", "correct"),
        (False, "none", "no_answer"),
        (False, "none", "no_answer"),
    ]


def test_grade_answers_empty_answer_is_no_answer(grader):
    assert [v.category for v in grader.grade_answers([("1", ""), ("1", "  ")])] == ["no_answer"] * 2
    assert grader.grade_answers([]) == []


def test_version_names_math_verify():
    assert "math-verify 0.9.0" in GRADER_VERSION


# ----------------------------------------------------------------------------- deadlines and crashes


def test_hanging_check_times_out_and_grader_keeps_working():
    with MathGrader(workers=1, timeout_s=1.0) as g:
        start = time.monotonic()
        verdicts = g.grade_answers([("1", HANGS), ("\\frac{1}{2}", "0.5"), ("x+1", "1+x")])
        assert time.monotonic() - start < 20
        assert [v.category for v in verdicts] == ["timeout", "correct", "correct"]
        # The replacement worker grades the next call; the hang is cached, not re-run.
        again = g.grade_answers([("1", HANGS), ("\\sqrt{4}", "2")])
        assert [v.category for v in again] == ["timeout", "correct"]


def test_killed_worker_becomes_error_and_grader_keeps_working():
    with MathGrader(workers=1, timeout_s=60.0) as g:
        result = {}
        job = threading.Thread(
            target=lambda: result.update(v=g.grade_answers([("1", HANGS), ("2", "\\sqrt{4}")]))
        )
        job.start()
        deadline = time.monotonic() + 60
        while not (g._workers and g._workers[0].ready and g._workers[0].inflight):
            assert time.monotonic() < deadline, "worker never picked up the item"
            time.sleep(0.05)
        time.sleep(0.3)
        g._workers[0].proc.kill()  # what the OOM killer would do
        job.join(60)
        assert not job.is_alive()
        hung, fine = result["v"]
        assert hung.category == "error" and hung.detail.startswith("math worker died") and not hung.correct
        assert fine.correct


# ----------------------------------------------------------------------------- real benchmarks


@pytest.mark.benchmarks
def test_gsm8k_references_are_all_correct(grader):
    rows = _benchmark("gsm8k/test.jsonl")
    assert len(rows) == 1319
    golds = [r["answer"].split("####")[-1].strip() for r in rows]
    verdicts = grader.grade(zip(golds, (r["answer"] for r in rows), strict=True))
    wrong = [(i, v) for i, v in enumerate(verdicts) if not v.correct]
    assert not wrong
    assert {v.method for v in verdicts} == {"hash"}


@pytest.mark.benchmarks
def test_math500_references_are_all_correct(grader):
    rows = _benchmark("math500/test.jsonl")
    assert len(rows) == 500
    verdicts = grader.grade((r["answer"], r["solution"]) for r in rows)
    assert [(i, v) for i, v in enumerate(verdicts) if not v.correct] == []


@pytest.mark.benchmarks
def test_math500_references_pass_through_math_verify(grader):
    # The boxed answers equal the golds character for character, which the shortcut settles; in
    # another (equivalent) spelling they must go through math-verify itself.
    rows = _benchmark("math500/test.jsonl")
    answers = [extract_answer(r["solution"])[0] for r in rows]
    respelled = [a.replace("\\left", "").replace("\\right", "").replace("\\frac", "\\tfrac") for a in answers]
    golds = [r["answer"] for r in rows]
    assert sum(a != g for a, g in zip(respelled, golds, strict=True)) >= 60
    verdicts = grader.grade_answers(zip(golds, respelled, strict=True))
    assert [(i, respelled[i], v.detail) for i, v in enumerate(verdicts) if not v.correct] == []


# Golds of different problems that are nevertheless the same answer: math-verify rightly
# accepts them (x=5 is 5), so they are no evidence of a lenient grader.
SAME_ANSWER_ELSEWHERE = {("x=5", "5"), ("5", "x=5")}


@pytest.mark.benchmarks
def test_math500_reference_is_wrong_against_another_gold(grader):
    rows = _benchmark("math500/test.jsonl")
    pairs = [(rows[(i + 1) % len(rows)]["answer"], r) for i, r in enumerate(rows)]
    pairs = [(gold, r) for gold, r in pairs if gold.strip() != r["answer"].strip()]
    pairs = [(gold, r) for gold, r in pairs if (gold, r["answer"]) not in SAME_ANSWER_ELSEWHERE]
    verdicts = grader.grade((gold, r["solution"]) for gold, r in pairs)
    lenient = [(gold, r["answer"]) for (gold, r), v in zip(pairs, verdicts, strict=True) if v.correct]
    assert lenient == []
    assert len(pairs) > 490
