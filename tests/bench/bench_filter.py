"""The filter stage on synthetic traces: decontamination in DuckDB vs plain Python, then the whole filter.

    .venv/bin/python tests/bench/bench_filter.py [--run runs/bench-200k] [--traces 200000] [--skip-filter]

Without --run, a run directory is generated first (tests/bench/make_synthetic_traces.py, --traces traces,
~4 per problem) in a temporary folder. Then:

(1) Decontamination, side by side in this process, on the run's problems against every benchmark in
    ../shared/benchmarks (else the toy world's test split): `label_contamination` (DuckDB; first run with
    its benchmark n-gram cache empty, then with it filled) vs `contamination_python` (open-r1's way: a dict
    of benchmark n-grams, a loop over each problem's n-grams), both timed from loading the benchmarks to
    the labels. Both must report the same contaminated problems with the same match. For reference also
    open-r1's script as written (a pass per benchmark; words split on whitespace). Then 10% more problems
    arrive: DuckDB labels only those, the plain script checks everything again.
(2) The whole filter, `python -m filter --config <run>/filter.yaml` in a subprocess under /usr/bin/time -v
    (wall time, peak memory, traces/s), once on the fresh run and once more with nothing new.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from filter.contamination import contamination_python, label_contamination, load_benchmarks  # noqa: E402
from filter.dedup import label_duplicates  # noqa: E402

BENCHMARKS = ROOT.parent / "shared" / "benchmarks"
PUBLIC = ["gsm8k", "math500", "aime24", "amc23", "humaneval", "humanevalplus", "mbppplus"]
TOY = ROOT / "cache" / "toyworld" / "problems" / "test.jsonl"


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-filter-") as tmp:
        run = Path(args.run) if args.run else generate(Path(tmp) / "run", args.traces)
        names, data_dir = (PUBLIC, str(BENCHMARKS)) if BENCHMARKS.is_dir() else ([f"toy={TOY}"], None)
        problems = [(p["id"], p["prompt"]) for p in map(json.loads, (run / "problems.jsonl").open())]
        rows = decontamination(problems, names, data_dir, Path(tmp) / "decontam.duckdb")
        rows += duplicates(problems, run / "planted.json", Path(tmp) / "dedup.duckdb")
        if not args.skip_filter:
            rows += whole_filter(run, names, data_dir, Path(tmp))
    print_table(rows)
    return 0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--run", help="An existing synthetic run directory (default: generate one).")
    parser.add_argument("--traces", type=int, default=200_000, help="Traces to generate without --run.")
    parser.add_argument("--skip-filter", action="store_true", help="Only the decontamination comparison.")
    return parser.parse_args()


def generate(out: Path, traces: int) -> Path:
    cmd = [sys.executable, str(ROOT / "tests" / "bench" / "make_synthetic_traces.py"), "--out", str(out),
           "--traces", str(traces)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


# ----------------------------------------------------------------------------- (1) decontamination


def decontamination(problems: list[tuple[str, str]], names: list[str], data_dir: str | None, db: Path) -> list:
    cut = len(problems) * 10 // 11  # the last ~9% arrive later: 10% more
    first, later = problems[:cut], problems[cut:]
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE problems (problem_id VARCHAR PRIMARY KEY, prompt VARCHAR)")
    insert(con, first)
    rows = []
    t = time.perf_counter()
    label_contamination(con, benchmarks=names, data_dir=data_dir)
    rows.append(("decontam DuckDB, empty n-gram cache", len(first), time.perf_counter() - t))
    con.execute("DELETE FROM contamination")
    t = time.perf_counter()
    label_contamination(con, benchmarks=names, data_dir=data_dir)
    duck_s = time.perf_counter() - t
    rows.append(("decontam DuckDB, cached n-grams", len(first), duck_s))
    t = time.perf_counter()
    want = contamination_python(first, load_benchmarks(names, data_dir))
    python_s = time.perf_counter() - t
    rows.append(("decontam plain Python, one pass (same check)", len(first), python_s))
    got = {r[0]: tuple(r[1:]) for r in con.execute("""SELECT problem_id, benchmark, benchmark_problem_id,
        matched_ngram FROM contamination WHERE contaminated""").fetchall()}
    assert got == want, f"DuckDB and Python disagree on {len(set(got.items()) ^ set(want.items()))} problems"
    print(f"decontamination: {len(got):,} of {len(first):,} problems contaminated, same in both; DuckDB is "
          f"{python_s / duck_s:.1f}x the plain Python's rows/s ({os.cpu_count()} CPUs)")
    t = time.perf_counter()
    flagged = open_r1_as_written(first, load_benchmarks(names, data_dir))
    open_r1_s = time.perf_counter() - t
    rows.append(("decontam open-r1's script as written", len(first), open_r1_s))
    print(f"open-r1's decontaminate.py as written (a pass per benchmark, whitespace words): {len(flagged):,} "
          f"problems flagged; DuckDB is {open_r1_s / duck_s:.1f}x its rows/s")
    # --- 10% more problems arrive ------------------------------------------------------------------------
    insert(con, later)
    t = time.perf_counter()
    new = label_contamination(con, benchmarks=names, data_dir=data_dir)
    duck_s = time.perf_counter() - t
    t = time.perf_counter()
    contamination_python(problems, load_benchmarks(names, data_dir))
    python_s = time.perf_counter() - t
    rows.append((f"rerun with +{new:,} problems: DuckDB (new only)", len(problems), duck_s))
    rows.append(("rerun with +10% problems: plain Python (all)", len(problems), python_s))
    print(f"rerun after 10% more problems: DuckDB {python_s / duck_s:.1f}x the plain Python's")
    con.close()
    return rows


def open_r1_as_written(problems: list[tuple[str, str]], benchmarks) -> set[str]:
    """open-r1's scripts/decontaminate.py, in one process: for each benchmark, a dict of its n-grams of the
    lowercased, whitespace-split prompts, then a pass over the problems, each turned into the set of its own
    n-grams and checked. (Its words are whitespace-separated, so "eggs." and "eggs" differ: it finds fewer.)"""
    def grams(text: str, n: int = 8) -> set[str]:
        words = " ".join(text.lower().strip().split()).split()
        return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}

    flagged = set()
    for bench in benchmarks:
        lookup = {}
        for index, p in enumerate(bench.problems):
            for gram in grams(p["prompt"] or ""):
                lookup.setdefault(gram, set()).add(index)
        flagged.update(pid for pid, prompt in problems if any(g in lookup for g in grams(prompt or "")))
    return flagged


def insert(con, problems: list[tuple[str, str]]) -> None:
    con.register("_new", pa.table({"problem_id": [p[0] for p in problems], "prompt": [p[1] for p in problems]}))
    con.execute("INSERT INTO problems SELECT * FROM _new")
    con.unregister("_new")


def duplicates(problems: list[tuple[str, str]], planted: Path, db: Path) -> list:
    """label_duplicates on all problems; how many planted exact / near duplicates it finds."""
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE problems (problem_id VARCHAR PRIMARY KEY, prompt VARCHAR)")
    insert(con, problems)
    t = time.perf_counter()
    label_duplicates(con)
    wall = time.perf_counter() - t
    rep = dict(con.execute("SELECT problem_id, coalesce(near_of, exact_of, problem_id) FROM dup_problems").fetchall())
    plants = json.loads(planted.read_text()) if planted.is_file() else {}
    for kind in ("exact_dup", "near_dup"):
        pairs = plants.get(kind, [])
        together = sum(1 for target, source in pairs if rep[target] == rep[source])
        print(f"planted {kind}: {together:,} of {len(pairs):,} pairs in one cluster")
    print("labeled: " + ", ".join(f"{n:,} {what}" for what, n in con.execute("""SELECT 'exact_of', count(exact_of)
        FROM dup_problems UNION ALL SELECT 'near_of only', count(*) FILTER (near_of IS NOT NULL AND exact_of IS NULL)
        FROM dup_problems""").fetchall()))
    con.close()
    return [("duplicates (MinHash/LSH + exact hash)", len(problems), wall)]


# ----------------------------------------------------------------------------- (2) the whole filter


def whole_filter(run: Path, names: list[str], data_dir: str | None, tmp: Path) -> list:
    config = run / "filter.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(run), "contamination_benchmarks": names,
                                      "benchmarks_dir": data_dir}, sort_keys=False))
    traces = duckdb.sql(f"SELECT count(*) FROM '{run}/traces/*.parquet'").fetchall()[0][0]
    rows = []
    for label in ("whole filter, fresh database", "whole filter, rerun (nothing new)"):
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "filter", "--config", str(config)]
        print("$", " ".join(cmd[2:]), flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
        sys.stderr.write(proc.stderr[-4000:])
        if proc.returncode:
            print(f"python -m filter failed with exit code {proc.returncode}", file=sys.stderr)
            return rows
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
        rows.append((label, traces, wall, peak_kb / 2**20))
    db = run / "curation.duckdb"
    print(f"database {db}: {db.stat().st_size / 2**20:,.0f} MiB")
    return rows


def print_table(rows: list) -> None:
    print(f"\n{'what':<48} {'rows':>9} {'wall s':>8} {'rows/s':>10} {'peak GiB':>9}")
    for what, n, wall, *peak in rows:
        memory = f"{peak[0]:.2f}" if peak else ""
        print(f"{what:<48} {n:>9,} {wall:>8.2f} {n / wall:>10,.0f} {memory:>9}")

if __name__ == "__main__":
    raise SystemExit(main())
