"""The `verified` label: every new trace's answer checked with the evals graders.

What is graded is the trace's answer part (`content`), never its reasoning: a trace that reasoned its way
to a number and never wrote an answer (truncated, or stopped inside <think>) has no answer, and taking the
last number of its reasoning would let lucky guesses through. Math: `evals.math_grader` extracts the final
answer (\\boxed{}, "the answer is", last number) and compares it with the problem's gold answer (math-verify);
code: `evals.code_grader` runs the last ```python block of the answer against the problem's tests in the
sandbox. Verdicts:

    correct       the grader accepted the answer
    wrong         an answer that is not the gold one / code that fails a test
    no_answer     no answer to grade (empty answer, no extractable final answer, no code block)
    unverifiable  the problem has no gold answer (math) or no tests (code): not the same as wrong
    timeout       the check ran out of time (math: math_timeout_s; code: the sandbox limits)
    error         the check itself failed (a malformed gold answer or test; a problem missing from the source)
Traces whose request failed (`error` set) are not graded; their successful retry is, when it arrives.
"""

import logging
import time

import pyarrow as pa

from evals.code_extract import extract_code
from evals.code_grader import CODE_GRADER_VERSION, CodeGrader
from evals.grading import Verdict, grade_logged
from evals.math_grader import GRADER_VERSION, MathGrader, extract_answer

log = logging.getLogger(__name__)
MATH_CHUNK = 20_000  # items per grading call: one progress line each
CODE_CHUNK = 64
VERIFIED_SCHEMA = pa.schema([("trace_id", pa.string()), ("verdict", pa.string()), ("extracted", pa.string()),
                             ("method", pa.string()), ("reason", pa.string()), ("grader", pa.string())])


def label_verified(con, workers: int, math_timeout_s: float) -> int:
    """Grade the traces not in `verified` yet; returns how many were graded."""
    con.execute("""CREATE TABLE IF NOT EXISTS verified (trace_id VARCHAR PRIMARY KEY, verdict VARCHAR,
        extracted VARCHAR, method VARCHAR, reason VARCHAR, grader VARCHAR)""")
    todo = con.sql("""
        SELECT t.trace_id, coalesce(t.content, '') AS content, p.problem_id IS NOT NULL AS known, p.domain,
               p.answer, p.tests, p.prompt
        FROM traces t LEFT JOIN problems p USING (problem_id)
        WHERE t.error IS NULL AND t.trace_id NOT IN (SELECT trace_id FROM verified)""").to_arrow_table()
    if not todo.num_rows:
        return 0
    rows = todo.to_pylist()
    start = time.monotonic()
    labels = grade_math([r for r in rows if r["known"] and r["domain"] == "math"], workers, math_timeout_s)
    labels += grade_code([r for r in rows if r["known"] and r["domain"] == "code"], workers)
    labels += [_label(r, Verdict("error", "problem not in the problem source", None, "none"), None)
               for r in rows if not r["known"]]
    con.register("new_verified", pa.Table.from_pylist(labels, schema=VERIFIED_SCHEMA))
    con.execute("INSERT INTO verified SELECT * FROM new_verified")
    con.unregister("new_verified")
    log.info("verified: graded %d traces in %.1fs", len(labels), time.monotonic() - start)
    return len(labels)


def grade_math(rows: list[dict], workers: int, timeout_s: float) -> list[dict]:
    labels = [_label(r, Verdict("unverifiable", "no gold answer", *extract_answer(r["content"])), GRADER_VERSION)
              for r in rows if r["answer"] is None]
    todo = [r for r in rows if r["answer"] is not None]
    if todo:
        with MathGrader(workers=workers, timeout_s=timeout_s) as grader:
            verdicts = grade_logged(grader.grade, [(r["answer"], r["content"]) for r in todo], "verified: math",
                                    MATH_CHUNK)
        labels += [_label(r, v, GRADER_VERSION) for r, v in zip(todo, verdicts, strict=True)]
    return labels


def grade_code(rows: list[dict], workers: int) -> list[dict]:
    labels = [_label(r, Verdict("unverifiable", "no tests", extract_code(r["content"]) or None, "code"),
                     CODE_GRADER_VERSION) for r in rows if r["tests"] is None]
    todo = [r for r in rows if r["tests"] is not None]
    if todo:
        items = [(r["tests"], r["content"], r["prompt"]) for r in todo]
        verdicts = grade_logged(CodeGrader(workers=workers).grade, items, "verified: code", CODE_CHUNK)
        labels += [_label(r, v, CODE_GRADER_VERSION) for r, v in zip(todo, verdicts, strict=True)]
    return labels


def _label(row: dict, v: Verdict, grader: str | None) -> dict:
    return {"trace_id": row["trace_id"], "verdict": v.category, "extracted": v.extracted, "method": v.method,
            "reason": v.detail, "grader": grader}
