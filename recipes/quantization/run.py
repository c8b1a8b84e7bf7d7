"""Quantization-aware training vs post-training quantization of one student, in the toy world (issue 21).

    .venv/bin/python recipes/quantization/run.py                # full size: 4 trainings, 8 evals
    .venv/bin/python recipes/quantization/run.py --size tiny    # the plumbing, in minutes

The student is the toy world's 2 x 128 student (cache/toyworld/student-init) trained on the 10,000 gold solutions
the way recipes/quickstart/sft-teacher.yaml trains the teacher: it reaches a clear nonzero held-out accuracy, so
what rounding its weights costs can show (the student base scores ~0; the quickstart's students ~0.2).
1. the toy world (`python -m data.toyworld build`)
2. sft with equal steps, data and seed: the float student, and the same training with `--qat int8` and
   `--qat int4` (torchao fake quantization, converted into <checkpoint>/quantized/; sft/qat.py); and the float
   student with seed 1 (another data order), the spread any two trainings show
3. post-training quantization of the float student: `python -m sft.quantize --scheme int8|int4` (torchao, the
   config QAT converts with: QAT and PTQ differ only in the training)
4. evals of the eight models (float, ptq-int8, ptq-int4, qat-int8, qat-int4, the QAT runs' float weights, float-s1) on
   the held-out split with the quickstart's protocol (recipes/quickstart/evals.yaml)
5. <run>/results.md: pass@1 ± stderr, maj@k, weight bytes, the differences that answer the question, and every
   command

Resumable: a finished training or quantization is skipped, a scored model is not evaluated again.
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart"
PY = sys.executable
SIZES = {
    "full": {"n_train": 10000, "n_test": 500, "steps": 1000, "eval_problems": 200, "eval_n": 4, "efficiency": True},
    # the plumbing only: no efficiency measurement (a fresh process per model; tests/evals/test_efficiency.py and
    # the CI quickstart check it), so the table's weights column reads "-"
    "tiny": {"n_train": 200, "n_test": 20, "steps": 4, "eval_problems": 4, "eval_n": 1, "efficiency": False},
}
# checkpoint: (its sft `qat`, seed). float-s1 is the float student with another data order: how far two trainings
# that differ in nothing that matters land apart, the yardstick for a QAT run's difference
TRAINED = {"float": ("none", 0), "qat-int8": ("int8", 0), "qat-int4": ("int4", 0), "float-s1": ("none", 1)}
PTQ = {"ptq-int8": "int8", "ptq-int4": "int4"}  # checkpoint: sft.quantize scheme, of the float student
# model: (checkpoint under <run>/checkpoints, what it is)
MODELS = {
    "float": ("float", "float student"),
    "ptq-int8": ("ptq-int8", "float student, then int8 weights (sft.quantize)"),
    "ptq-int4": ("ptq-int4", "float student, then int4 weights, groups of 32 (sft.quantize)"),
    "qat-int8": ("qat-int8/quantized", "trained with qat: int8, converted"),
    "qat-int4": ("qat-int4/quantized", "trained with qat: int4, converted"),
    "qat-int8-float": ("qat-int8", "the qat: int8 run's float weights"),
    "qat-int4-float": ("qat-int4", "the qat: int4 run's float weights"),
    "float-s1": ("float-s1", "float student, seed 1 (another data order)"),
}
# (label, a, b): the differences a - b that answer the question
DIFFERENCES = [
    ("what PTQ int8 costs", "ptq-int8", "float"), ("what PTQ int4 costs", "ptq-int4", "float"),
    ("QAT vs PTQ, int8", "qat-int8", "ptq-int8"), ("QAT vs PTQ, int4", "qat-int4", "ptq-int4"),
    ("QAT int4 vs the float student", "qat-int4", "float"),
    ("what converting costs after QAT, int8", "qat-int8", "qat-int8-float"),
    ("what converting costs after QAT, int4", "qat-int4", "qat-int4-float"),
    ("QAT's float weights vs the float student, int8", "qat-int8-float", "float"),
    ("QAT's float weights vs the float student, int4", "qat-int4-float", "float"),
    ("seed to seed (data order), float", "float-s1", "float"),
]


def main(argv: list[str] | None = None, call=subprocess.call) -> int:
    """call: runs one stage's command and returns its exit code (a test runs the stages' main() in process)."""
    args = parse_args(argv)
    size, run, world = SIZES[args.size], args.run_dir, args.world
    checkpoints = run / "checkpoints"
    commands = {}
    # --- 1. the toy world ------------------------------------------------------------------------------------
    run_stage("world", [PY, "-m", "data.toyworld", "build", "--out", world, "--n-train", size["n_train"],
                        "--n-test", size["n_test"]], call)
    # --- 2. the float student and the QAT students: same recipe, data, steps and seed -------------------------
    for name, (qat, seed) in TRAINED.items():
        commands[name] = sft_command(world, checkpoints / name, size["steps"], qat, seed)
        if not (checkpoints / name / "sft_metrics.json").exists():
            run_stage(f"sft {name}", commands[name], call)
    # --- 3. post-training quantization of the float student ----------------------------------------------------
    for name, scheme in PTQ.items():
        commands[name] = [PY, "-m", "sft.quantize", "--model", checkpoints / "float", "--scheme", scheme,
                          "--output_dir", checkpoints / name, "--dataset", world / "gold"]
        run_stage(f"quantize {name}", commands[name], call)
    # --- 4. evals on the held-out split ---------------------------------------------------------------------
    done = scores(run)
    for name, (checkpoint, _) in MODELS.items():
        evals = evals_command(world, checkpoints / checkpoint, name, run / "evals", size)
        commands[f"evals {name}"] = evals
        if name not in done:
            run_stage(f"evals {name}", evals, call)
    # --- 5. the table ------------------------------------------------------------------------------------------
    (run / "results.md").write_text(results(scores(run), checkpoints, run / "evals" / "samples", commands, size))
    print((run / "results.md").read_text())
    return 0


def sft_command(world: Path, out: Path, steps: int, qat: str, seed: int) -> list:
    return [PY, "-m", "sft", "--config", QUICKSTART / "sft-teacher.yaml", "--dataset", world / "gold",
            "--model_name_or_path", world / "student-init", "--output_dir", out, "--max_steps", steps, "--qat", qat,
            "--seed", seed]


def evals_command(world: Path, model: Path, name: str, out: Path, size: dict) -> list:
    return [PY, "-m", "evals", "--config", QUICKSTART / "evals.yaml", "--model", model, "--model_name", name,
            "--output_dir", out, "--custom_benchmarks", json.dumps({"toy": str(world / "problems" / "test.jsonl")}),
            "--limit", size["eval_problems"], "--n", size["eval_n"], "--efficiency", str(size["efficiency"]).lower()]


def scores(run: Path) -> dict:
    path = run / "evals" / "scores.json"
    return json.loads(path.read_text()) if path.exists() else {}


def results(done: dict, checkpoints: Path, samples: Path, commands: dict, size: dict) -> str:
    """results.md: every model, the differences, the training losses and the commands."""
    rows = ["# Quantization: QAT vs PTQ\n",
            f"The toy world's 2 x 128 student, {size['steps']} steps on the gold solutions "
            f"(recipes/quickstart/sft-teacher.yaml); pass@1 on {size['eval_problems']} held-out problems x "
            f"{size['eval_n']} samples (recipes/quickstart/evals.yaml).\n",
            "| model | what | pass@1 | ± stderr | maj@k | weights (KiB) |", "|---|---|---|---|---|---|"]
    for name, (_, what) in MODELS.items():
        toy = done[name]["toy"]
        weights = toy.get("efficiency", {}).get("weights_bytes")
        rows.append(f"| {name} | {what} | {toy['pass@1']:.3f} | {toy['stderr']:.3f} | {toy['maj@k']:.3f} | "
                    f"{_num(weights and weights / 1024, '.0f')} |")
    rows += ["\n| difference | a - b | pass@1 | ± stderr (independent) | ± stderr (paired by problem) |",
             "|---|---|---|---|---|"]
    for label, a, b in DIFFERENCES:
        (pa, sa), (pb, sb) = ((done[m]["toy"]["pass@1"], done[m]["toy"]["stderr"]) for m in (a, b))
        rows.append(f"| {label} | {a} - {b} | {pa - pb:+.3f} | {(sa ** 2 + sb ** 2) ** 0.5:.3f} | "
                    f"{paired_stderr(samples / a / 'toy.parquet', samples / b / 'toy.parquet'):.3f} |")
    rows += ["\n| training | first logged loss | last logged loss | mean loss |", "|---|---|---|---|"]
    for name in TRAINED:
        metrics = json.loads((checkpoints / name / "sft_metrics.json").read_text())
        rows.append(f"| {name} | {_num(metrics['first_logged_loss'])} | {_num(metrics['last_logged_loss'])} | "
                    f"{_num(metrics['train_loss'])} |")
    rows += ["\n## Commands\n", *(f"- {name}: `{shlex.join(str(c) for c in cmd)}`" for name, cmd in commands.items())]
    return "\n".join(rows) + "\n"


def paired_stderr(a: Path, b: Path) -> float:
    """The stderr of pass@1(a) - pass@1(b) from the per-problem differences: both models answered the same
    problems, so the problems' difficulty cancels (the independent-means figure ignores that and is wider)."""
    rates = [pq.read_table(path).group_by("problem_id").aggregate([("correct", "mean")]).to_pydict()
             for path in (a, b)]
    by_problem = [dict(zip(r["problem_id"], r["correct_mean"], strict=True)) for r in rates]
    diffs = [by_problem[0][p] - by_problem[1][p] for p in by_problem[0]]
    return statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0


def _num(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)  # a tiny run logs no loss before logging_steps


def run_stage(name: str, cmd: list, call) -> None:
    cmd = [str(c) for c in cmd]
    print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
    start = time.monotonic()
    if call(cmd) != 0:
        raise SystemExit(f"recipes/quantization/run.py: stage '{name}' failed (its log is above); rerun to resume")
    print(f"=== {name}: {time.monotonic() - start:.0f} s", flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="recipes/quantization/run.py", allow_abbrev=False)
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full, or tiny for the plumbing")
    parser.add_argument("--run_dir", type=Path, default=Path("runs/qat"), help="where everything goes")
    parser.add_argument("--world", type=Path, default=Path("cache/toyworld"), help="where the toy world is built")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
