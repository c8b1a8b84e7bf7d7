"""One verdict type for every grader, and the one loop that grades many items with progress lines.

    from evals.grading import Verdict, grade_logged
    verdicts = grade_logged(grader.grade, items, "humaneval")   # MathGrader's or CodeGrader's

A verdict is data, never a string to parse: `category` is one of CATEGORIES (filter's `verified`
label stores it as is), `detail` says why in words, `extracted` is what was judged (the final answer,
or the candidate program), `method` how it was found.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)
CATEGORIES = ("correct", "wrong", "no_answer", "unverifiable", "timeout", "error")
CHUNK = 256  # items per grading call: one progress line each


@dataclass(frozen=True)
class Verdict:
    category: str  # see CATEGORIES
    detail: str  # "ok", "mismatch", "base input 3: wrong output", "wall-clock limit 10.0s", ...
    extracted: str | None  # the answer or program that was judged (None: nothing to judge)
    method: str = ""  # how it was extracted: "boxed", "answer_is", ... for math; "code" for code
    passed: int = 0  # tests passed (fail-fast: those before the first failure)
    total: int = 0

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"verdict category {self.category!r} is not one of {CATEGORIES}")

    @property
    def correct(self) -> bool:
        return self.category == "correct"


def grade_logged(grade: Callable[[Sequence[tuple]], list[Verdict]], items: Sequence[tuple], name: str,
                 chunk: int = CHUNK) -> list[Verdict]:
    """grade(items) in chunks of `chunk`, with a progress line per chunk when there are several."""
    verdicts: list[Verdict] = []
    start = time.monotonic()
    for i in range(0, len(items), chunk):
        verdicts += grade(items[i:i + chunk])
        if len(items) > chunk:
            log.info("%s: graded %d/%d (%.0fs)", name, len(verdicts), len(items), time.monotonic() - start)
    return verdicts
