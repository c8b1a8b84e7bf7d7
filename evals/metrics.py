"""Scores from graded samples: pass@1, unbiased pass@k (Chen et al. 2021), maj@k, standard error, by level.

    from evals.metrics import score
    metrics = score(samples, domain="math", levels={"p1": "3", ...})
    metrics["pass@1"], metrics["pass@k"], metrics["maj@k"], metrics["stderr"], metrics["by_level"]

`samples` are graded eval samples (dicts with problem_id, sample_index, correct, extracted, finish_reason,
completion_tokens, error). Every problem must have the same number n of samples; k = n.
- pass@1: the mean over problems of (correct samples / n), i.e. the mean over all samples.
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k), averaged over problems; `pass@k_curve` gives it
  for k = 1, 2, 4, ... and n.
- maj@k (math only; undefined for code, so absent): the majority answer of the n samples, compared by a
  normalised string (`vote_key`); samples without an answer do not vote; a tie goes to the answer voted
  first (lowest sample_index). The majority is right when the samples giving it were graded right.
- stderr: the sample standard deviation of per-problem pass@1 over sqrt(num_problems).
"""

import math
import re
from collections import Counter, defaultdict
from fractions import Fraction

_PLAIN_NUMBER = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$|^[+-]?\.\d+$")
_NOISE = re.compile(r"\\left|\\right|\\[!,;: ]|\s+|^\$+|\$+$|\.$")


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn from n, c of them correct, is correct), as a stable product."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 < k <= n and 0 <= c <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    return sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})


def vote_key(answer: str) -> str:
    """A normalised answer for majority voting: spacing, $, \\left/\\right, \\dfrac and number spellings."""
    key = _NOISE.sub("", answer.strip()).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if _PLAIN_NUMBER.match(key):
        value = Fraction(key.replace(",", ""))
        key = str(value.numerator) if value.denominator == 1 else str(float(value))
    return key


def majority_correct(samples: list[dict]) -> bool:
    """Whether the majority answer of one problem's samples (in sample_index order) is correct."""
    votes: dict[str, list[dict]] = {}  # insertion order = first vote: max() keeps the first of equals
    for s in samples:
        if s["extracted"] is not None and s["extracted"].strip():
            votes.setdefault(vote_key(s["extracted"]), []).append(s)
    if not votes:
        return False
    winners = max(votes.values(), key=len)
    return bool(winners[0]["correct"])


def stderr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(variance / len(values))


def score(samples: list[dict], domain: str, levels: dict[str, str | None] | None = None) -> dict:
    """The metrics of one benchmark (see the module docstring); raises ValueError if n differs by problem."""
    problems = _by_problem(samples)
    n = _common_n(problems)
    correct = {pid: sum(bool(s["correct"]) for s in group) for pid, group in problems.items()}
    pass1 = [c / n for c in correct.values()]
    out = {
        "pass@1": _round(sum(pass1) / len(pass1)),
        "stderr": _round(stderr(pass1)),
        "k": n,
        "pass@k": _round(_mean(pass_at_k(n, c, n) for c in correct.values())),
        "pass@k_curve": {str(k): _round(_mean(pass_at_k(n, c, k) for c in correct.values())) for k in ks_for(n)},
    }
    if domain == "math":
        out["maj@k"] = _round(_mean(majority_correct(group) for group in problems.values()))
    out |= {"n": n, "num_problems": len(problems), "num_samples": len(samples)}
    out |= _generation_stats(samples)
    if levels and any(levels.get(pid) is not None for pid in problems):
        out["by_level"] = _by_level(correct, n, levels)
    return out


def _by_problem(samples: list[dict]) -> dict[str, list[dict]]:
    problems = defaultdict(list)
    for s in samples:
        problems[s["problem_id"]].append(s)
    if not problems:
        raise ValueError("no samples to score")
    return {pid: sorted(group, key=lambda s: s["sample_index"]) for pid, group in problems.items()}


def _common_n(problems: dict[str, list[dict]]) -> int:
    counts = Counter(len(group) for group in problems.values())
    if len(counts) > 1:
        n = counts.most_common(1)[0][0]
        odd = next(pid for pid, group in problems.items() if len(group) != n)
        raise ValueError(f"problem {odd!r} has {len(problems[odd])} samples, most have {n}: pass@k and maj@k "
                         "need the same number of samples for every problem")
    return next(iter(counts))


def _generation_stats(samples: list[dict]) -> dict:
    tokens = [s["completion_tokens"] for s in samples if s.get("completion_tokens") is not None]
    return {
        "truncation_rate": _round(sum(s.get("finish_reason") == "length" for s in samples) / len(samples)),
        "mean_tokens": _round(_mean(tokens)) if tokens else None,
        "errors": sum(s.get("error") is not None for s in samples),  # generation failures, counted as wrong
        "categories": dict(Counter(s["category"] for s in samples).most_common()),
    }


def _by_level(correct: dict[str, int], n: int, levels: dict[str, str | None]) -> dict:
    groups = defaultdict(list)
    for pid, c in correct.items():
        groups[str(levels.get(pid))].append(c / n)  # "None": problems without a level, kept visible
    order = sorted(groups, key=lambda lv: (not lv.isdigit(), int(lv) if lv.isdigit() else 0, lv))
    return {lv: {"pass@1": _round(_mean(groups[lv])), "stderr": _round(stderr(groups[lv])),
                 "num_problems": len(groups[lv])} for lv in order}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _round(x: float) -> float:
    return round(float(x), 6)
