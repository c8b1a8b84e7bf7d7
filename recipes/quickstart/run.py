"""The whole R1-style distillation loop in the toy world, every stage for real, on a CPU.

    .venv/bin/python recipes/quickstart/run.py                 # make quickstart: full size (~20 min on 2 cores)
    .venv/bin/python recipes/quickstart/run.py --size ci       # the same path, smaller (the CI test)

1. build the toy world (problems with gold solutions, tokenizer, random teacher/student)
2. sft: train the teacher from random init on the gold solutions (full fine-tuning)
3. tracegen: serve the teacher with vLLM (managed server) and sample n traces per train problem, with logprobs
4. filter: verify, label, apply the rules, export the curated set (and, for comparison, everything unfiltered)
5. sft: students from the same init: unfiltered, filtered (full and LoRA), filtered + sparse KD
6. evals: teacher and students on the held-out split, R1 protocol (n samples, pass@1, maj@k)
7. report: runs/quickstart/report.md with the tables and plots (recipes/quickstart/report.py)

Each stage is the stage's own command with the recipe's YAML (recipes/quickstart/*.yaml) plus a few size flags;
the commands are printed, so any step can be rerun by hand. Every stage resumes, so a rerun continues.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent
PY = sys.executable
# What changes between the full run and the CI run: only sizes, never the code path.
SIZES = {
    "full": {"n_train": 10000, "n_test": 500, "teacher_steps": 1000, "problems": 800, "n": 4,
             "student_steps": 500, "eval_problems": 200, "eval_n": 4},
    # the full world (a teacher trained on 600 problems memorizes them and fails held-out ones: its traces were
    # almost all wrong and the curated set came out empty) and the full teacher; fewer traces, students, evals
    "ci": {"n_train": 10000, "n_test": 100, "teacher_steps": 1000, "problems": 200, "n": 4,
           "student_steps": 40, "eval_problems": 40, "eval_n": 2},
}
STUDENTS = ("unfiltered", "filtered-full", "filtered-lora", "filtered-kd")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size, run, world = SIZES[args.size], args.run_dir, args.world
    timings = {}

    def stage(name: str, *cmd) -> None:
        timings[name] = run_stage(name, [str(c) for c in cmd], run)

    # --- 1. the toy world -----------------------------------------------------------------------------------
    stage("world", PY, "-m", "data.toyworld", "build", "--out", world, "--n-train", size["n_train"],
          "--n-test", size["n_test"])
    # --- 2. the teacher learns the gold solutions -----------------------------------------------------------
    teacher = run / "checkpoints" / "teacher"
    stage("sft teacher", PY, "-m", "sft", "--config", RECIPE / "sft-teacher.yaml", "--dataset", world / "gold",
          "--model_name_or_path", world / "teacher-init", "--output_dir", teacher, "--max_steps",
          size["teacher_steps"])
    # --- 3. teacher traces through a managed vLLM server ----------------------------------------------------
    stage("tracegen", PY, "-m", "tracegen", "--config", RECIPE / "tracegen.yaml", "--problems",
          world / "problems" / "train.jsonl", "--serve_model", teacher, "--output_dir", run, "--limit",
          size["problems"], "--n", size["n"])
    # --- 4. curation --------------------------------------------------------------------------------------------
    stage("filter", PY, "-m", "filter", "--config", RECIPE / "filter.yaml", "--run_dir", run,
          "--contamination_benchmarks", f"toy={world / 'problems' / 'test.jsonl'}")
    stage("filter (unfiltered export)", PY, "-m", "filter", "--config", RECIPE / "filter-none.yaml",
          "--run_dir", run, "--db", run / "unfiltered.duckdb", "--output_dir", run / "unfiltered")
    # --- 5. students ------------------------------------------------------------------------------------------
    for name in STUDENTS:
        data = run / ("unfiltered" if name == "unfiltered" else "curated")
        kd = ["--teacher_model", teacher] if name.endswith("-kd") else []  # its tokenizer must be the student's
        stage(f"sft {name}", PY, "-m", "sft", "--config", RECIPE / f"sft-{name}.yaml", "--dataset", data,
              "--model_name_or_path", world / "student-init", "--output_dir", run / "checkpoints" / name,
              "--max_steps", size["student_steps"], *kd)
    # --- 6. evals ------------------------------------------------------------------------------------------------
    for name in ("teacher", *STUDENTS):
        stage(f"evals {name}", PY, "-m", "evals", "--config", RECIPE / "evals.yaml", *model_flags(run, world, name),
              "--model_name", name, "--output_dir", run / "evals", "--custom_benchmarks",
              json.dumps({"toy": str(world / "problems" / "test.jsonl")}), "--limit", size["eval_problems"],
              "--n", size["eval_n"])
    # --- 7. report -----------------------------------------------------------------------------------------------
    (run / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    stage("report", PY, RECIPE / "report.py", run, "--size", args.size)
    print((run / "report.md").read_text())
    return 0


def model_flags(run: Path, world: Path, name: str) -> list:
    """evals' in-process HF engine: a full checkpoint as model, a LoRA adapter on the student's init."""
    checkpoint = run / "checkpoints" / name
    if (checkpoint / "adapter_config.json").exists():
        return ["--model", world / "student-init", "--adapter", checkpoint]
    return ["--model", checkpoint]


def run_stage(name: str, cmd: list[str], run: Path) -> float:
    print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
    start = time.monotonic()
    code = subprocess.call(cmd)
    if code != 0:
        raise SystemExit(f"quickstart: stage '{name}' failed with exit code {code} (its log is above); "
                         f"fix it and rerun: finished stages are skipped or resumed")
    return round(time.monotonic() - start, 1)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="recipes/quickstart/run.py", allow_abbrev=False)
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full (the README's run) or ci")
    parser.add_argument("--run_dir", type=Path, default=Path("runs/quickstart"), help="where everything goes")
    parser.add_argument("--world", type=Path, default=Path("cache/toyworld"), help="where the toy world is built")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
