"""The evals stage's files: per-sample Parquet, scores.json (every model evaluated into one output_dir) and
report.md (models side by side, the protocol under the table). Every file is written under a temporary
name and renamed; scores.json and report.md are updated under one lock, so two evals writing one
output_dir keep both.
"""

import contextlib
import fcntl
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SAMPLE_SCHEMA = pa.schema([
    ("benchmark", pa.string()),
    ("problem_id", pa.string()),
    ("sample_index", pa.int32()),
    ("model", pa.string()),
    ("completion", pa.string()),
    ("extracted", pa.string()),  # math: the final answer; code: the program that ran
    ("correct", pa.bool_()),
    ("category", pa.string()),  # the grader's verdict: correct, wrong, no_answer, timeout, error (evals/grading.py)
    ("reason", pa.string()),  # why, in words: ok, mismatch, base input 3: wrong output, generation_error, ...
    ("finish_reason", pa.string()),
    ("completion_tokens", pa.int32()),
    ("error", pa.string()),  # the generation error of a sample that could not be made
])


def write_samples(path: Path, rows: list[dict], model: str) -> None:
    rows = [{f: r.get(f) for f in SAMPLE_SCHEMA.names} | {"model": model} for r in rows]
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def publish(out_dir: Path, model: str, scores: dict[str, dict]) -> dict:
    """Merge one model's benchmark scores into scores.json (other models and benchmarks are kept) and rewrite
    report.md from it, under one lock so that concurrent evals into one output_dir lose nothing."""
    path = out_dir / "scores.json"
    with _locked(out_dir / ".scores.lock"):
        everything = json.loads(path.read_text()) if path.exists() else {}
        everything.setdefault(model, {}).update(scores)
        _write_text(path, json.dumps(everything, indent=2) + "\n")
        plotted = plot_accuracy_vs_latency(everything, out_dir / "efficiency.png")
        _write_text(out_dir / "report.md", render_report(everything, plotted))
    return everything


def render_report(everything: dict, plotted: bool = False) -> str:
    benchmarks = list(dict.fromkeys(b for per_model in everything.values() for b in per_model))
    has_maj = {b for per_model in everything.values() for b, m in per_model.items() if "maj@k" in m}
    measured = any(_efficiency(per_model) for per_model in everything.values())
    header = ["model"]
    for b in benchmarks:
        header += [f"{b} pass@1"] + ([f"{b} maj@k"] if b in has_maj else [])
    if measured:
        header += ["params", "weights MiB", "ms/token (p50)", "tokens/s"]
    lines = ["# Evals", "", "pass@1 (mean over n samples) ± standard error, and maj@k (k = n), in %." +
             (" Efficiency: see the Efficiency section for how and where it was measured." if measured else ""), "",
             _row(header), _row(["---"] * len(header))]
    for model, per_model in everything.items():
        cells = [model]
        for b in benchmarks:
            m = per_model.get(b)
            cells.append(f"{100 * m['pass@1']:.1f} ± {100 * m['stderr']:.1f}" if m else "—")
            if b in has_maj:
                cells.append(f"{100 * m['maj@k']:.1f}" if m and "maj@k" in m else "—")
        if measured:
            e = _efficiency(per_model)
            cells += [_count(e.get("parameters")), _mib(e.get("weights_bytes")),
                      _num(e.get("per_token_ms", {}).get("p50")), _num(e.get("throughput_tokens_per_s"))] if e else \
                ["—"] * 4
        lines.append(_row(cells))
    efficiency = [*_efficiency_section(everything), ""] if measured else []
    figure = ["![accuracy vs per-token latency](efficiency.png)", ""] if plotted else []
    return "\n".join(lines + ["", *efficiency, *figure, *_details(everything), "", *_protocol(everything)]) + "\n"


def _efficiency(per_model: dict) -> dict | None:
    """The model's first successful efficiency record (the columns of the main table)."""
    return next((m["efficiency"] for m in per_model.values() if "per_token_ms" in m.get("efficiency", {})), None)


def _efficiency_section(everything: dict) -> list[str]:
    columns = ["model", "benchmark", "engine", "params", "FLOPs/token", "weights MiB", "peak RSS MiB",
               "TTFT ms p50 / p95", "ms/token p50 / p95", "tokens/s (batch)"]
    lines = ["## Efficiency", "",
             "Measured on the engine that generated, each request forced to the same number of tokens; TTFT and "
             "per-token latency at batch 1, throughput at the protocol's batch/concurrency; FLOPs from the config "
             "at the measured context. Compare models measured on the same hardware (below) only.", "",
             _row(columns), _row(["---"] * len(columns))]
    hardware = {}
    for model, per_model in everything.items():
        for b, m in per_model.items():
            e = m.get("efficiency")
            if not e:
                continue
            if "error" in e:
                lines.append(_row([model, b, f"not measured: {e['error']}", *["—"] * 7]))
                continue
            hardware.setdefault(json.dumps(e["hardware"], sort_keys=True), []).append(model)
            flops = e.get("flops_per_token")
            lines.append(_row([
                model, b, e["engine"], _count(e.get("parameters")), _count(flops),
                _mib(e.get("weights_bytes")), _mib(e.get("peak_memory_bytes") or e.get("peak_gpu_bytes")),
                f"{_num(e['ttft_ms']['p50'])} / {_num(e['ttft_ms']['p95'])}",
                f"{_num(e['per_token_ms']['p50'])} / {_num(e['per_token_ms']['p95'])}",
                f"{_num(e['throughput_tokens_per_s'])} ({e['throughput_batch']})"]))
    lines.append("")
    for spec, models in hardware.items():
        h = json.loads(spec)
        where = f"GPU {h['gpu']}, " if h.get("gpu") else ""
        lines.append(f"Hardware of {', '.join(dict.fromkeys(models))}: {where}{h['cpu']} ({h['cpus']} CPUs), "
                     f"{h['memory_gib']} GiB, torch {h['torch']}" + (f"; {h['note']}" if h.get("note") else ""))
    return lines


def plot_accuracy_vs_latency(everything: dict, path: Path) -> bool:
    """pass@1 against per-token latency at batch 1, a point per model and benchmark; False when none measured."""
    points = [(model, b, m["efficiency"]["per_token_ms"]["p50"], 100 * m["pass@1"])
              for model, per_model in everything.items() for b, m in per_model.items()
              if "per_token_ms" in m.get("efficiency", {})]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for b in dict.fromkeys(p[1] for p in points):
        xs, ys = [p[2] for p in points if p[1] == b], [p[3] for p in points if p[1] == b]
        ax.scatter(xs, ys, label=b)
        for model, _, x, y in (p for p in points if p[1] == b):
            ax.annotate(model, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("per-token latency at batch 1, p50 (ms; lower is better)")
    ax.set_ylabel("pass@1 (%)")
    ax.set_title("accuracy vs latency")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def _count(n) -> str:
    if n is None:
        return "—"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _mib(n) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def _num(x) -> str:
    return "—" if x is None else f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _details(everything: dict) -> list[str]:
    lines = ["## Details", "", _row(["model", "benchmark", "problems", "n", "pass@k (k = n)", "truncated",
                                     "mean tokens", "generation errors", "by level (pass@1 %)"]),
             _row(["---"] * 9)]
    for model, per_model in everything.items():
        for b, m in per_model.items():
            levels = ", ".join(f"{lv}: {100 * v['pass@1']:.0f}" for lv, v in (m.get("by_level") or {}).items())
            tokens = f"{m['mean_tokens']:.0f}" if m.get("mean_tokens") is not None else "—"
            lines.append(_row([model, b, m["num_problems"], m["n"], f"{100 * m['pass@k']:.1f}",
                               f"{100 * m['truncation_rate']:.1f}%", tokens, m.get("errors", 0), levels or "—"]))
    return lines


def _protocol(everything: dict) -> list[str]:
    fields = ["temperature", "top_p", "max_tokens", "seed", "prompt_template", "grader", "data", "generation"]
    lines = ["## Protocol", "", _row(["model", "benchmark", *fields]), _row(["---"] * (len(fields) + 2))]
    for model, per_model in everything.items():
        for b, m in per_model.items():
            protocol = m.get("protocol", {})
            lines.append(_row([model, b, *(protocol.get(f, "—") for f in fields)]))
    return lines


def _row(cells) -> str:
    return "| " + " | ".join(str("—" if c is None else c).replace("|", "\\|") for c in cells) + " |"


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
