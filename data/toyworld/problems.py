"""Arithmetic word problems of graded difficulty, each with a gold column-arithmetic solution.

Difficulty 1: add two one- or two-digit numbers; 2: two-digit subtraction; 3: two-digit times one-digit;
4: two steps; 5: three steps (the later steps act on the running total with +, - or x one digit).
Every step is worked column by column, right to left, the way a tiny transformer can imitate:

    47+38
    ones: 7+8=15, write 5 carry 1
    tens: 4+3+1=8
    47+38=85
    The answer is \\boxed{85}.

Subtraction borrows as "ones: 2-7 is below 0, borrow: 12-7=5", and multiplication adds its carry in a second
equation, "tens: 4*8=32, 32+1=33": a times-table fact, then an easy sum (a tiny model learns this far faster
than "4*8+1=33"). The last line is the final answer; everything above it is the reasoning (`gold_message`).
"""

import json
import random
from dataclasses import dataclass

GENERATOR_VERSION = 2  # bump when the text of problems or solutions changes
DIFFICULTIES = (1, 2, 3, 4, 5)
PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands")

NAMES = (
    "Ada", "Ben", "Cara", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ivy", "Jack", "Kim", "Leo",
    "Mia", "Noah", "Olga", "Pia", "Raj", "Sam", "Tara", "Umar", "Vera", "Wes", "Yuri", "Zoe",
)  # fmt: skip
ITEMS = (
    "apples", "pears", "books", "stamps", "marbles", "shells", "coins", "pencils",
    "cards", "stickers", "eggs", "cookies", "buttons", "beads", "plums", "rocks",
)  # fmt: skip
CONTAINERS = (("bag", "bags"), ("box", "boxes"), ("jar", "jars"), ("basket", "baskets"), ("pack", "packs"))

# One-step problems (difficulty 1-3): the story states `a op b` and asks for the result.
STORIES = {
    "+": (
        "{name} has {a} {items}. {name} buys {b} more {items}. How many {items} does {name} have now?",
        "There are {a} {items} in a box and {b} {items} in a bag. How many {items} are there in total?",
        "{name} picks {a} {items} in the morning and {b} {items} in the afternoon. "
        "How many {items} does {name} pick in all?",
    ),
    "-": (
        "{name} has {a} {items}. {name} gives {b} {items} to {friend}. How many {items} does {name} have left?",
        "A shop has {a} {items}. It sells {b} of them. How many {items} are left in the shop?",
        "{name} needs {a} {items} and already has {b}. How many more {items} does {name} need?",
    ),
    "*": (
        "{name} has {b} {boxes} with {a} {items} in each {box}. How many {items} does {name} have?",
        "Each {box} holds {a} {items}. How many {items} are in {b} {boxes}?",
        "{name} buys {b} {boxes} of {items}. Each {box} has {a} {items}. How many {items} does {name} buy?",
    ),
}
# Multi-step problems (difficulty 4-5): an opening sentence, one sentence per later step, the question.
OPENINGS = {
    "+": "{name} has {a} {items} and buys {b} more.",
    "-": "{name} has {a} {items} and gives {b} of them to {friend}.",
    "*": "{name} has {b} {boxes} with {a} {items} in each {box}.",
}
LATER_STEPS = {
    "+": ("Then {name} finds {b} more {items}.", "Then {friend} gives {name} {b} more {items}."),
    "-": ("Then {name} loses {b} {items}.", "Then {name} gives {b} {items} to {friend}."),
    "*": ("Then {name} ends up with {b} times as many {items} as before.",),
}
QUESTION = "How many {items} does {name} have now?"


@dataclass(frozen=True)
class Step:
    op: str  # "+", "-" or "*" (the right operand of "*" is always one digit)
    a: int
    b: int

    @property
    def result(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]


# ---------------------------------------------------------------- gold working, one column per line


def _digits(n: int, width: int) -> list[int]:
    """The digits of n, ones first, padded with zeros to `width`."""
    return [int(c) for c in reversed(str(n).zfill(width))]


def _add_columns(a: int, b: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    lines, carry = [], 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width), strict=True)):
        total = x + y + carry
        line = f"{PLACES[i]}: {x}+{y}" + (f"+{carry}" if carry else "") + f"={total}"
        carry = 0
        if i < width - 1 and total >= 10:  # the last column writes its whole sum
            line += f", write {total % 10} carry {total // 10}"
            carry = total // 10
        lines.append(line)
    return lines


def _sub_columns(a: int, b: int) -> list[str]:
    width = len(str(a))
    lines, borrow = [], 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width), strict=True)):
        terms = f"{x}" + ("-1" if borrow else "") + f"-{y}"
        value = x - borrow - y
        borrow = int(value < 0)
        if borrow:  # "1" + terms puts the borrowed ten in front of the top digit: 3-1-7 -> 13-1-7
            lines.append(f"{PLACES[i]}: {terms} is below 0, borrow: 1{terms}={value + 10}")
        else:
            lines.append(f"{PLACES[i]}: {terms}={value}")
    return lines


def _mul_columns(a: int, k: int) -> list[str]:
    width = len(str(a))
    lines, carry = [], 0
    for i, x in enumerate(_digits(a, width)):
        total = x * k + carry
        # The carry is added in a second equation: a times-table fact, then an easy addition.
        line = f"{PLACES[i]}: {x}*{k}={x * k}" + (f", {x * k}+{carry}={total}" if carry else "")
        carry = 0
        if i < width - 1 and total >= 10:
            line += f", write {total % 10} carry {total // 10}"
            carry = total // 10
        lines.append(line)
    return lines


def working(step: Step) -> list[str]:
    """The gold lines for one step: the sum to do, one line per column, the result."""
    columns = {"+": _add_columns, "-": _sub_columns, "*": _mul_columns}[step.op](step.a, step.b)
    head = f"{step.a}{step.op}{step.b}"
    return [head, *columns, f"{head}={step.result}"]


def solution_text(steps: list[Step]) -> str:
    lines = [line for step in steps for line in working(step)]
    return "\n".join([*lines, answer_line(steps[-1].result)])


def answer_line(answer: int) -> str:
    return f"The answer is \\boxed{{{answer}}}."


# ---------------------------------------------------------------- numbers and stories


def _one_or_two_digits(rng: random.Random) -> int:
    return rng.randint(2, 9) if rng.random() < 0.5 else rng.randint(10, 99)


def _first_step(rng: random.Random, op: str) -> Step:
    if op == "+":
        return Step("+", _one_or_two_digits(rng), _one_or_two_digits(rng))
    if op == "-":
        a = rng.randint(20, 99)
        return Step("-", a, rng.randint(10, a - 1))
    return Step("*", rng.randint(10, 99), rng.randint(2, 9))


def later_step(rng: random.Random, total: int) -> Step:
    """A step on the running total; totals stay >= 2 and only two-digit totals are multiplied."""
    ops = ["+"] + (["-"] if total >= 4 else []) + (["*"] if total <= 99 else [])
    op = rng.choice(ops)
    if op == "+":
        return Step("+", total, _one_or_two_digits(rng))
    if op == "-":
        return Step("-", total, rng.randint(2, min(99, total - 2)))
    return Step("*", total, rng.randint(2, 9))


def _steps(rng: random.Random, difficulty: int) -> list[Step]:
    if difficulty <= 3:
        return [_first_step(rng, "+-*"[difficulty - 1])]
    steps = [_first_step(rng, rng.choice("+-*"))]
    while len(steps) < difficulty - 2:  # difficulty 4 -> 2 steps, 5 -> 3 steps
        steps.append(later_step(rng, steps[-1].result))
    return steps


def _story(rng: random.Random, steps: list[Step]) -> str:
    name, friend = rng.sample(NAMES, 2)
    box, boxes = rng.choice(CONTAINERS)
    words = {"name": name, "friend": friend, "items": rng.choice(ITEMS), "box": box, "boxes": boxes}
    first = steps[0]
    if len(steps) == 1:
        return rng.choice(STORIES[first.op]).format(a=first.a, b=first.b, **words)
    sentences = [OPENINGS[first.op].format(a=first.a, b=first.b, **words)]
    sentences += [rng.choice(LATER_STEPS[s.op]).format(b=s.b, **words) for s in steps[1:]]
    return " ".join([*sentences, QUESTION.format(**words)])


def expression(steps: list[Step]) -> str:
    """The problem as one parenthesised Python expression, e.g. "(12*3)-15"."""
    text = f"{steps[0].a}{steps[0].op}{steps[0].b}"
    for step in steps[1:]:
        text = f"({text}){step.op}{step.b}"
    return text


# ---------------------------------------------------------------- records


def make_problem(rng: random.Random, difficulty: int, split: str, index: int) -> dict:
    steps = _steps(rng, difficulty)
    answer = steps[-1].result
    return {
        "id": f"toy-{split}-{index:06d}",
        "domain": "math",
        "prompt": _story(rng, steps),
        "answer": str(answer),
        "tests": None,
        "source": "toyworld",
        "meta": {
            "difficulty": difficulty,
            "split": split,
            "expression": expression(steps),
            "solution": solution_text(steps),
            "generator_version": GENERATOR_VERSION,
        },
    }


def generate_split(seed: int, split: str, n: int, exclude: frozenset[str] = frozenset(),
                   max_difficulty: int = DIFFICULTIES[-1]) -> list[dict]:
    """n problems with distinct prompts (none in `exclude`), difficulties 1..max_difficulty in turn."""
    levels = DIFFICULTIES[:max_difficulty]
    rng = random.Random(f"toyworld-{seed}-{split}")  # str seeds are hashed with sha512: stable across runs
    problems, seen = [], set(exclude)
    for _ in range(100 * n + 100):  # bounded: a too-large n for the story space fails instead of spinning
        if len(problems) == n:
            return problems
        problem = make_problem(rng, levels[len(problems) % len(levels)], split, len(problems))
        if problem["prompt"] not in seen:
            seen.add(problem["prompt"])
            problems.append(problem)
    if len(problems) < n:
        raise ValueError(f"found only {len(problems)} distinct {split} problems for n={n}; ask for fewer")
    return problems


def generate_problems(seed: int = 0, n_train: int = 10000, n_test: int = 500,
                      max_difficulty: int = DIFFICULTIES[-1]) -> dict[str, list[dict]]:
    """The train and held-out test splits; the test split is drawn first and train avoids its prompts. A lower
    max_difficulty keeps only the easiest levels (one-step sums and differences at 2: what a small teacher learns
    in a few hundred steps, for the CI-size quickstart)."""
    test = generate_split(seed, "test", n_test, max_difficulty=max_difficulty)
    train = generate_split(seed, "train", n_train, exclude=frozenset(p["prompt"] for p in test),
                           max_difficulty=max_difficulty)
    overlap = {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert not overlap, f"train and test share {len(overlap)} prompts"
    return {"train": train, "test": test}


def to_jsonl(problems: list[dict]) -> bytes:
    """One record per line with sorted keys, so the same problems always give the same bytes."""
    return "".join(json.dumps(p, sort_keys=True) + "\n" for p in problems).encode()


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def gold_message(problem: dict) -> dict:
    """The gold assistant turn in the curated chat format: the working as reasoning, the answer as content."""
    reasoning, _, content = problem["meta"]["solution"].rpartition("\n")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning}


def gold_conversation(problem: dict, prompt_messages: list[dict] | None = None) -> list[dict]:
    """The prompt turns, then `gold_message`. By default the prompt is one user turn with the problem text
    exactly as written, which is what tracegen sends without a prompt_template; pass the messages a
    stage really sends (e.g. tracegen's renderer output) so that training and sampling see the same turns."""
    if prompt_messages is None:
        prompt_messages = [{"role": "user", "content": problem["prompt"]}]
    return [*prompt_messages, gold_message(problem)]
