"""The ablation: what the data, the loss and the data scale do to a distilled student, in the toy world.

    .venv/bin/python recipes/ablation/run.py                              # every arm, two seeds (1-2 h on 2 cores)
    .venv/bin/python recipes/ablation/run.py --arms filtered,kd-k5        # some arms
    .venv/bin/python recipes/ablation/run.py --size tiny --arms quarter   # the plumbing, in minutes

0. the quickstart into the same run directory (toy world, student base, teacher, traces, curated and unfiltered
   sets), unless they are there already
1. data: the same traces selected by confidence (filter, select_by: most_confident), and a quarter and a half of
   the curated set (a seeded sample)
2. arms: `python -m sft` from the same student base with the same optimizer steps, for each seed, then
   `python -m evals` on the held-out split with the quickstart's protocol. Quantization: `qat-*` train with
   `--qat` and are evaluated converted; `ptq-*` quantize the `filtered` arm's checkpoint (`python -m sft.quantize`)
3. <run>/ablation/results.md and results.png: every arm and seed with its commands, and the mean over seeds

Every arm is one line of ARMS (name, group, data, sft flags). Resumable: an arm already in
<run>/ablation/evals/scores.json is skipped, and each stage resumes its own work.
"""

import argparse
import json
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import pyarrow.parquet as pq

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "quickstart"
PY = sys.executable
SIZES = {  # the quickstart size this builds on; per-arm steps and the evaluation, equal for every arm
    "full": {"quickstart": "full", "world": "cache/toyworld", "steps": 500, "eval_problems": 200, "eval_n": 4,
             "seeds": (0, 1)},
    # the CI quickstart's world (difficulties 1-2) is a different world: its own default folder, as make quickstart-ci
    "tiny": {"quickstart": "ci", "world": "cache/toyworld-ci", "steps": 10, "eval_problems": 10, "eval_n": 1,
             "seeds": (0,)},
}
TEACHER = "{run}/checkpoints/teacher"
QUICKSTART_MADE = ("student-base.json", "checkpoints/teacher", "curation.duckdb", "curated", "unfiltered")
ONLINE = ["--kd", "online", "--teacher_model", TEACHER]
# On-policy distillation (kd: on_policy, sft/on_policy.py), as recipes/quickstart/sft-filtered-on-policy.yaml: half
# the batches the student's own samples graded by the teacher in process (reverse KL), half the curated traces.
# (The results in RESULTS.md were run with the teacher behind a managed vLLM server: the same scores, slower here.)
ON_POLICY = ["--kd", "on_policy", "--teacher_model", TEACHER, "--on_policy_top_k", "5"]
# (name, group, data, sft flags on top of recipes/quickstart/sft-filtered-full.yaml). Data: curated, unfiltered,
# confident (most confident per problem), quarter, half (of curated). "filtered" is the reference of every group.
ARMS = [
    ("unfiltered", "data", "unfiltered", []),
    ("filtered", "data, loss, scale", "curated", []),
    ("confident", "data", "confident", []),
    ("kd-k1", "loss", "curated", ["--kd", "sparse", "--kd_top_k", "1", "--teacher_model", TEACHER]),
    ("kd-k5", "loss", "curated", ["--kd", "sparse", "--kd_top_k", "5", "--teacher_model", TEACHER]),
    ("kd-k20", "loss", "curated", ["--kd", "sparse", "--kd_top_k", "20", "--teacher_model", TEACHER]),
    ("on-policy", "loss", "curated", ON_POLICY),
    ("quarter", "scale", "quarter", []),
    ("half", "scale", "half", []),
    ("kd-online", "toolbox", "curated", ONLINE),
    ("kd-online-feature", "toolbox", "curated", [*ONLINE, "--feature_weight", "1.0", "--feature_loss", "cosine"]),
    ("kd-online-attention", "toolbox", "curated", [*ONLINE, "--attention_weight", "1.0", "--attention_layers", "1"]),
    ("kd-online-tcosine", "toolbox", "curated", [*ONLINE, "--kd_temperature", "5", "--kd_temperature_end", "1",
                                                 "--kd_temperature_schedule", "cosine"]),
    ("pruned-kd-online", "toolbox", "curated", ONLINE),  # from the pruned teacher, not the student base
    ("ptq-int8", "quantization", "curated", []),  # PTQ: the filtered arm's checkpoint quantized, no training
    ("ptq-int4", "quantization", "curated", []),
    ("qat-int8", "quantization", "curated", ["--qat", "int8"]),  # evaluated: <checkpoint>/quantized
    ("qat-int4", "quantization", "curated", ["--qat", "int4"]),
]
# Post-training quantization arms: `python -m sft.quantize` of the same seed's `filtered` checkpoint (trained first
# if it is not there), with the torchao config the qat arms convert with, so QAT and PTQ differ only in training.
PTQ = {"ptq-int8": "int8", "ptq-int4": "int4"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size, run = SIZES[args.size], args.run_dir
    args.world = args.world or Path(size["world"])
    arms = [arm for arm in ARMS if not args.arms or arm[0] in args.arms]
    if args.arms and len(arms) != len(set(args.arms)):
        print(f"recipes/ablation/run.py: --arms: unknown {sorted(set(args.arms) - {a[0] for a in arms})}; "
              f"choose from {[a[0] for a in ARMS]}", file=sys.stderr)
        return 2
    out = run / "ablation"
    # --- 0. the quickstart: world, student base, teacher, traces, curated ----------------------------------
    if not all((run / need).exists() for need in QUICKSTART_MADE):
        run_stage("quickstart", [PY, QUICKSTART / "run.py", "--size", size["quickstart"], "--run_dir", run,
                                 "--world", args.world, "--bases", args.bases])
    base = json.loads((run / "student-base.json").read_text())["path"]
    # --- 1. the data the arms need ------------------------------------------------------------------------
    data = {"curated": run / "curated", "unfiltered": run / "unfiltered"}
    needed = {arm[2] for arm in arms}
    if "confident" in needed:
        data["confident"] = confident_selection(run, args.world)
    for name, share in (("quarter", 0.25), ("half", 0.5)):
        if name in needed:
            data[name] = subset(run / "curated", out / "data" / name, share)
    if any(arm[0] == "pruned-kd-online" for arm in arms):
        prune_teacher(run)
    # --- 2. arms: train from the same base with equal steps, evaluate -------------------------------------
    done = scores(out)
    for arm in arms:
        for seed in size["seeds"]:
            name = f"{arm[0]}-s{seed}"
            if name in done:
                print(f"=== {name}: scored already, skipped", flush=True)
                continue
            sft, evals = commands(arm, seed, run, base, data, size, args.world)
            if arm[0] in PTQ:
                train_filtered(seed, run, base, data, size, args.world)
            run_stage(f"{'quantize' if arm[0] in PTQ else 'sft'} {name}", sft)
            run_stage(f"evals {name}", evals)
    # --- 3. one table and one plot --------------------------------------------------------------------------
    write_results(out, arms, size, run, base, data, args.world)
    print((out / "results.md").read_text())
    return 0


def commands(arm, seed: int, run: Path, base: str, data: dict, size: dict, world: Path) -> tuple[list, list]:
    """The sft (for a PTQ arm: sft.quantize) and evals commands of one arm and seed (what runs is what the results
    table shows)."""
    name, _, dataset, flags = arm
    checkpoint = run / "ablation" / "checkpoints" / f"{name}-s{seed}"
    init = run / "pruned-teacher" if name == "pruned-kd-online" else base
    sft = [PY, "-m", "sft", "--config", QUICKSTART / "sft-filtered-full.yaml", "--dataset", data[dataset],
           "--model_name_or_path", init, "--output_dir", checkpoint, "--max_steps", size["steps"], "--seed", seed,
           *[flag.format(run=run) for flag in flags]]
    if name in PTQ:
        sft = [PY, "-m", "sft.quantize", "--model", checkpoint.with_name(f"filtered-s{seed}"), "--scheme", PTQ[name],
               "--output_dir", checkpoint, "--dataset", data[dataset]]
    model = checkpoint / "quantized" if "--qat" in flags else checkpoint  # the converted model, not its float weights
    evals = [PY, "-m", "evals", "--config", QUICKSTART / "evals.yaml", "--model", model, "--model_name",
             f"{name}-s{seed}", "--output_dir", run / "ablation" / "evals", "--custom_benchmarks",
             json.dumps({"toy": str(world / "problems" / "test.jsonl")}), "--limit", size["eval_problems"],
             "--n", size["eval_n"]]
    return [str(c) for c in sft], [str(c) for c in evals]


def train_filtered(seed: int, run: Path, base: str, data: dict, size: dict, world: Path) -> None:
    """The checkpoint a PTQ arm quantizes: the filtered arm's, trained here unless it is there already."""
    filtered = next(arm for arm in ARMS if arm[0] == "filtered")
    if not (run / "ablation" / "checkpoints" / f"filtered-s{seed}" / "sft_metrics.json").exists():
        run_stage(f"sft filtered-s{seed}", commands(filtered, seed, run, base, data, size, world)[0])


def confident_selection(run: Path, world: Path) -> Path:
    """The quickstart's curation with the most confident traces per problem instead of the shortest; it starts
    from a copy of the quickstart's database, so nothing is labelled twice."""
    db, out = run / "confident.duckdb", run / "confident"
    if not out.exists():
        if not db.exists():
            shutil.copyfile(run / "curation.duckdb", db)
        run_stage("filter (most confident)", [PY, "-m", "filter", "--config", QUICKSTART / "filter.yaml",
                                              "--run_dir", run, "--db", db, "--output_dir", out, "--select_by",
                                              "most_confident", "--contamination_benchmarks",
                                              f"toy={world / 'problems' / 'test.jsonl'}"])
    return out


def subset(curated: Path, out: Path, share: float) -> Path:
    """A seeded sample of `share` of the curated rows (SFT arms only: logprobs_file paths stay the curated set's)."""
    if not out.exists():
        table = pq.read_table(sorted(curated.glob("*.parquet")))
        rows = sorted(random.Random(f"ablation-{share}").sample(range(table.num_rows), int(table.num_rows * share)))
        tmp = out.with_name(f".{out.name}.partial")
        tmp.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.take(rows), tmp / "part-0.parquet")
        tmp.rename(out)
    return out


def prune_teacher(run: Path) -> None:
    if not (run / "pruned-teacher" / "config.json").exists():
        run_stage("prune teacher", [PY, "-m", "sft.prune", "--config", HERE / "prune.yaml", "--model",
                                    TEACHER.format(run=run), "--output_dir", run / "pruned-teacher",
                                    "--calibration", run / "curated"])


def scores(out: Path) -> dict:
    path = out / "evals" / "scores.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_results(out: Path, arms: list, size: dict, run: Path, base: str, data: dict, world: Path) -> None:
    done = scores(out)
    rows = ["# Ablation results\n", f"Every arm starts from the student base `{base}` (the pruned arm from the pruned "
            f"teacher) and trains {size['steps']} optimizer steps; pass@1 on {size['eval_problems']} held-out "
            f"problems x {size['eval_n']} samples (the quickstart's protocol).\n", "## Mean over seeds\n",
            "| arm | group | seeds | pass@1 (mean) | ± stderr |", "|---|---|---|---|---|"]
    means = {}
    for name, group, _, _ in arms:
        found = [done[f"{name}-s{s}"]["toy"] for s in size["seeds"] if f"{name}-s{s}" in done]
        if found:
            mean = sum(f["pass@1"] for f in found) / len(found)
            se = sum(f["stderr"] ** 2 for f in found) ** 0.5 / len(found)  # the stderr of a mean of independent runs
            means[name] = (group, mean, se)
            rows.append(f"| {name} | {group} | {len(found)} | {mean:.3f} | {se:.3f} |")
    rows += ["\n## Every run, with its commands\n", "| run | pass@1 | ± stderr | maj@k | commands |", "|---|---|---|---|---|"]
    for arm in arms:
        for seed in size["seeds"]:
            if f"{arm[0]}-s{seed}" in done:
                s = done[f"{arm[0]}-s{seed}"]["toy"]
                sft, evals = commands(arm, seed, run, base, data, size, world)
                rows.append(f"| {arm[0]}-s{seed} | {s['pass@1']:.3f} | {s['stderr']:.3f} | "
                            f"{s.get('maj@k', float('nan')):.3f} | `{shlex.join(sft)}` then `{shlex.join(evals)}` |")
    (out / "results.md").write_text("\n".join(rows) + "\n\n![results](results.png)\n")
    plot(means, out / "results.png")


def plot(means: dict, path: Path) -> None:
    names = list(means)
    colors = {"data": "#4a7", "loss": "#47a", "scale": "#a74", "toolbox": "#777", "quantization": "#a47"}
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 3.5))
    ax.bar(names, [means[n][1] for n in names], yerr=[means[n][2] for n in names], capsize=3,
           color=[colors.get(means[n][0].split(",")[0], "#555") for n in names])
    ax.set_ylabel("pass@1 (held-out)")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_stage(name: str, cmd: list) -> None:
    cmd = [str(c) for c in cmd]
    print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
    start = time.monotonic()
    if subprocess.call(cmd) != 0:
        raise SystemExit(f"ablation: stage '{name}' failed (its log is above); rerun to resume")
    print(f"=== {name}: {time.monotonic() - start:.0f} s", flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="recipes/ablation/run.py", allow_abbrev=False)
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full, or tiny for the plumbing")
    parser.add_argument("--run_dir", type=Path, default=Path("runs/ablation"), help="where everything goes")
    parser.add_argument("--world", type=Path, default=None,
                        help="where the toy world is built (default: cache/toyworld, tiny: cache/toyworld-ci)")
    parser.add_argument("--bases", type=Path, default=Path("cache/bases"), help="where pretrained bases are cached")
    parser.add_argument("--arms", type=lambda s: s.split(","), default=None,
                        help="comma-separated arm names (default: all)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
