"""The curation database: its views over the run's Parquet parts, the problems table, and atomic updates.

A filter run never edits `curation.duckdb` in place: it copies it to `curation.duckdb.tmp`, does all its
work there, checkpoints, and renames the copy over the original. Whatever interrupts a run (an error,
Ctrl-C, kill -9, a full disk), the database is the previous run's or this run's, never a mix; queries that
run meanwhile read the previous state. A lock file keeps two filter runs off one database.

Views (recreated every run, so they follow the run directory as it grows):
    traces     every trace part (union_by_name), one row per trace_id: the row without error when there
               is one (a failed request and its successful retry share the trace_id), else the error row
    logprobs   the teacher logprob parts, plus `file` (the part holding the row); empty when there are none
Run directories on object storage (s3://, gs://) are read through DuckDB's httpfs extension.
"""

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from filter.config import ConfigError, FilterConfig, is_url

log = logging.getLogger(__name__)

# Scripts with a name RE2 knows (\p{Name}): the first word of a letter's Unicode name -> that name.
SCRIPTS = {"CJK": "Han", **{w: w.title() for w in (
    "CYRILLIC", "ARABIC", "HEBREW", "HIRAGANA", "KATAKANA", "HANGUL", "DEVANAGARI", "THAI", "ARMENIAN",
    "GEORGIAN", "BENGALI", "TAMIL", "TELUGU", "GUJARATI", "KANNADA", "MALAYALAM", "ETHIOPIC", "KHMER", "LAO",
    "TIBETAN", "MYANMAR", "SINHALA", "GURMUKHI", "ORIYA", "MONGOLIAN")}}
PROBLEM_COLUMNS = pa.schema([
    ("problem_id", pa.string()), ("domain", pa.string()), ("prompt", pa.string()), ("answer", pa.string()),
    ("tests", pa.string()), ("source", pa.string()), ("difficulty", pa.int32()), ("meta", pa.string()),
    ("scripts", pa.string()),
])


class FilterError(RuntimeError):
    """An input of the filter is wrong or missing; the message names the file or setting."""


# ----------------------------------------------------------------------------- atomic updates


@contextlib.contextmanager
def updating(db_path: str):
    """A connection to a working copy of the database that replaces it only if the block finishes."""
    db = Path(db_path)
    db.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(db.with_name(f".{db.name}.lock"))
    tmp = db.with_name(db.name + ".tmp")
    try:
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):  # a killed run's copy
            leftover.unlink(missing_ok=True)
        if db.exists():
            shutil.copyfile(db, tmp)
        con = duckdb.connect(str(tmp))
        try:
            yield con
            con.execute("CHECKPOINT")
        finally:
            con.close()
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.replace(db)
    finally:
        tmp.unlink(missing_ok=True)
        lock.close()


def _lock(path: Path):
    f = path.open("w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise FilterError(f"{path}: another filter run is updating this database (it holds this lock)") from None
    return f


def open_readonly(run_or_db: str) -> duckdb.DuckDBPyConnection:
    """The database of a run directory (or a .duckdb file), read-only, for queries."""
    path = Path(run_or_db)
    db = path if path.suffix == ".duckdb" else path / "curation.duckdb"
    if not path.exists():
        raise FilterError(f"{path}: no such run directory")
    if not db.is_file():
        raise FilterError(f"{db}: no curation database (run `python -m filter --config ...` first)")
    con = duckdb.connect(str(db), read_only=True)
    _maybe_httpfs(con, con.execute("SELECT string_agg(sql, ' ') FROM duckdb_views() WHERE NOT internal").fetchall()[0][0])
    return con


def _maybe_httpfs(con, location: str | None) -> None:
    if location and re.search(r"\b(s3|gs|gcs|r2|https?)://", location):
        con.execute("INSTALL httpfs; LOAD httpfs;")  # credentials: DuckDB's CREATE SECRET or the env


# ----------------------------------------------------------------------------- views


def create_views(con, run_dir: str) -> None:
    """`traces` and `logprobs` over the run's parts (see the module docstring)."""
    _maybe_httpfs(con, run_dir)
    root = run_dir if is_url(run_dir) else str(Path(run_dir).resolve())
    traces = f"{root}/traces/part-*.parquet"
    if not _has_files(con, traces):
        raise FilterError(f"{root}/traces/: no trace parts (part-*.parquet); run tracegen first")
    con.execute(f"""
        CREATE OR REPLACE VIEW traces AS
        SELECT * EXCLUDE (filename) FROM read_parquet({_sql_str(traces)}, union_by_name = true, filename = true)
        QUALIFY row_number() OVER (PARTITION BY trace_id ORDER BY error IS NULL DESC, created_at DESC,
                                   filename DESC) = 1""")
    logprobs = f"{root}/logprobs/part-*.parquet"
    if _has_files(con, logprobs):
        con.execute(f"""
            CREATE OR REPLACE VIEW logprobs AS
            SELECT * EXCLUDE (filename), filename AS file
            FROM read_parquet({_sql_str(logprobs)}, union_by_name = true, filename = true)""")
    else:
        con.execute("""
            CREATE OR REPLACE VIEW logprobs AS
            SELECT NULL::VARCHAR AS trace_id, NULL::INTEGER[] AS token_ids, NULL::FLOAT[] AS logprobs,
                   NULL::INTEGER[][] AS top_ids, NULL::FLOAT[][] AS top_logprobs, NULL::VARCHAR AS file
            WHERE false""")


def _has_files(con, pattern: str) -> bool:
    return con.execute("SELECT count(*) FROM glob(?)", [pattern]).fetchall()[0][0] > 0


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def run_sql_files(con, paths: list[str]) -> list[str]:
    """Run the recipe's view files (folders: their *.sql in name order); an error names the file."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.sql")) if path.is_dir() else [path]
    for file in files:
        try:
            con.execute(file.read_text(encoding="utf-8"))
        except duckdb.Error as e:
            raise FilterError(f"{file}: {e}") from None
    return [str(f) for f in files]


# ----------------------------------------------------------------------------- problems


def update_problems(con, cfg: FilterConfig) -> int:
    """Add the problems that have traces and are not in the `problems` table yet; returns how many."""
    con.execute("""CREATE TABLE IF NOT EXISTS problems (problem_id VARCHAR PRIMARY KEY, domain VARCHAR,
        prompt VARCHAR, answer VARCHAR, tests VARCHAR, source VARCHAR, difficulty INTEGER, meta JSON,
        scripts VARCHAR)""")
    wanted = {row[0] for row in con.execute(
        "SELECT DISTINCT problem_id FROM traces WHERE problem_id NOT IN (SELECT problem_id FROM problems)").fetchall()}
    if not wanted:
        return 0
    from tracegen.problems import ProblemError, load_problems

    kept = None if cfg.problems or is_url(cfg.run_dir) else run_problems(Path(cfg.run_dir))
    source = SimpleNamespace(problems=f"{cfg.run_dir}/problems") if kept is not None else problem_source(cfg)
    try:
        rows = [_problem_row(p) for p in (kept if kept is not None else load_problems(source)) if p["id"] in wanted]
    except ProblemError as e:
        raise FilterError(str(e)) from None
    con.register("new_problems", pa.Table.from_pylist(rows, schema=PROBLEM_COLUMNS))
    con.execute("INSERT INTO problems SELECT * FROM new_problems")
    con.unregister("new_problems")
    missing = len(wanted) - len(rows)
    if missing:
        log.warning("%d problem ids of the traces are not in %s: their traces get verdict 'error'", missing,
                    source.problems)
    return len(rows)


def run_problems(run_dir: Path) -> list[dict] | None:
    """The problems tracegen kept in <run_dir>/problems/*.parquet (None for runs made before it kept them)."""
    files = sorted(run_dir.glob("problems/*.parquet"))
    if not files:
        return None
    problems = {}
    for file in files:
        for row in pq.read_table(file).to_pylist():
            p = {**row, "tests": _json(row["tests"]), "meta": _json(row["meta"])}
            if problems.setdefault(p["id"], p) != p:
                raise FilterError(f"{file}: problem {p['id']!r} differs from the one with that id in another file of "
                                  f"{run_dir}/problems (give each source an id_prefix in tracegen)")
    return list(problems.values())


def _json(text: str | None):
    return None if text is None else json.loads(text)


def problem_source(cfg: FilterConfig) -> SimpleNamespace:
    """Where the problems come from: the filter config's `problems`, else tracegen's own settings."""
    if cfg.problems:
        return SimpleNamespace(problems=cfg.problems, problems_split=cfg.problems_split or "train",
                               problems_config=cfg.problems_config, problems_revision=cfg.problems_revision,
                               column_map=cfg.column_map, problem_defaults=cfg.problem_defaults)
    found = sorted(Path(cfg.run_dir).glob("tracegen.config*.yaml")) if not is_url(cfg.run_dir) else []
    if not found:
        raise ConfigError(f"problems: not set, and {cfg.run_dir}/tracegen.config.yaml (written by tracegen) is "
                          "not there to say where the problems are")
    tg = yaml.safe_load(found[0].read_text())
    return SimpleNamespace(problems=tg["problems"], problems_split=cfg.problems_split or tg.get("problems_split"),
                           problems_config=cfg.problems_config or tg.get("problems_config"),
                           problems_revision=cfg.problems_revision or tg.get("problems_revision"),
                           column_map=cfg.column_map or tg.get("column_map"),
                           problem_defaults=cfg.problem_defaults or tg.get("problem_defaults"))


def _problem_row(p: dict) -> dict:
    meta = p.get("meta") if isinstance(p.get("meta"), dict) else {}
    difficulty = meta.get("difficulty")
    return {"problem_id": p["id"], "domain": p["domain"], "prompt": p["prompt"], "answer": p.get("answer"),
            "tests": None if p.get("tests") is None else json.dumps(p["tests"]), "source": p.get("source"),
            "difficulty": difficulty if isinstance(difficulty, int) and not isinstance(difficulty, bool) else None,
            "meta": json.dumps(meta), "scripts": prompt_scripts(p["prompt"])}


def prompt_scripts(text: str) -> str:
    """RE2 class body of the scripts other than Latin/Greek/Common in `text`, e.g. '\\p{Han}\\p{Hiragana}'."""
    names = set()
    for ch in re.sub(r"[\x00-\x7f]+", "", text):  # ASCII is Latin or Common: skip it fast
        if ch.isalpha():
            script = SCRIPTS.get(unicodedata.name(ch, "").split(" ")[0])
            if script:
                names.add(script)
    return "".join(f"\\p{{{name}}}" for name in sorted(names))
