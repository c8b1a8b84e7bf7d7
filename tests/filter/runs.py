"""Hand-made run directories for the filter tests: problems + trace/logprob parts in tracegen's schemas."""

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tracegen.records import LOGPROB_SCHEMA, TRACE_SCHEMA, source_key
from tracegen.store import write_problems

CODE_TESTS = {"kind": "functional", "test": "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"}
PROBLEMS = [
    {"id": "m1", "domain": "math", "prompt": "Ada has 3 apples and buys 9 more. How many apples does Ada have?",
     "answer": "12", "tests": None, "source": "hand", "meta": {"difficulty": 1}},
    {"id": "m2", "domain": "math", "prompt": "A shop has 10 pears and sells 3 of them. How many pears are left?",
     "answer": "7", "tests": None, "source": "hand", "meta": {"difficulty": 2}},
    {"id": "nogold", "domain": "math", "prompt": "Write a proof that there are infinitely many primes.",
     "answer": None, "tests": None, "source": "hand", "meta": {}},
    {"id": "c1", "domain": "code", "prompt": "Write a Python function add(a, b) that returns the sum of a and b.",
     "answer": None, "tests": CODE_TESTS, "source": "hand", "meta": {"difficulty": 1}},
]
GOOD_M1 = ("3+9: ones 3+9=12.\nSo Ada has 12 apples.", "The answer is \\boxed{12}.")
GOOD_M2 = ("10-3=7 pears are left in the shop.", "The answer is \\boxed{7}.")
CODE_OK = ("Add the two numbers and return the sum.", "```python\ndef add(a, b):\n    return a + b\n```")
CODE_BAD = ("Subtract them, that is the sum.", "```python\ndef add(a, b):\n    return a - b\n```")
LOOP = " ".join(["then I add the ones again and get twelve"] * 40)
CHINESE = "让我们一步一步地计算这个问题的答案，首先把苹果的数量加起来，然后得到结果。" * 3

# trace_id -> (problem, sample, reasoning, content, finish_reason, error); the comment is the first reason.
TRACES = {
    "good1": ("m1", 0, *GOOD_M1, "stop", None),  # kept
    "good2": ("m1", 1, GOOD_M1[0] + " Let me double check: 3 plus 9 is 12, yes.", GOOD_M1[1], "stop", None),  # kept
    "wrong": ("m1", 2, "3+9=13.", "The answer is \\boxed{13}.", "stop", None),  # unverified
    "failed": ("m2", 0, None, None, None, "HTTP 500: server error"),  # error
    "length": ("m2", 1, "10-3 is ... 10-3 is ...", None, "length", None),  # unfinished
    "noreason": ("m2", 2, None, "\\boxed{7}", "stop", None),  # no_reasoning
    "unclosed": ("m2", 3, GOOD_M2[0], "</think>\nThe answer is \\boxed{7}.", "stop", None),  # unclosed_think
    "noanswer": ("m2", 4, GOOD_M2[0], "I am not sure.", "stop", None),  # no_answer
    "loop": ("m1", 3, LOOP, GOOD_M1[1], "stop", None),  # repetitive
    "mixing": ("m1", 4, CHINESE + " 3+9=12.", GOOD_M1[1], "stop", None),  # language_mixing
    "unsure": ("m2", 5, *GOOD_M2, "stop", None),  # low_confidence (logprobs below)
    "proof": ("nogold", 0, "Suppose finitely many primes p1..pn.", "Then p1*...*pn+1 has a new prime factor.",
              "stop", None),  # kept: unverifiable
    "code_ok": ("c1", 0, *CODE_OK, "stop", None),  # kept
    "code_bad": ("c1", 1, *CODE_BAD, "stop", None),  # unverified
    "orphan": ("gone", 0, *GOOD_M1, "stop", None),  # unverified (problem not in the source: verdict error)
}
FIRST_REASON = {"wrong": "unverified", "failed": "error", "length": "unfinished", "noreason": "no_reasoning",
                "unclosed": "unclosed_think", "noanswer": "no_answer", "loop": "repetitive",
                "mixing": "language_mixing", "unsure": "low_confidence", "code_bad": "unverified",
                "orphan": "unverified"}
KEPT = {"good1", "good2", "proof", "code_ok"}


def trace_row(trace_id, problem_id, sample, reasoning, content, finish, error, prompt=None, tokens=None) -> dict:
    prompt = prompt or next((p["prompt"] for p in PROBLEMS if p["id"] == problem_id), "a lost problem")
    text = (reasoning or "") + (content or "")
    return {"trace_id": trace_id, "request_key": f"key-{problem_id}", "problem_id": problem_id,
            "sample_index": sample, "model": "teacher-x", "messages": json.dumps([{"role": "user", "content": prompt}]),
            "reasoning": reasoning, "content": content, "reasoning_source": "field" if reasoning else "none",
            "finish_reason": finish, "prompt_tokens": 20, "completion_tokens": tokens or len(text.split()) + 4,
            "reasoning_tokens": None, "latency_s": 1.0, "attempts": 1, "error": error, "sampling": "{}",
            "created_at": datetime(2025, 1, 1, tzinfo=UTC)}


def logprob_row(trace_id: str, mean: float, n: int = 6) -> dict:
    """n tokens whose sampled logprob is `mean`; vLLM-style top-3 that lists the sampled token first."""
    return {"trace_id": trace_id, "token_ids": list(range(10, 10 + n)), "logprobs": [mean] * n,
            "top_ids": [[10 + i, 10 + i, 99] for i in range(n)], "top_logprobs": [[mean, mean, -4.0]] * n}


def write_part(run: Path, name: str, traces: list[dict], logprobs: list[dict] = ()) -> None:
    for folder, rows, schema in (("logprobs", logprobs, LOGPROB_SCHEMA), ("traces", traces, TRACE_SCHEMA)):
        if rows:
            (run / folder).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), run / folder / f"{name}.parquet")


def make_run(root: Path, traces: dict = TRACES, problems: list[dict] = PROBLEMS) -> Path:
    """A run directory as tracegen leaves it: problems/, traces/, logprobs/ (and the problems as a JSONL source
    beside it, root/problems.jsonl)."""
    run = root / "run"
    run.mkdir(parents=True)
    (root / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    write_problems(run, problems, source_key({"problems": str(root / "problems.jsonl")}), (0, 1))
    write_part(run, "part-0of1-000000", [trace_row(tid, *row) for tid, row in traces.items()],
               [logprob_row("good1", -0.1), logprob_row("unsure", -3.0)])
    return run


def filter_argv(run: Path, *extra: str, **settings) -> list[str]:
    """Arguments of filter.main.main: a config file for this run (no benchmarks: the tests have no hub)."""
    config = run.parent / "filter.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(run), "contamination_benchmarks": [], "workers": 2,
                                      **settings}))
    return ["--config", str(config), *extra]
