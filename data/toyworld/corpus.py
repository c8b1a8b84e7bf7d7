"""The pretraining corpus: what a real base model already knows before distillation, in the toy world's terms.

R1's distilled students start from pretrained bases (Qwen2.5, Llama) that read, copy from their context and do
single-step arithmetic; distillation teaches them only the long chain of thought. A random-init student has to
learn all of it from a thousand traces and does not (it stays on the plateau where it writes the right operation
with made-up numbers). The corpus teaches the parts, and none of the held-out problems or their solutions:

- stories: every train story (never a test one) answered with its operand plan only, the numbers copied out of
  the story in order and no results ("79*6", then "-12", then "+9"): reading and copying, no worked solution;
- exercises: column arithmetic on random numbers, one per row, asked as a user turn ("474-12") and answered with
  its working in the gold format, whose first and last lines copy the question: copying from the prompt, the skill
  that separates a student that learns from one on the plateau;
- chains: an operand plan on random numbers (2-4 operations) answered with every step worked in the gold format,
  each later step starting from the previous result: how a solution's later steps carry the running total and
  take their number from the plan, with no story (a story's working is what distillation teaches).

No row holds a step of a held-out problem (a op b), worked or not. Measured (RESULTS.md, "Corpus variants"): with
the exercises as plain text (versions 1-2) the base copied the exact operand plan of 2-19% of the held-out stories
and the distilled proxy student reached 0.06-0.28 pass@1 depending on the seed; asking them as a user turn
(version 3) makes the base copy 92% of the plans, and the proxy student reach 0.62.

Rows are conversations in the curated format (data/README.md), so `python -m sft` trains on them as they are
(with `assistant_only_loss: false`, loss on every token): the story, the exercise or the chain's plan is the user
turn, the plan or the working the assistant's. The same seed gives the same rows.
"""

import io
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq

from data.toyworld.problems import Step, later_step, working

CORPUS_VERSION = 3  # bump when the corpus text changes
CHAIN_STEPS = (2, 4)  # operations per chain, the multi-step problems' 2-3 and one more
FIRST = re.compile(r"(\d+)([+\-*])(\d+)")
LATER = re.compile(r"\)([+\-*])(\d+)")


def corpus_rows(train: list[dict], test: list[dict], seed: int) -> list[dict]:
    """Stories of `train` with their plans, as many exercises as stories, half as many chains; shuffled."""
    rng = random.Random(f"toyworld-corpus-{seed}")
    held_out = {step for problem in test for step in steps_of(problem)}
    rows = [story_row(p) for p in train]
    rows += [exercise_row(s) for s in exercise_steps(rng, len(train), held_out)]
    rows += [chain_row(chain_steps(rng, held_out)) for _ in range(max(1, len(train) // 2))]
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


def plan(steps: list[Step]) -> str:
    """The operand plan: the first operation as the story states it, then each later operator and number."""
    first, *later = steps
    return "\n".join([f"{first.a}{first.op}{first.b}", *(f"{s.op}{s.b}" for s in later)])


def story_row(problem: dict) -> dict:
    return {"kind": "story", "problem_id": problem["id"],
            "messages": [_message("user", problem["prompt"]), _message("assistant", plan(steps_of(problem)))]}


def chain_row(steps: list[Step]) -> dict:
    """A plan on random numbers, answered with each step worked, a later one starting from the previous result."""
    return {"kind": "chain", "problem_id": None,
            "messages": [_message("user", plan(steps)),
                         _message("assistant", "\n".join(line for step in steps for line in working(step)))]}


def exercise_row(step: Step) -> dict:
    """The step asked as it is written ("474-12") and answered with its working, which starts by copying it."""
    return {"kind": "exercise", "problem_id": None,
            "messages": [_message("user", f"{step.a}{step.op}{step.b}"), _message("assistant", "\n".join(working(step)))]}


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


def chain_steps(rng: random.Random, held_out: set[Step]) -> list[Step]:
    """An exercise, then later steps on its running total as the problems make them; no step is held out."""
    while True:
        steps, n = [_exercise(rng)], rng.randint(*CHAIN_STEPS)
        while len(steps) < n:
            steps.append(later_step(rng, steps[-1].result))
        if not held_out.intersection(steps):
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
