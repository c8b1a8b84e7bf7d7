"""The pretraining corpus: what a real base model already knows before distillation, in the toy world's terms.

R1's distilled students start from pretrained bases (Qwen2.5, Llama) that read, copy from their context and do
single-step arithmetic; distillation teaches them only the long chain of thought. A random-init student has to
learn all of it from a thousand traces and does not (it stays on the plateau where it writes the right operation
with made-up numbers). The corpus teaches the parts, and none of the held-out problems or their solutions:

- stories: every train story (never a test one) answered with its operand plan only, the numbers copied out of
  the story in order and no results ("79*6", then "-12", then "+9"): reading and copying, no worked solution;
- exercises: bare column arithmetic on random numbers ("474-12" worked column by column, the gold format),
  four to a row; any step of a held-out problem (a op b) is excluded;
- drills: one-digit facts, the lines the columns are made of ("7+8=15", "13-7=6", "4*8=32", "32+1=33").

Rows are conversations in the curated format (data/README.md), so `python -m sft` trains on them as they are
(with `assistant_only_loss: false`, loss on every token): a story is a user turn and the plan the assistant's
turn; exercises and drills are one assistant turn of plain text. The same seed gives the same rows.
"""

import io
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq

from data.toyworld.problems import Step, working

CORPUS_VERSION = 1  # bump when the corpus text changes
EXERCISES_PER_ROW, FACTS_PER_ROW = 4, 16
FIRST = re.compile(r"(\d+)([+\-*])(\d+)")
LATER = re.compile(r"\)([+\-*])(\d+)")


def corpus_rows(train: list[dict], test: list[dict], seed: int) -> list[dict]:
    """Stories of `train` with their plans, as many exercises as stories, a tenth as many drill rows; shuffled."""
    rng = random.Random(f"toyworld-corpus-{seed}")
    held_out = {step for problem in test for step in steps_of(problem)}
    rows = [story_row(p) for p in train]
    exercises = exercise_steps(rng, len(train), held_out)
    rows += [plain_row("exercise", "\n\n".join("\n".join(working(s)) for s in exercises[i:i + EXERCISES_PER_ROW]))
             for i in range(0, len(exercises), EXERCISES_PER_ROW)]
    rows += [plain_row("drill", "\n".join(rng.choice(rng.choice(FACTS)) for _ in range(FACTS_PER_ROW)))
             for _ in range(max(1, len(train) // 10))]
    rng.shuffle(rows)
    return rows


def corpus_parquet(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink, compression="zstd")
    return sink.getvalue()


def steps_of(problem: dict) -> list[Step]:
    """The problem's steps, read back from meta.expression ("((12*3)-15)+4")."""
    expression = problem["meta"]["expression"]
    a, op, b = FIRST.search(expression).groups()
    steps = [Step(op, int(a), int(b))]
    for op, b in LATER.findall(expression):
        steps.append(Step(op, steps[-1].result, int(b)))
    return steps


def plan(problem: dict) -> str:
    """The operand plan: the first operation as the story states it, then each later operator and number."""
    first, *later = steps_of(problem)
    return "\n".join([f"{first.a}{first.op}{first.b}", *(f"{s.op}{s.b}" for s in later)])


def story_row(problem: dict) -> dict:
    return {"kind": "story", "problem_id": problem["id"],
            "messages": [_message("user", problem["prompt"]), _message("assistant", plan(problem))]}


def plain_row(kind: str, text: str) -> dict:
    return {"kind": kind, "problem_id": None, "messages": [_message("assistant", text)]}


def _message(role: str, content: str) -> dict:
    return {"role": role, "content": content, "reasoning_content": None}


def exercise_steps(rng: random.Random, n: int, held_out: set[Step]) -> list[Step]:
    """n random one-step exercises of the shapes the solutions use, none equal to a held-out step."""
    steps = []
    while len(steps) < n:
        step = _exercise(rng)
        if step not in held_out:
            steps.append(step)
    return steps


def _exercise(rng: random.Random) -> Step:
    op = rng.choice("+-*")
    if op == "*":  # two digits (a first step or a running total) times one digit
        return Step("*", rng.randint(10, 99), rng.randint(2, 9))
    a = _number(rng)
    if op == "+":
        return Step("+", a, rng.randint(2, 9) if rng.random() < 0.5 else rng.randint(10, 99))
    a = max(a, 12)
    return Step("-", a, rng.randint(2, min(99, a - 2)))


def _number(rng: random.Random) -> int:
    """One to four digits, about equally often: first steps and the running totals of later ones."""
    digits = rng.choice((1, 2, 2, 3, 4))
    return rng.randint(2 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _facts() -> tuple[tuple[str, ...], ...]:
    """Every one-digit fact a column can need, by kind (a drill line picks a kind, then a fact)."""
    return (
        tuple(f"{x}+{y}={x + y}" for x in range(10) for y in range(10)),
        tuple(f"{x}+{y}+1={x + y + 1}" for x in range(10) for y in range(10)),
        tuple(f"{x}-{y}={x - y}" for x in range(10) for y in range(x + 1)),
        tuple(f"1{x}-{y}={10 + x - y}" for x in range(10) for y in range(x + 1, 10)),
        tuple(f"{x}*{k}={x * k}" for x in range(10) for k in range(2, 10)),
        tuple(f"{x * k}+{c}={x * k + c}" for x in range(10) for k in range(2, 10) for c in range(1, k)),
    )


FACTS = _facts()
