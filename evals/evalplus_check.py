"""evalplus's verdict on one output, made OUTSIDE the sandbox from plain data (evals/jail/plain.py).

Text first: equal canonical texts (or digests, for outputs hashed for size) are equal outputs. Else
both sides are rebuilt from builtin types and judged as evalplus does: exact equality, its per-task
oracles, then float closeness (numpy.allclose(rtol=1e-7, atol); atol 0 with float outputs means 1e-6).
"""

import math

from evals.jail.mbpp_inputs import NOT_NONE_TASKS
from evals.jail.plain import OPAQUE_TAG, digest, loads


def same_output(text: str | None, sha: str | None, expected: tuple, args, atol: float, dataset: str,
                entry_point: str) -> bool:
    """`text` (or `sha` of an output too large to send) against `expected`: ("text", t) or ("sha", d)."""
    kind, value = expected
    if kind == "sha":
        return (sha or digest(text or "")) == value
    if text is None:
        return False
    if text == value and OPAQUE_TAG not in text:  # an opaque value equals nothing, not even itself
        return not (dataset == "humaneval" and entry_point == "find_zero" and not _root(loads(text), args, atol))
    try:
        out = loads(text)
    except (ValueError, TypeError, KeyError, RecursionError):
        return False
    return _same(out, loads(value), args, atol, dataset, entry_point)


def _root(out, args, atol) -> bool:
    try:
        return abs(sum(c * math.pow(out, i) for i, c in enumerate(args[0]))) <= atol
    except (TypeError, ValueError, OverflowError):
        return False


def _same(out, exp, inp, atol, dataset, entry_point) -> bool:
    exact = out == exp  # builtin values only: no custom __eq__ can answer here
    if dataset == "mbpp":
        if entry_point == "are_equivalent":  # Mbpp/164: evalplus accepts any output
            return True
        exact = exact or _mbpp_oracle(out, exp, inp, atol, entry_point)
    if dataset == "humaneval" and entry_point == "find_zero":
        return _root(out, inp, atol)
    floats = isinstance(exp, float) or (
        isinstance(exp, (list, tuple)) and len(exp) > 0 and all(isinstance(v, float) for v in exp)
    )
    if atol == 0 and floats:
        atol = 1e-6
    if exact or atol == 0:
        return bool(exact)
    return type(out) is type(exp) and _close(out, exp, atol)


def _mbpp_oracle(out, exp, inp, atol, entry_point) -> bool:
    try:
        if entry_point == "sum_div":
            return out == 0
        if entry_point == "surface_Area":
            b, h = inp
            return abs(out - round(b * b + 2 * b * math.sqrt((b / 2) ** 2 + h * h))) <= atol
        if entry_point == "digit_distance_nums":
            a, b = (str(v) for v in inp)
            a, b = a.zfill(len(b)), b.zfill(len(a))
            return out == sum(abs(int(x) - int(y)) for x, y in zip(a, b, strict=True))
        if entry_point in ("similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
                           "larg_nnum", "intersection_array", "find_dissimilar", "Diff"):  # fmt: skip
            return set(out) == set(exp)
        if entry_point in NOT_NONE_TASKS:
            return out == exp if isinstance(out, bool) else exp == (out is not None)
    except (TypeError, ValueError, OverflowError):
        return False
    return False


def _close(out, exp, atol) -> bool:
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
