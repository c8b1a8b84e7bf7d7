"""What the filter did, for people: the funnel printed as a table, and the curated set's card.md (counts,
funnel, length and difficulty histograms as PNG) next to funnel.json."""

import json
from pathlib import Path

from filter.config import FilterConfig


def funnel_rows(funnel: dict) -> list[tuple[str, str, str, str]]:
    """(step, dropped first-applicable, dropped any-applicable, rows left) for the table and the card."""
    rows, left = [("rows in", "", "", f"{funnel['rows_in']:,}")], funnel["rows_in"]
    for rule in funnel["rules"]:
        left -= rule["first_applicable"]
        rows.append((f"rule {rule['reason']}", f"{rule['first_applicable']:,}", f"{rule['any_applicable']:,}",
                     f"{left:,}"))
    rows.append(("kept by the rules", "", "", f"{funnel['kept']:,}"))
    previous = funnel["kept"]
    for step in funnel.get("selection", []):
        rows.append((f"select {step['step']}", f"{previous - step['rows']:,}", "", f"{step['rows']:,}"))
        previous = step["rows"]
    rows.append(("exported", "", "", f"{funnel.get('exported', previous):,}"))
    return rows


HEADER = ("step", "dropped (first reason)", "dropped (any reason)", "rows left")


def print_funnel(funnel: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="filter funnel")
    for i, name in enumerate(HEADER):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in funnel_rows(funnel):
        table.add_row(*row)
    Console(stderr=True).print(table)


def stats(con) -> dict:
    """Counts of the exported set, and the numbers behind its histograms."""
    row = con.execute("""
        SELECT count(*), count(DISTINCT t.problem_id), coalesce(sum(t.completion_tokens), 0),
               median(t.completion_tokens), string_agg(DISTINCT t.model, ', ')
        FROM selected JOIN traces t USING (trace_id)""").fetchall()[0]
    by = lambda col: dict(con.execute(f"""SELECT coalesce({col}::VARCHAR, 'none'), count(*) FROM selected JOIN signals
                                       USING (trace_id) GROUP BY ALL ORDER BY 1""").fetchall())  # noqa: E731
    lengths = [r[0] for r in con.execute("SELECT completion_tokens FROM selected JOIN traces USING (trace_id) "
                                     "WHERE completion_tokens IS NOT NULL").fetchall()]
    return {"rows": row[0], "problems": row[1], "completion_tokens": row[2], "median_completion_tokens": row[3],
            "teacher_models": row[4], "by_domain": by("domain"), "by_difficulty": by("difficulty"),
            "by_verdict": by("verdict"), "by_teacher": by("model"), "lengths": lengths}


def write_card(folder: Path, cfg: FilterConfig, funnel: dict, st: dict) -> None:
    (folder / "funnel.json").write_text(json.dumps(funnel, indent=2))
    _histograms(folder, st)
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    table += ["| " + " | ".join(row) + " |" for row in funnel_rows(funnel)]
    lines = [
        f"# Curated dataset from `{cfg.run_dir}`", "",
        f"- rows: {st['rows']:,} traces of {st['problems']:,} problems (teacher: {st['teacher_models'] or '-'})",
        f"- completion tokens: {st['completion_tokens']:,} in all, median {st['median_completion_tokens']}",
        f"- domains: {_counts(st['by_domain'])}; verdicts: {_counts(st['by_verdict'])}",
        f"- traces per teacher: {_counts(st['by_teacher'])}",
        f"- difficulty: {_counts(st['by_difficulty'])}",
        f"- reasoning format: `{cfg.reasoning_format}`; database: `{cfg.db}` (query it: "
        f"`python -m filter query {cfg.run_dir} \"SELECT ...\"`)", "",
        "## Funnel", "",
        "Every rule runs on every trace: *first reason* counts a trace under the first rule (in order) that "
        "rejected it, *any reason* under every rule that did.", "", *table, "",
        "## Lengths and difficulty", "", "![completion tokens](lengths.png)", "",
        "![difficulty](difficulty.png)", "",
        "## Load it", "", "```python", "import datasets",
        f'ds = datasets.load_dataset("parquet", data_files="{cfg.output_dir}/*.parquet", split="train")', "```", "",
    ]
    (folder / "card.md").write_text("\n".join(lines))


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in d.items()) or "-"


def _histograms(folder: Path, st: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(st["lengths"] or [0], bins=50)
    ax.set(xlabel="completion tokens", ylabel="traces", title="Completion length of the curated traces")
    fig.tight_layout()
    fig.savefig(folder / "lengths.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(st["by_difficulty"]), list(st["by_difficulty"].values()))
    ax.set(xlabel="difficulty", ylabel="traces", title="Curated traces per difficulty")
    fig.tight_layout()
    fig.savefig(folder / "difficulty.png", dpi=100)
    plt.close(fig)
