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
    ("reason", pa.string()),  # the grader's reason: ok, mismatch, no_answer, failed: ..., generation_error
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
        _write_text(out_dir / "report.md", render_report(everything))
    return everything


def render_report(everything: dict) -> str:
    benchmarks = list(dict.fromkeys(b for per_model in everything.values() for b in per_model))
    has_maj = {b for per_model in everything.values() for b, m in per_model.items() if "maj@k" in m}
    header = ["model"]
    for b in benchmarks:
        header += [f"{b} pass@1"] + ([f"{b} maj@k"] if b in has_maj else [])
    lines = ["# Evals", "", "pass@1 (mean over n samples) ± standard error, and maj@k (k = n), in %.", "",
             _row(header), _row(["---"] * len(header))]
    for model, per_model in everything.items():
        cells = [model]
        for b in benchmarks:
            m = per_model.get(b)
            cells.append(f"{100 * m['pass@1']:.1f} ± {100 * m['stderr']:.1f}" if m else "—")
            if b in has_maj:
                cells.append(f"{100 * m['maj@k']:.1f}" if m and "maj@k" in m else "—")
        lines.append(_row(cells))
    return "\n".join(lines + ["", *_details(everything), "", *_protocol(everything)]) + "\n"


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
