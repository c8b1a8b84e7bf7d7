"""The curation database: its views over the run's Parquet parts, the problems table, and atomic updates.

A filter run never edits `curation.duckdb` or the curated folder in place. It works on a copy of the database
(`curation.duckdb.tmp`) and exports into a new folder (`.curated-<stamp>`); at the end it writes a switch
record, renames the copy over the database and points `curated` (a symbolic link) at the new folder.
Readers see each switch whole: the database is the previous run's or this run's, and `curated/` is one
complete export, never missing. A kill between the two switches (they are two renames) leaves the record,
and the next filter start finishes the switch before it reads anything; a run killed before its record
leaves the previous state, and the next start removes its leftovers. A lock keeps two filter runs off one
database.

Views (recreated every run, so they follow the run directory as it grows):
    traces     every trace part (union_by_name), one row per trace_id: the row without error when there
               is one (a failed request and its successful retry share the trace_id), else the error row
    logprobs   the teacher logprob parts, plus `file` (the part holding the row); empty when there are none
Run directories on object storage (s3://, gs://) are read through DuckDB's httpfs extension.
"""

import contextlib
import fcntl
import glob
import json
import logging
import os
import re
import shutil
import time
import unicodedata
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from data.config import ConfigError, InputError
from filter.config import FilterConfig, is_url
from tracegen.problems import load_problems
from tracegen.store import check_parts

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


# ----------------------------------------------------------------------------- atomic updates


@contextlib.contextmanager
def updating(db_path: str, curated: str):
    """(a connection to a working copy of the database, the folder to export the curated set into): both
    replace the current ones only if the block finishes (see the module docstring)."""
    db, out = Path(db_path), Path(curated)
    db.parent.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(db.with_name(f".{db.name}.lock"))
    tmp, staged = db.with_name(db.name + ".tmp"), out.with_name(f".{out.name}-{time.time_ns()}")
    committed = False
    try:
        recover(db, out)
        if db.exists():
            shutil.copyfile(db, tmp)
        con = duckdb.connect(str(tmp))
        try:
            yield con, staged
            con.execute("CHECKPOINT")
        finally:
            con.close()
        switch(db, out, staged if staged.exists() else None)
        committed = True
    finally:
        if not committed and not _record(db).exists():  # an error, Ctrl-C: the previous state stays
            _discard(tmp, staged)
        lock.close()


def switch(db: Path, out: Path, staged: Path | None) -> None:
    """Make the working copy the database and `staged` the curated folder. The record written first is the
    commit: from then on every step is redone by the next start if this process dies."""
    tmp = db.with_name(db.name + ".tmp")
    _fsync(tmp)
    if staged:
        for file in staged.iterdir():
            _fsync(file)
        _fsync(staged)
    record = {"db": str(db), "curated": str(out), "target": staged.name if staged else None}
    _write_record(db, record)
    _finish(record)


def recover(db: Path, out: Path) -> None:
    """Before anything reads: finish a switch that was committed, or drop what an uncommitted run left."""
    if _record(db).exists():
        record = json.loads(_record(db).read_text())
        log.warning("finishing the switch of an interrupted filter run (%s)", _record(db))
        _finish(record)
        return
    legacy_old, legacy_tmp = out.with_name(out.name + ".old"), out.with_name(out.name + ".tmp")
    if not out.exists() and not out.is_symlink() and legacy_old.is_dir():  # killed inside an older filter's swap
        legacy_old.rename(out)
    _discard(db.with_name(db.name + ".tmp"), _record_tmp(db), legacy_tmp, legacy_old,
             *_generations(out, keep=_target(out)))


def _finish(record: dict) -> None:
    db, out, target = Path(record["db"]), Path(record["curated"]), record["target"]
    _replace_db(db)
    if target:
        _point(out, target)
    _drop_old(out, keep=target or _target(out))
    _drop_record(db)


def _replace_db(db: Path) -> None:
    tmp = db.with_name(db.name + ".tmp")
    if tmp.exists():  # else this step was done before a kill
        tmp.replace(db)
        _fsync(db.parent)


def _point(out: Path, target: str) -> None:
    """`out` -> `target` (a sibling folder) by renaming a new link over the old one: readers see one or the
    other. A real folder (an export made before links) is moved aside first, once."""
    if out.is_symlink() and os.readlink(out) == target:
        return
    if out.exists() and not out.is_symlink():
        out.rename(out.with_name(f".{out.name}-0-before-links"))
    link = out.with_name(f".{out.name}.link")
    link.unlink(missing_ok=True)
    link.symlink_to(target)  # relative: the run directory can be moved or copied whole
    link.replace(out)
    _fsync(out.parent)


def _drop_old(out: Path, keep: str | None) -> None:
    _discard(*_generations(out, keep))


def _drop_record(db: Path) -> None:
    _record(db).unlink(missing_ok=True)


def _write_record(db: Path, record: dict) -> None:
    tmp = _record_tmp(db)
    tmp.write_text(json.dumps(record))
    _fsync(tmp)
    tmp.replace(_record(db))
    _fsync(db.parent)


def _record(db: Path) -> Path:
    return db.with_name(f".{db.name}.switch")


def _record_tmp(db: Path) -> Path:
    return db.with_name(f".{db.name}.switch.tmp")


def _target(out: Path) -> str | None:
    return os.readlink(out) if out.is_symlink() else None


def _generations(out: Path, keep: str | None) -> list[Path]:
    """The export folders next to `out` other than `keep` (the one it points at)."""
    return [p for p in out.parent.glob(f".{glob.escape(out.name)}-*") if p.name != keep]


def _discard(*paths: Path) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".wal").unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(path: Path):
    f = path.open("w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"db: another filter run is updating {path.parent / path.name[1:-5]} (it holds "
                          f"{path})") from None
    return f


@contextlib.contextmanager
def transaction(con):
    """BEGIN ... COMMIT (ROLLBACK on an error), or nothing when the caller already holds a transaction (it
    then decides)."""
    try:
        con.execute("BEGIN TRANSACTION")
    except duckdb.TransactionException:
        yield
        return
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def open_readonly(run_or_db: str) -> duckdb.DuckDBPyConnection:
    """The database of a run directory (or a .duckdb file), read-only, for queries."""
    path = Path(run_or_db)
    db = path if path.suffix == ".duckdb" else path / "curation.duckdb"
    if not path.exists():
        raise InputError(f"{path}: no such run directory")
    if not db.is_file():
        raise InputError(f"{db}: no curation database (run `python -m filter --config ...` first)")
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
        raise InputError(f"{root}/traces/: no trace parts (part-*.parquet); run tracegen first")
    if not is_url(run_dir):
        check_parts(Path(run_dir))  # a part cut short is named here, not as DuckDB's error mid-run
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
            raise InputError(f"{file}: {e}") from None
    return [str(f) for f in files]


# ----------------------------------------------------------------------------- problems


def update_problems(con, cfg: FilterConfig) -> int:
    """Add the problems that have traces and are not in the `problems` table yet; returns how many. They come
    from <run_dir>/problems/ (tracegen keeps the problems it was asked about there), or from `problems`."""
    con.execute("""CREATE TABLE IF NOT EXISTS problems (problem_id VARCHAR PRIMARY KEY, domain VARCHAR,
        prompt VARCHAR, answer VARCHAR, tests VARCHAR, source VARCHAR, difficulty INTEGER, meta JSON,
        scripts VARCHAR)""")
    wanted = {row[0] for row in con.execute(
        "SELECT DISTINCT problem_id FROM traces WHERE problem_id NOT IN (SELECT problem_id FROM problems)").fetchall()}
    if not wanted:
        return 0
    if cfg.problems:
        source, problems = cfg.problems, load_problems(
            cfg.problems, problems_split=cfg.problems_split or "train", problems_config=cfg.problems_config,
            problems_revision=cfg.problems_revision, column_map=cfg.column_map, problem_defaults=cfg.problem_defaults,
            answer_format=cfg.answer_format, id_prefix=cfg.id_prefix)
    elif is_url(cfg.run_dir):
        raise ConfigError("problems: required when run_dir is a URL (the problem source of the traces)")
    else:
        source, problems = f"{cfg.run_dir}/problems", run_problems(Path(cfg.run_dir))
    rows = [_problem_row(p) for p in problems if p["id"] in wanted]
    con.register("new_problems", pa.Table.from_pylist(rows, schema=PROBLEM_COLUMNS))
    con.execute("INSERT INTO problems SELECT * FROM new_problems")
    con.unregister("new_problems")
    missing = len(wanted) - len(rows)
    if missing:
        log.warning("%d problem ids of the traces are not in %s: their traces get verdict 'error'", missing, source)
    return len(rows)


def run_problems(run_dir: Path) -> list[dict]:
    """The problems tracegen kept in <run_dir>/problems/*.parquet."""
    files = sorted(run_dir.glob("problems/*.parquet"))
    if not files:
        raise ConfigError(f"problems: not set, and {run_dir}/problems/ has no problem files (tracegen writes "
                          "them; set problems to the problem source of these traces)")
    problems = {}
    for file in files:
        try:
            rows = pq.read_table(file).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{file}: not a readable Parquet file ({' '.join(str(e).split())}); rerun tracegen "
                             "with its config (it writes the file again) or set problems") from None
        for row in rows:
            p = {**row, "tests": _json(row["tests"]), "meta": _json(row["meta"])}
            if problems.setdefault(p["id"], p) != p:
                raise InputError(f"{file}: problem {p['id']!r} differs from the one with that id in another file of "
                                 f"{run_dir}/problems (give each source an id_prefix in tracegen)")
    return list(problems.values())


def _json(text: str | None):
    return None if text is None else json.loads(text)


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
