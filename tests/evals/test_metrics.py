"""Metrics: unbiased pass@k against brute force, maj@k votes and ties, standard error, by-level breakdown."""

import itertools
import math
import statistics

import pytest

from evals.metrics import ks_for, majority_correct, pass_at_k, score, stderr, vote_key


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The fraction of all k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_large_n():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(1000, 1, 10) == pytest.approx(0.01)
    assert pass_at_k(1000, 500, 64) == pytest.approx(1 - math.comb(500, 64) / math.comb(1000, 64))
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_ks_are_powers_of_two_and_n():
    assert ks_for(1) == [1] and ks_for(4) == [1, 2, 4] and ks_for(6) == [1, 2, 4, 6] and ks_for(16)[-1] == 16


def test_vote_key_normalises_spelling_not_value():
    assert vote_key(" 1,234 ") == vote_key("1234") == vote_key("1234.0") == "1234"
    assert vote_key("\\dfrac{1}{2}") == vote_key("\\frac {1}{2}") == vote_key("$\\tfrac{1}{2}$")
    assert vote_key("\\left( 3, \\pi \\right)") == vote_key("(3,\\pi)")
    assert vote_key("0.50") == vote_key(".5") and vote_key("12") != vote_key("21")


def s(index, extracted, correct):
    return {"sample_index": index, "extracted": extracted, "correct": correct}


def test_majority_vote_counts_answers_and_breaks_ties_by_first_vote():
    assert majority_correct([s(0, "5", False), s(1, "7", True), s(2, "7.0", True)])
    assert not majority_correct([s(0, "5", False), s(1, "5", False), s(2, "7", True)])
    # Ties: the answer voted first wins, whichever is right.
    assert majority_correct([s(0, "7", True), s(1, "5", False), s(2, "5", False), s(3, "7", True)])
    assert not majority_correct([s(0, "5", False), s(1, "7", True), s(2, "7", True), s(3, "5", False)])
    # Samples without an answer do not vote; nobody voting is wrong.
    assert majority_correct([s(0, None, False), s(1, None, False), s(2, "3", True)])
    assert not majority_correct([s(0, None, False), s(1, "  ", False)])


def test_stderr_is_sample_std_over_sqrt_n():
    values = [1.0, 0.5, 0.0, 0.25]
    assert stderr(values) == pytest.approx(statistics.stdev(values) / 2)
    assert stderr([0.3]) == 0.0 and stderr([1.0, 1.0]) == 0.0


def samples_for(table: dict[str, list[tuple[str | None, bool]]], **extra) -> list[dict]:
    return [{"problem_id": pid, "sample_index": i, "extracted": a, "correct": ok, "category": "correct" if ok else "wrong",
             "finish_reason": "stop", "completion_tokens": 10, "error": None, **extra}
            for pid, rows in table.items() for i, (a, ok) in enumerate(rows)]


def test_score_math_with_levels():
    table = {"p1": [("4", True)] * 4,
             "p2": [("7", True), ("7", True), ("9", False), ("7", True)],
             "p3": [("1", True), ("2", False), ("2", False), ("1", True)],  # tie -> "1", voted first
             "p4": [("5", False)] * 4}
    samples = samples_for(table)
    samples[-1].update(finish_reason="length", completion_tokens=30)
    m = score(samples, "math", levels={"p1": "1", "p2": "1", "p3": "2", "p4": None})
    per_problem = [1.0, 0.75, 0.5, 0.0]
    assert m["pass@1"] == pytest.approx(sum(per_problem) / 4)
    assert m["stderr"] == pytest.approx(statistics.stdev(per_problem) / 2, abs=1e-6)
    assert m["maj@k"] == 0.75 and m["k"] == m["n"] == 4 and m["num_problems"] == 4 and m["num_samples"] == 16
    assert m["pass@k"] == 0.75
    expected_p2 = sum(brute_pass_at_k(4, c, 2) for c in (4, 3, 2, 0)) / 4
    assert m["pass@k_curve"] == {"1": m["pass@1"], "2": pytest.approx(expected_p2, abs=1e-6), "4": 0.75}
    assert m["truncation_rate"] == 1 / 16 and m["mean_tokens"] == pytest.approx((15 * 10 + 30) / 16)
    assert m["by_level"] == {"1": {"pass@1": 0.875, "stderr": pytest.approx(0.125), "num_problems": 2},
                             "2": {"pass@1": 0.5, "stderr": 0.0, "num_problems": 1},
                             "None": {"pass@1": 0.0, "stderr": 0.0, "num_problems": 1}}
    assert m["categories"] == {"correct": 9, "wrong": 7} and m["errors"] == 0


def test_score_code_has_no_maj_and_no_levels():
    m = score(samples_for({"a": [("code", True), ("code", False)], "b": [("x", False), ("x", False)]}), "code")
    assert "maj@k" not in m and "by_level" not in m
    assert m["pass@1"] == 0.25 and m["pass@k"] == 0.5 and m["mean_tokens"] == 10


def test_score_needs_the_same_n_for_every_problem():
    with pytest.raises(ValueError, match="problem 'b' has 1 samples, most have 2"):
        score(samples_for({"a": [("1", True)] * 2, "c": [("1", True)] * 2, "b": [("1", True)]}), "math")
