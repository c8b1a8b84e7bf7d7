"""The whole R1-style distillation loop in the toy world, every stage for real, on a CPU.

    .venv/bin/python recipes/quickstart/run.py                 # make quickstart: full size (~18 min on 2 cores)
    .venv/bin/python recipes/quickstart/run.py --size ci       # the same path, smaller (the CI test)

1. build the toy world (problems with gold solutions, the pretraining corpus, tokenizer, random teacher/student)
2. sft: pretrain the student base on the corpus (R1's students start from pretrained bases), cached by content
   hash in cache/bases/ so that reruns and tests reuse it
3. sft: train the teacher from random init on the gold solutions (full fine-tuning)
4. tracegen: sample n traces per train problem from the teacher, with logprobs (transformers in process)
5. filter: verify, label, apply the rules, export the curated set (and, for comparison, everything unfiltered)
6. sft: students from the same base, the same steps: unfiltered, filtered (full and LoRA), filtered + sparse KD,
   filtered + on-policy KD (the teacher scores the student's own samples); filtered-full quantized to int8 weights
7. evals: teacher, student base and students on the held-out split, R1 protocol (n samples, pass@1, maj@k)
   (with --jobs 2, the default, 2-7 run two stages at a time, one torch thread each, each after its inputs)
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
import threading
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent
ROOT = RECIPE.parents[1]
PY = sys.executable
# What changes between the full run and the CI run: only sizes, never the code path.
SIZES = {
    "full": {"n_train": 10000, "n_test": 500, "max_difficulty": 5, "base_steps": 2000, "teacher_steps": 1000,
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



def main(argv: list[str] | None = None, call=None) -> int:
    """call: runs one stage's command and returns its exit code, one stage at a time (tests/test_quickstart.py runs
    them in process); by default each stage is a subprocess, and after the world --jobs 2 runs two at a time."""
    args = parse_args(argv)
    size, run, world = SIZES[args.size], args.run_dir, args.world
    run.mkdir(parents=True, exist_ok=True)
    stages = Stages(run, call, jobs=1 if call else args.jobs)
    stage = stages.run

    def evals(name: str, model: Path, after=()) -> None:
        stage(f"evals {name}", PY, "-m", "evals", "--config", RECIPE / "evals.yaml", *model_flags(model, base),
              "--model_name", name, "--output_dir", run / "evals", "--custom_benchmarks",
              json.dumps({"toy": str(world / "problems" / "test.jsonl")}), "--limit", size["eval_problems"],
              "--n", size["eval_n"], after=after)

    # --- 1. the toy world -----------------------------------------------------------------------------------
    stage("world", PY, "-m", "data.toyworld", "build", "--out", world, "--n-train", size["n_train"],
          "--n-test", size["n_test"], "--max-difficulty", size["max_difficulty"])
    teacher = args.teacher or run / "checkpoints" / "teacher"
    with stages.parallel():  # queued in priority order; each worker takes the first stage whose inputs are done
        # --- 3. the teacher learns the gold solutions (first: the longest chain starts with it) ---------------
        taught = []
        if not args.teacher:
            stage("sft teacher", PY, "-m", "sft", "--config", RECIPE / "sft-teacher.yaml", "--dataset", world / "gold",
                  "--model_name_or_path", world / "teacher-init", "--output_dir", teacher, "--max_steps",
                  size["teacher_steps"])
            taught = ["sft teacher"]
        # --- 2. the student base: pretrained on the corpus beside the teacher, or reused from the cache -------
        base, cached = student_base(world, size, args.bases, stage)
        based = [] if cached else ["sft student-base"]
        # --- 4. teacher traces -------------------------------------------------------------------------------
        stage("tracegen", PY, "-m", "tracegen", "--config", RECIPE / "tracegen.yaml", "--problems",
              world / "problems" / "train.jsonl", "--model", teacher, "--output_dir", run, "--limit",
              size["problems"], "--n", size["n"], after=taught)
        # --- 5. curation (and, for comparison, every finished trace) ----------------------------------------
        stage("filter", PY, "-m", "filter", "--config", RECIPE / "filter.yaml", "--run_dir", run,
              "--contamination_benchmarks", f"toy={world / 'problems' / 'test.jsonl'}", after=["tracegen"])
        stage("filter (unfiltered export)", PY, "-m", "filter", "--config", RECIPE / "filter-none.yaml",
              "--run_dir", run, "--db", run / "unfiltered.duckdb", "--output_dir", run / "unfiltered",
              after=["tracegen"])
        # --- 6. students from the same base, the same steps (the on-policy student, the longest, first) -------
        for name in sorted(STUDENTS, key=lambda name: name != "filtered-on-policy"):
            data, curation = ("unfiltered", "filter (unfiltered export)") if name == "unfiltered" else ("curated", "filter")
            kd = ["--teacher_model", teacher] if name in ("filtered-kd", "filtered-on-policy") else []  # same tokenizer
            stage(f"sft {name}", PY, "-m", "sft", "--config", RECIPE / f"sft-{name}.yaml", "--dataset", run / data,
                  "--model_name_or_path", base, "--output_dir", run / "checkpoints" / name,
                  "--max_steps", size["student_steps"], *kd, after=[*based, curation])
        for name, source in QUANTIZED.items():
            stage(f"quantize {name}", PY, "-m", "sft.quantize", "--model", run / "checkpoints" / source, "--scheme",
                  "int8", "--output_dir", run / "checkpoints" / name, "--dataset", run / "curated",
                  after=[f"sft {source}"])
        # --- 7. evals, each after its model --------------------------------------------------------------------
        evals("student-base", base, after=based)
        evals("teacher", teacher, after=taught)
        for name in STUDENTS:
            evals(name, run / "checkpoints" / name, after=[f"sft {name}"])
        for name in QUANTIZED:
            evals(name, run / "checkpoints" / name, after=[f"quantize {name}"])
    (run / "student-base.json").write_text(json.dumps({"path": str(base), "cached": cached}, indent=2) + "\n")
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
          "--max_steps", size["base_steps"], then=lambda: os.replace(partial, base))
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
    """Runs the recipe's stages and times them: one at a time, or, inside parallel(), on `jobs` workers with one
    torch thread each. Measured here (the teacher's recipe, 100 steps): one thread 52.6 s, two 33.0 s, two one-thread
    runs side by side 52 s each, so two workers do 1.27x the work of one stage on two threads; and sampling with
    `generate` (the on-policy student) is faster on one thread than on two that wait on each other."""

    def __init__(self, run: Path, call=None, jobs: int = 2):
        self.run_dir, self.call, self.jobs = run, call, jobs
        self.timings: dict[str, dict] = {}
        self._queue: list[tuple] | None = None  # inside parallel(): (name, command, after, then)

    def run(self, name: str, *cmd, after=(), then=None) -> None:
        """Runs one stage now, its output to this terminal, then calls `then` if given; inside parallel(), queues
        it to start once the stages named in `after` are done (its output to <run>/logs/<name>.log)."""
        cmd = [str(c) for c in cmd]
        if self._queue is None:
            self._record(name, cmd, log=None)
            return then() if then else None
        unknown = set(after) - {queued[0] for queued in self._queue} - set(self.timings)
        if unknown:
            raise ValueError(f"stage '{name}' is queued after {sorted(unknown)}, which no earlier stage is")
        self._queue.append((name, cmd, tuple(after), then))

    @contextlib.contextmanager
    def parallel(self):
        """Stages run inside this block are queued; leaving it runs them, `jobs` at a time, each worker taking the
        first queued stage whose `after` stages are done. A failure starts nothing more; the stages running finish,
        then it is raised, naming the stage and its log. With jobs 1 (or `call`) they run here one by one, and so
        does a lone queued stage (with every thread)."""
        if self.jobs < 2 or self.call is not None:
            yield
            return
        self._queue = []
        try:
            yield
            queue = self._queue
        finally:
            self._queue = None
        if len(queue) == 1:
            name, cmd, _, then = queue[0]
            return self.run(name, *cmd, then=then)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done, failed = set(self.timings), []
        ready = threading.Condition()

        def work() -> None:
            while True:
                with ready:
                    while True:
                        if failed or not queue:
                            return
                        stage = next((q for q in queue if set(q[2]) <= done), None)
                        if stage is not None:
                            break
                        ready.wait()
                    queue.remove(stage)
                name, cmd, _, then = stage
                try:
                    self._record(name, cmd, self.run_dir / "logs" / f"{name.replace(' ', '-')}.log", env)
                    if then:
                        then()
                except BaseException as e:  # raised below, once both workers have stopped
                    failed.append(e)
                with ready:
                    done.add(name)
                    ready.notify_all()

        workers = [threading.Thread(target=work, name=f"stages-{i}") for i in range(self.jobs)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if failed:
            raise failed[0]

    def _record(self, name: str, cmd: list[str], log: Path | None, env: dict | None = None) -> None:
        where = "" if log is None else f" [log: {log}]"
        print(f"\n=== {name}{where}: {shlex.join(cmd)}", flush=True)
        start = time.monotonic()
        if self.call is not None:
            cpu = _cpu()
            code = self.call(cmd)
            cpu = _cpu() - cpu
        else:
            code, cpu = launch(cmd, env, log)
        if code != 0:
            raise SystemExit(f"quickstart: stage '{name}' failed with exit code {code} (its log is "
                             f"{'above' if log is None else log}); fix it and rerun: finished stages are skipped or "
                             f"resumed")
        self.timings[name] = {"wall_s": round(time.monotonic() - start, 1), "cpu_s": round(cpu, 1)}
        if log is not None:
            print(f"\n=== {name}: done in {self.timings[name]['wall_s']:.0f} s", flush=True)


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
                        help="2: after the world, two stages at a time, one torch thread each, each after its "
                             "inputs; 1: every stage after the other")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
