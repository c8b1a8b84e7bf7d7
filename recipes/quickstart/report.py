"""The quickstart's report: what distillation did, from the files the stages wrote in this run.

    .venv/bin/python recipes/quickstart/report.py runs/quickstart [--size full]

Reads <run>/evals/scores.json (evals), <run>/curated/funnel.json and <run>/curation.duckdb (filter),
<run>/tracegen.summary.json (tracegen), <run>/checkpoints/*/sft_metrics.json (sft) and <run>/timings.json
(run.py); writes <run>/report.md and three PNG plots beside it. Every number comes from those files.
"""

import argparse
import json
import sys
from pathlib import Path

import duckdb
import matplotlib

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere: the repo's stages
from filter.card import HEADER, funnel_rows

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

MODELS = ("teacher", "student-base", "unfiltered", "filtered-full", "filtered-lora", "filtered-kd")
WHAT = {
    "teacher": "the teacher (4x128, trained from random init on the gold solutions)",
    "student-base": "the student base (2x128, pretrained on the corpus), before distillation",
    "unfiltered": "student base, full FT on every finished trace, wrong ones included",
    "filtered-full": "student base, full FT on the curated traces",
    "filtered-lora": "student base, LoRA on the curated traces",
    "filtered-kd": "student base, full FT on the curated traces + sparse KD on the teacher's top-k logprobs",
    "filtered-on-policy": "student base, curated traces + on-policy KD (its own samples scored by the teacher)",
    "filtered-full-int8": "filtered-full with int8 weights (sft.quantize, torchao weight-only)",
}
# (what it shows, model a, model b): a - b with its standard error
DIFFERENCES = (
    ("filtering (filtered vs unfiltered traces)", "filtered-full", "unfiltered"),
    ("sparse KD vs plain SFT (both filtered)", "filtered-kd", "filtered-full"),
    ("on-policy KD vs plain SFT (both filtered)", "filtered-on-policy", "filtered-full"),
    ("int8 weights vs the same student in float32", "filtered-full-int8", "filtered-full"),
    ("distillation (filtered student vs its base)", "filtered-full", "student-base"),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="recipes/quickstart/report.py", allow_abbrev=False)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--size", default="full")
    args = parser.parse_args(argv)
    run = args.run_dir
    scores = json.loads((run / "evals" / "scores.json").read_text())
    funnel = json.loads((run / "curated" / "funnel.json").read_text())
    with duckdb.connect(str(run / "curation.duckdb"), read_only=True) as con:
        traces = con.sql("""SELECT v.verdict, t.completion_tokens, p.difficulty FROM traces t
                            JOIN verified v USING (trace_id) JOIN problems p USING (problem_id)""").fetchall()
    plots = {"accuracy.png": plot_accuracy(scores, run), "trace_length.png": plot_lengths(traces, run),
             "pass_rate_by_difficulty.png": plot_difficulty(scores, traces, run)}
    sections = [
        f"# Quickstart report ({args.size} size)\n\nR1-style distillation in the toy world, every stage run for "
        "real on this machine; every number below was computed in this run.\n",
        models_table(scores), differences_section(scores), funnel_section(funnel), traces_section(run, traces),
        training_section(run), timings_section(run), "## Plots\n\n" + "\n".join(f"![{name}]({name})" for name in plots) + "\n",
    ]
    (run / "report.md").write_text("\n".join(sections))


def models_table(scores: dict) -> str:
    rows = ["## Models on the held-out split\n",
            "| model | what | pass@1 | ± stderr | of teacher | maj@k | pass@k | k | problems | truncated | mean tokens |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    protocol = None
    teacher = scores.get("teacher", {}).get("toy", {}).get("pass@1")
    for name in [m for m in MODELS if m in scores] + [m for m in scores if m not in MODELS]:
        s = scores[name]["toy"]
        protocol = protocol or s["protocol"]
        share = f"{s['pass@1'] / teacher:.0%}" if teacher else "-"
        rows.append(f"| {name} | {WHAT.get(name, '')} | {s['pass@1']:.3f} | {s['stderr']:.3f} | {share} | "
                    f"{s.get('maj@k', float('nan')):.3f} | {s['pass@k']:.3f} | {s['n']} | {s['num_problems']} | "
                    f"{s['truncation_rate']:.3f} | {s['mean_tokens']:.0f} |")
    rows.append(f"\nProtocol: `{json.dumps(protocol, sort_keys=True)}`\n")
    return "\n".join(rows) + "\n"


def differences_section(scores: dict) -> str:
    """Differences of pass@1 with the standard error of a difference of independent means, sqrt(se_a^2 + se_b^2)
    (the models answer the same problems, so this is conservative)."""
    rows = ["## What filtering, KD and distillation did\n", "| comparison | a - b | pass@1 difference | ± stderr | "
            "in stderrs |", "|---|---|---|---|---|"]
    for what, a, b in DIFFERENCES:
        if a in scores and b in scores:
            sa, sb = scores[a]["toy"], scores[b]["toy"]
            diff, se = sa["pass@1"] - sb["pass@1"], (sa["stderr"] ** 2 + sb["stderr"] ** 2) ** 0.5
            rows.append(f"| {what} | {a} - {b} | {diff:+.3f} | {se:.3f} | {diff / se if se else 0:+.1f} |")
    return "\n".join(rows) + "\n"


def funnel_section(funnel: dict) -> str:
    rows = ["## Curation funnel\n", "| " + " | ".join(HEADER) + " |", "|---|---|---|---|"]
    rows += ["| " + " | ".join(row) + " |" for row in funnel_rows(funnel)]
    return "\n".join(rows) + "\n"


def traces_section(run: Path, traces: list[tuple]) -> str:
    summary = json.loads((run / "tracegen.summary.json").read_text())
    counts = {}
    for verdict, _, _ in traces:
        counts[verdict] = counts.get(verdict, 0) + 1
    lines = ["## Teacher traces\n",
             f"{summary['samples_done']} of {summary['samples_expected']} samples ({summary['problems']} problems x "
             f"n={summary['n']}); verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + "\n"]
    return "\n".join(lines)


def training_section(run: Path) -> str:
    rows = ["## Training\n", "| checkpoint | metrics |", "|---|---|"]
    base = json.loads((run / "student-base.json").read_text())
    for name in MODELS:
        path = run / "checkpoints" / name / "sft_metrics.json"
        if name == "student-base":
            path = Path(base["path"]) / "sft_metrics.json"
            name += " (reused from the cache)" if base["cached"] else ""
        if path.exists():
            metrics = json.loads(path.read_text())
            keep = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
            rows.append(f"| {name} | `{json.dumps(keep, sort_keys=True)}` |")
    return "\n".join(rows) + "\n"


def timings_section(run: Path) -> str:
    timings = json.loads((run / "timings.json").read_text())
    rows = ["## Time per stage (seconds)\n", "Wall time, and the CPU time of the stage's processes (user + system, all "
            "cores; on a shared machine the steadier measure).\n", "| stage | wall s | CPU s |", "|---|---|---|"]
    rows += [f"| {name} | {t['wall_s']:.0f} | {t['cpu_s']:.0f} |" for name, t in timings.items()]
    rows.append(f"| **total** | {sum(t['wall_s'] for t in timings.values()):.0f} | "
                f"{sum(t['cpu_s'] for t in timings.values()):.0f} |")
    return "\n".join(rows) + "\n"


def plot_accuracy(scores: dict, run: Path) -> Path:
    names = [m for m in MODELS if m in scores]
    values = [scores[m]["toy"]["pass@1"] for m in names]
    errors = [scores[m]["toy"]["stderr"] for m in names]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = {"teacher": "#555", "student-base": "#bbb"}
    ax.bar(names, values, yerr=errors, capsize=4, color=[colors.get(n, "#4a7") for n in names])
    ax.set_ylabel("pass@1 (held-out)")
    ax.set_ylim(0, 1)
    return _save(fig, run / "accuracy.png")


def plot_lengths(traces: list[tuple], run: Path) -> Path:
    by_verdict = {}
    for verdict, tokens, _ in traces:
        by_verdict.setdefault(verdict, []).append(tokens or 0)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(list(by_verdict.values()), bins=30, label=list(by_verdict), stacked=True)
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("teacher traces")
    ax.legend()
    return _save(fig, run / "trace_length.png")


def plot_difficulty(scores: dict, traces: list[tuple], run: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    teacher = {}
    for verdict, _, difficulty in traces:
        teacher.setdefault(difficulty, []).append(verdict == "correct")
    levels = sorted(d for d in teacher if d is not None)
    ax.plot(levels, [sum(teacher[d]) / len(teacher[d]) for d in levels], "k--o", label="teacher traces (train)")
    for name in [m for m in MODELS if m in scores]:
        by_level = scores[name]["toy"].get("by_level", {})
        xs = [int(lv) for lv in by_level if lv.isdigit()]
        ax.plot(xs, [by_level[str(x)]["pass@1"] for x in xs], "-o", label=f"{name} (held-out)")
    ax.set_xlabel("difficulty")
    ax.set_ylabel("pass rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return _save(fig, run / "pass_rate_by_difficulty.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
