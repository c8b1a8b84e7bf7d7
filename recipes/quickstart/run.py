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
import contextlib
import hashlib
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
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
# The second lane (--jobs 2): the on-policy student (sampling makes it the longest stage), then these evals, beside
# the other students, the quantization and the other evals (about as long on one thread each)
SECOND_LANE = ("filtered-on-policy", "teacher", "student-base")


def main(argv: list[str] | None = None, call=None) -> int:
    """call: runs one stage's command and returns its exit code, one stage at a time (tests/test_quickstart.py runs
    them in process); by default each stage is a subprocess and --jobs 2 runs two lanes where the recipe allows."""
    args = parse_args(argv)
    size, run, world = SIZES[args.size], args.run_dir, args.world
    run.mkdir(parents=True, exist_ok=True)
    stages = Stages(run, call, lanes=1 if call else args.jobs)
    stage = stages.run

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
    # --- 6. students and 7. evals: the on-policy student (the longest) and a few evals on a second lane -------
    models = {"teacher": teacher, "student-base": base,
              **{name: run / "checkpoints" / name for name in (*STUDENTS, *QUANTIZED)}}

    def evals(name: str, lane) -> None:
        lane(f"evals {name}", PY, "-m", "evals", "--config", RECIPE / "evals.yaml", *model_flags(models[name], base),
             "--model_name", name, "--output_dir", run / "evals", "--custom_benchmarks",
             json.dumps({"toy": str(world / "problems" / "test.jsonl")}), "--limit", size["eval_problems"],
             "--n", size["eval_n"])

    def student(name: str, lane) -> None:
        data = run / ("unfiltered" if name == "unfiltered" else "curated")
        kd = {"filtered-kd": ["--teacher_model", teacher],  # the teacher's tokenizer must be the student's
              "filtered-on-policy": ["--teacher_serve_model", teacher]}.get(name, [])
        lane(f"sft {name}", PY, "-m", "sft", "--config", RECIPE / f"sft-{name}.yaml", "--dataset", data,
             "--model_name_or_path", base, "--output_dir", run / "checkpoints" / name,
             "--max_steps", size["student_steps"], *kd)

    with stages.two_lanes():  # the second lane's stages are queued first: they start at once, in this order
        for name in SECOND_LANE:
            if name in STUDENTS:
                student(name, stages.beside)
            evals(name, stages.beside)
        for name in STUDENTS:
            if name not in SECOND_LANE:
                student(name, stage)
        for name, source in QUANTIZED.items():
            stage(f"quantize {name}", PY, "-m", "sft.quantize", "--model", run / "checkpoints" / source, "--scheme",
                  "int8", "--output_dir", run / "checkpoints" / name, "--dataset", run / "curated")
        for name in EVALUATED:
            if name not in SECOND_LANE:
                evals(name, stage)
    # --- 8. report -----------------------------------------------------------------------------------------------
    (run / "timings.json").write_text(json.dumps(stages.timings, indent=2) + "\n")
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


class Stages:
    """Runs the recipe's stages and times them: one at a time, or, inside two_lanes(), a second lane beside the
    first, each with one torch thread. Measured here (the teacher's recipe, 100 steps): one thread 52.6 s, two 33.0 s,
    two one-thread runs side by side 52 s each, so two lanes do 1.27x the work of one two-thread lane; and sampling
    with `generate` (the on-policy student) is faster on one thread than on two that wait on each other."""

    def __init__(self, run: Path, call=None, lanes: int = 2):
        self.run_dir, self.call, self.lanes = run, call, lanes
        self.timings: dict[str, dict] = {}
        self._env: dict | None = None  # the stages' environment inside two_lanes()
        self._second: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def run(self, name: str, *cmd) -> None:
        """Runs one stage here, its output to this terminal."""
        self._record(name, [str(c) for c in cmd], log=None)

    def beside(self, name: str, *cmd) -> None:
        """Inside two_lanes(): queues the stage on the second lane (its stages run in order, each one's output to
        <run>/logs/<name>.log); otherwise runs it here."""
        if self._second is None:
            return self.run(name, *cmd)
        log = self.run_dir / "logs" / f"{name.replace(' ', '-')}.log"
        self._pending.append(self._second.submit(self._record, name, [str(c) for c in cmd], log))

    @contextlib.contextmanager
    def two_lanes(self):
        """Stages queued with beside() run beside the others; leaving waits for them (a failure on either lane
        stops the run once both lanes have stopped, naming the stage and its log)."""
        if self.lanes < 2:
            yield
            return
        self._env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self._second = ThreadPoolExecutor(1, thread_name_prefix="second-lane")
        stopped = True
        try:
            yield
            stopped = False
        finally:
            if stopped:  # this lane failed: the second finishes the stage it is running and starts no other
                print("\n=== waiting for the second lane's running stage to stop", flush=True)
            self._second.shutdown(wait=True, cancel_futures=stopped)
            failed = [f.exception() for f in self._pending if not f.cancelled() and f.exception()]
            self._second, self._env, self._pending = None, None, []
        if failed:
            raise failed[0]

    def _record(self, name: str, cmd: list[str], log: Path | None) -> None:
        if log is not None and any(f.done() and f.exception() for f in self._pending):
            return  # an earlier stage of this lane failed: the ones after it depend on it
        where = "" if log is None else f" [second lane; log: {log}]"
        print(f"\n=== {name}{where}: {shlex.join(cmd)}", flush=True)
        start = time.monotonic()
        if self.call is not None:
            cpu = _cpu()
            code = self.call(cmd)
            cpu = _cpu() - cpu
        else:
            code, cpu = launch(cmd, self._env, log)
        if code != 0:
            raise SystemExit(f"quickstart: stage '{name}' failed with exit code {code} (its log is "
                             f"{'above' if log is None else log}); fix it and rerun: finished stages are skipped or "
                             f"resumed")
        self.timings[name] = {"wall_s": round(time.monotonic() - start, 1), "cpu_s": round(cpu, 1)}
        if log is not None:
            print(f"\n=== {name} [second lane]: done in {self.timings[name]['wall_s']:.0f} s", flush=True)


def launch(cmd: list[str], env: dict | None = None, log: Path | None = None) -> tuple[int, float]:
    """Runs a command as a subprocess: (its exit code, its CPU seconds and its children's)."""
    if log is None:
        proc = subprocess.Popen(cmd, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


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
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                        help="2: the on-policy student and a few evals run on a second lane beside the other students "
                             "and evals, one torch thread each; 1: every stage after the other")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
