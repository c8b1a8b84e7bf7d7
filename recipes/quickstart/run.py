"""The whole R1-style distillation loop in the toy world, every stage for real, on a CPU.

    .venv/bin/python recipes/quickstart/run.py                 # make quickstart: full size (~25 min on 2 cores)
    .venv/bin/python recipes/quickstart/run.py --size ci       # the same path, smaller (the CI test)

1. build the toy world (problems with gold solutions, the pretraining corpus, tokenizer, random teacher/student)
2. sft: pretrain the student base on the corpus (R1's students start from pretrained bases), cached by content
   hash in cache/bases/ so that reruns and tests reuse it
3. sft: train the teacher from random init on the gold solutions (full fine-tuning)
4. tracegen: serve the teacher with vLLM (managed server) and sample n traces per train problem, with logprobs
5. filter: verify, label, apply the rules, export the curated set (and, for comparison, everything unfiltered)
6. sft: students from the same base, the same steps: unfiltered, filtered (full and LoRA), filtered + sparse KD,
   filtered + on-policy KD (the teacher served by vLLM scores the student's own samples); the best student
   quantized to int8 weights (sft.quantize)
7. evals: teacher, student base and students on the held-out split, R1 protocol (n samples, pass@1, maj@k)
8. report: runs/quickstart/report.md with the tables and plots (recipes/quickstart/report.py)

Each stage is the stage's own command with the recipe's YAML (recipes/quickstart/*.yaml) plus a few size flags;
the commands are printed, so any step can be rerun by hand. Every stage resumes, so a rerun continues.
"""

import argparse
import hashlib
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent
ROOT = RECIPE.parents[1]
PY = sys.executable
# What changes between the full run and the CI run: only sizes, never the code path.
SIZES = {
    "full": {"n_train": 10000, "n_test": 500, "max_difficulty": 5, "base_steps": 1000, "teacher_steps": 1000,
             "problems": 800, "n": 4, "student_steps": 500, "eval_problems": 200, "eval_n": 4},
    # a world of one-step sums and differences only (difficulty 1-2: short examples, which the teacher learns in
    # a fraction of the full world's 1,000 steps), a short base, fewer traces, students, evals. 100 problems x 4
    # traces: 50 and 59 curated from the first and second 100 of a 200-problem run (tests/test_quickstart.py
    # needs >= 30)
    "ci": {"n_train": 10000, "n_test": 500, "max_difficulty": 2, "base_steps": 40, "teacher_steps": 600,
           "problems": 100, "n": 4, "student_steps": 40, "eval_problems": 40, "eval_n": 2},
}
# Each student is `sft-<name>.yaml` from the student base on <run>/unfiltered or <run>/curated; add a row by adding
# a name here and its YAML (report.py's WHAT says what it is).
STUDENTS = ("unfiltered", "filtered-full", "filtered-lora", "filtered-kd", "filtered-on-policy")
QUANTIZED = {"filtered-full-int8": "filtered-full"}  # a deployed student: weight-only int8 (sft.quantize, torchao)
EVALUATED = ("teacher", "student-base", *STUDENTS, *QUANTIZED)


def main(argv: list[str] | None = None, call=subprocess.call) -> int:
    """call: runs one stage's command and returns its exit code (tests/test_quickstart.py runs them in process)."""
    args = parse_args(argv)
    size, run, world = SIZES[args.size], args.run_dir, args.world
    timings = {}
    run.mkdir(parents=True, exist_ok=True)

    def stage(name: str, *cmd) -> None:
        timings[name] = run_stage(name, [str(c) for c in cmd], run, call)

    # --- 1. the toy world -----------------------------------------------------------------------------------
    stage("world", PY, "-m", "data.toyworld", "build", "--out", world, "--n-train", size["n_train"],
          "--n-test", size["n_test"], "--max-difficulty", size["max_difficulty"])
    # --- 2. the student base: pretrained on the corpus, or reused from the cache ---------------------------
    base, cached = student_base(world, size, args.bases, stage)
    (run / "student-base.json").write_text(json.dumps({"path": str(base), "cached": cached}, indent=2) + "\n")
    # --- 3. the teacher learns the gold solutions -----------------------------------------------------------
    teacher = args.teacher or run / "checkpoints" / "teacher"
    if not args.teacher:
        stage("sft teacher", PY, "-m", "sft", "--config", RECIPE / "sft-teacher.yaml", "--dataset", world / "gold",
              "--model_name_or_path", world / "teacher-init", "--output_dir", teacher, "--max_steps",
              size["teacher_steps"])
    # --- 4. teacher traces through a managed vLLM server ----------------------------------------------------
    stage("tracegen", PY, "-m", "tracegen", "--config", RECIPE / "tracegen.yaml", "--problems",
          world / "problems" / "train.jsonl", "--serve_model", teacher, "--output_dir", run, "--limit",
          size["problems"], "--n", size["n"])
    # --- 5. curation --------------------------------------------------------------------------------------------
    stage("filter", PY, "-m", "filter", "--config", RECIPE / "filter.yaml", "--run_dir", run,
          "--contamination_benchmarks", f"toy={world / 'problems' / 'test.jsonl'}")
    stage("filter (unfiltered export)", PY, "-m", "filter", "--config", RECIPE / "filter-none.yaml",
          "--run_dir", run, "--db", run / "unfiltered.duckdb", "--output_dir", run / "unfiltered")
    # --- 6. students ------------------------------------------------------------------------------------------
    for name in STUDENTS:
        data = run / ("unfiltered" if name == "unfiltered" else "curated")
        kd = {"filtered-kd": ["--teacher_model", teacher],  # the teacher's tokenizer must be the student's
              "filtered-on-policy": ["--teacher_serve_model", teacher]}.get(name, [])
        stage(f"sft {name}", PY, "-m", "sft", "--config", RECIPE / f"sft-{name}.yaml", "--dataset", data,
              "--model_name_or_path", base, "--output_dir", run / "checkpoints" / name,
              "--max_steps", size["student_steps"], *kd)
    for name, source in QUANTIZED.items():
        stage(f"quantize {name}", PY, "-m", "sft.quantize", "--model", run / "checkpoints" / source, "--scheme",
              "int8", "--output_dir", run / "checkpoints" / name, "--dataset", run / "curated")
    # --- 7. evals ------------------------------------------------------------------------------------------------
    models = {"teacher": teacher, "student-base": base,
              **{name: run / "checkpoints" / name for name in (*STUDENTS, *QUANTIZED)}}
    for name in EVALUATED:
        stage(f"evals {name}", PY, "-m", "evals", "--config", RECIPE / "evals.yaml", *model_flags(models[name], base),
              "--model_name", name, "--output_dir", run / "evals", "--custom_benchmarks",
              json.dumps({"toy": str(world / "problems" / "test.jsonl")}), "--limit", size["eval_problems"],
              "--n", size["eval_n"])
    # --- 8. report -----------------------------------------------------------------------------------------------
    (run / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    stage("report", PY, RECIPE / "report.py", run, "--size", args.size)
    print((run / "report.md").read_text())
    return 0


def student_base(world: Path, size: dict, bases: Path, stage) -> tuple[Path, bool]:
    """(the base's folder, whether it was reused): trained with `stage` unless this content hash is cached."""
    base = bases / f"student-base-{base_key(world, size)}"
    if base.exists():
        print(f"\n=== student base: reusing {base} (same corpus, init, recipe, steps and sft code)", flush=True)
        return base, True
    partial = base.with_name(f".{base.name}.partial")  # sft resumes in here; renamed only when complete
    stage("sft student-base", PY, "-m", "sft", "--config", RECIPE / "sft-student-base.yaml", "--dataset",
          world / "corpus", "--model_name_or_path", world / "student-init", "--output_dir", partial,
          "--max_steps", size["base_steps"])
    os.replace(partial, base)
    return base, False


def base_key(world: Path, size: dict) -> str:
    """What decides the student base: the corpus, the init weights, the tokenizer, the recipe, its steps and the
    sft code. The same key means the same base, so it is trained once and reused."""
    built = json.loads((world / "manifest.json").read_text())["sha256"]
    digest = hashlib.sha256(json.dumps({k: built[k] for k in ("corpus/train.parquet", "student-init/model.safetensors",
                                                                 "tokenizer/tokenizer.json")}, sort_keys=True).encode())
    digest.update(f"steps={size['base_steps']}".encode())
    for path in [RECIPE / "sft-student-base.yaml", *sorted((ROOT / "sft").glob("*.py"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def model_flags(checkpoint: Path, base: Path) -> list:
    """evals' in-process HF engine: a full checkpoint as model, a LoRA adapter on the student base."""
    if (checkpoint / "adapter_config.json").exists():
        return ["--model", base, "--adapter", checkpoint]
    return ["--model", checkpoint]


def run_stage(name: str, cmd: list[str], run: Path, call) -> dict:
    """Runs one stage; its wall time and CPU time (on a shared machine the CPU time is the steadier measure)."""
    print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
    start, cpu = time.monotonic(), _cpu()
    code = call(cmd)
    if code != 0:
        raise SystemExit(f"quickstart: stage '{name}' failed with exit code {code} (its log is above); "
                         f"fix it and rerun: finished stages are skipped or resumed")
    return {"wall_s": round(time.monotonic() - start, 1), "cpu_s": round(_cpu() - cpu, 1)}


def _cpu() -> float:
    """CPU seconds of this process and its finished children: a stage's, whether launched or called in process."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usages)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="recipes/quickstart/run.py", allow_abbrev=False)
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full (the README's run) or ci")
    parser.add_argument("--run_dir", type=Path, default=Path("runs/quickstart"), help="where everything goes")
    parser.add_argument("--world", type=Path, default=Path("cache/toyworld"), help="where the toy world is built")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="a trained teacher (same tokenizer) to use instead of training one on the gold solutions")
    parser.add_argument("--bases", type=Path, default=Path("cache/bases"),
                        help="where pretrained bases are cached, one folder per content hash")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
