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

from evals.code_grader import CODE_GRADER_VERSION, CodeGrader, extract_code
from evals.math_grader import GRADER_VERSION, MathGrader, extract_answer

log = logging.getLogger(__name__)
MATH_CHUNK = 20_000  # answers per grading call: one log line each
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
    labels += [_label(r, "error", None, "none", "problem not in the problem source", None)
               for r in rows if not r["known"]]
    con.register("new_verified", pa.Table.from_pylist(labels, schema=VERIFIED_SCHEMA))
    con.execute("INSERT INTO verified SELECT * FROM new_verified")
    con.unregister("new_verified")
    log.info("verified: graded %d traces in %.1fs", len(labels), time.monotonic() - start)
    return len(labels)


def grade_math(rows: list[dict], workers: int, timeout_s: float) -> list[dict]:
    labels, gradable = [], []
    for r in rows:
        extracted, method = extract_answer(r["content"]) if r["content"].strip() else (None, "none")
        if r["answer"] is None:
            labels.append(_label(r, "unverifiable", extracted, method, "no gold answer", GRADER_VERSION))
        elif extracted is None:
            labels.append(_label(r, "no_answer", None, method, "no_answer", GRADER_VERSION))
        else:
            gradable.append((r, extracted, method))
    if gradable:
        with MathGrader(workers=workers, timeout_s=timeout_s) as grader:
            for i in range(0, len(gradable), MATH_CHUNK):
                chunk = gradable[i:i + MATH_CHUNK]
                verdicts = grader.grade_answers((r["answer"], extracted) for r, extracted, _ in chunk)
                for (r, extracted, method), v in zip(chunk, verdicts, strict=True):
                    labels.append(_label(r, _math_verdict(v.reason), extracted, method, v.reason, GRADER_VERSION))
                log.info("verified: math %d/%d", min(i + MATH_CHUNK, len(gradable)), len(gradable))
    return labels


def _math_verdict(reason: str) -> str:
    if reason.startswith("error"):
        return "error"
    return {"ok": "correct", "mismatch": "wrong", "no_answer": "no_answer", "timeout": "timeout"}.get(reason, "wrong")


def grade_code(rows: list[dict], workers: int) -> list[dict]:
    labels = [_label(r, "unverifiable", extract_code(r["content"]) or None, "code", "no tests", CODE_GRADER_VERSION)
              for r in rows if r["tests"] is None]
    todo = [r for r in rows if r["tests"] is not None]
    grader = CodeGrader(workers=workers)
    for i in range(0, len(todo), CODE_CHUNK):
        chunk = todo[i:i + CODE_CHUNK]
        verdicts = grader.grade((r["tests"], r["content"], r["prompt"]) for r in chunk)
        for r, v in zip(chunk, verdicts, strict=True):
            labels.append(_label(r, _code_verdict(v.reason), extract_code(r["content"]) or None, "code", v.reason,
                                 CODE_GRADER_VERSION))
        log.info("verified: code %d/%d", min(i + CODE_CHUNK, len(todo)), len(todo))
    return labels


def _code_verdict(reason: str) -> str:
    if reason == "ok":
        return "correct"
    if reason == "no_code":
        return "no_answer"
    return reason.split(":")[0] if reason.startswith(("timeout", "error")) else "wrong"


def _label(row: dict, verdict: str, extracted, method: str, reason: str, grader: str | None) -> dict:
    return {"trace_id": row["trace_id"], "verdict": verdict, "extracted": extracted, "method": method,
            "reason": reason, "grader": grader}
