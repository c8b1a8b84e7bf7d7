"""Crash-safe, append-only trace shards.

Finished shards are immutable Parquet files `part-<i>of<N>-<seq>.parquet` (traces/ and, with logprobs,
logprobs/ under the same name). The open shard is a journal: every finished request is appended to an
Arrow IPC stream and flushed at once, so `kill -9` at any moment loses only the requests in flight. On
start the journal is recovered (a torn last batch is dropped) and rolled into a Parquet part. A shard's
Parquet files are written under a temp name and renamed, logprobs before traces, so a trace part on disk
means its logprobs are there too. A journal that cannot be read to its end (a torn last batch, or not a
journal at all) gives up the rows it holds whole; the file is set aside as `<journal>.corrupt`, never deleted,
and a warning names it.
"""

import fcntl
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.config import ConfigError, InputError
from tracegen.records import LOGPROB_SCHEMA, PROBLEM_SCHEMA, TRACE_SCHEMA, problem_row

log = logging.getLogger(__name__)


class ShardWriter:
    def __init__(self, run_dir: Path, shard: tuple[int, int], rows_per_part: int, logprobs: bool):
        self.traces_dir = run_dir / "traces"
        self.logprobs_dir = run_dir / "logprobs" if logprobs else None
        self.prefix = f"part-{shard[0]}of{shard[1]}-"
        self.rows_per_part = rows_per_part
        for d in (self.traces_dir, self.logprobs_dir):
            if d:
                d.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.traces_dir / f".lock-{shard[0]}of{shard[1]}")
        self.recovered = self._recover()
        self._seq = _next_seq(self.traces_dir, self.prefix)
        self._open_journal()

    # --- writing ---------------------------------------------------------------------------------------
    def append(self, traces: list[dict], logprobs: list[dict]) -> None:
        """Journal one request's rows (flushed before returning); roll the shard when it is full."""
        if self._logprob_journal is not None and logprobs:
            self._logprob_journal.write(pa.RecordBatch.from_pylist(logprobs, schema=LOGPROB_SCHEMA))
            self._logprob_file.flush()
        self._trace_journal.write(pa.RecordBatch.from_pylist(traces, schema=TRACE_SCHEMA))
        self._trace_file.flush()
        self._rows += len(traces)
        if self._rows >= self.rows_per_part:
            self._roll()

    def close(self) -> None:
        """Turn the open journal into a finished part (if it has rows) and release the shard lock."""
        self._roll(reopen=False)
        self._lock.close()

    def _roll(self, reopen: bool = True) -> None:
        for f in (self._trace_file, self._logprob_file):
            if f:
                f.close()
        if self._rows:
            self._finish_part(self._seq)
            self._seq += 1
        else:
            self._journal_path(self.traces_dir, self._seq).unlink(missing_ok=True)
            if self.logprobs_dir:
                self._journal_path(self.logprobs_dir, self._seq).unlink(missing_ok=True)
        if reopen:
            self._open_journal()

    def _open_journal(self) -> None:
        self._rows = 0
        self._trace_file, self._trace_journal = _open_stream(self._journal_path(self.traces_dir, self._seq),
                                                             TRACE_SCHEMA)
        self._logprob_file = self._logprob_journal = None
        if self.logprobs_dir:
            self._logprob_file, self._logprob_journal = _open_stream(
                self._journal_path(self.logprobs_dir, self._seq), LOGPROB_SCHEMA)

    def _journal_path(self, directory: Path, seq: int) -> Path:
        return directory / f".{self.prefix}{seq:06d}.journal.arrow"

    def _part_path(self, directory: Path, seq: int) -> Path:
        return directory / f"{self.prefix}{seq:06d}.parquet"

    # --- recovery --------------------------------------------------------------------------------------
    def _finish_part(self, seq: int) -> int:
        """Journal(s) of `seq` -> Parquet part(s). Returns the number of trace rows kept."""
        traces = _recovered(self._journal_path(self.traces_dir, seq), TRACE_SCHEMA)
        if self.logprobs_dir:
            logprobs = _recovered(self._journal_path(self.logprobs_dir, seq), LOGPROB_SCHEMA)
            # A logprob row whose trace row did not reach the journal belongs to a lost request.
            keep = pc.is_in(logprobs["trace_id"], value_set=traces["trace_id"])
            if traces.num_rows:
                _write_parquet(logprobs.filter(keep), self._part_path(self.logprobs_dir, seq))
        if traces.num_rows:
            _write_parquet(traces, self._part_path(self.traces_dir, seq))
        for d in (self.traces_dir, self.logprobs_dir):
            if d:
                self._journal_path(d, seq).unlink(missing_ok=True)
        return traces.num_rows

    def _recover(self) -> int:
        rows = 0
        for journal in sorted(self.traces_dir.glob(f".{self.prefix}*.journal.arrow")):
            seq = int(journal.name[len(self.prefix) + 1:].split(".")[0])
            if self._part_path(self.traces_dir, seq).exists():  # finished before the crash; journal is stale
                for d in (self.traces_dir, self.logprobs_dir):
                    if d:
                        self._journal_path(d, seq).unlink(missing_ok=True)
                continue
            rows += self._finish_part(seq)
        if rows:
            log.info("recovered %d traces from an interrupted run's journal", rows)
        return rows


def _lock(path: Path):
    f = path.open("w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"output_dir: another tracegen process is writing this shard of {path.parent.parent} "
                          f"(it holds {path})") from None
    return f


def _open_stream(path: Path, schema: pa.Schema):
    f = path.open("wb")
    return f, pa.ipc.new_stream(f, schema)


def read_journal(path: Path, schema: pa.Schema) -> tuple[pa.Table, str | None]:
    """(every complete batch of a journal, what ended the read early or None). Reads only: a live journal
    can be read while its writer appends."""
    batches, problem = [], None
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            try:
                reader = pa.ipc.open_stream(f)
                if not reader.schema.equals(schema):
                    raise pa.ArrowInvalid(f"its columns are not those of {path.parent.name}: {reader.schema.names}")
                for batch in reader:
                    batches.append(batch)
            except (pa.ArrowInvalid, OSError, EOFError) as e:
                problem = " ".join(str(e).split())
    return pa.Table.from_batches(batches, schema=schema), problem


def _recovered(path: Path, schema: pa.Schema) -> pa.Table:
    """A journal's complete rows; one that cannot be read to its end is set aside (never deleted) with a warning."""
    table, problem = read_journal(path, schema)
    if problem:
        aside = _set_aside(path)
        lost = ("the requests it held beyond them are generated again" if schema is TRACE_SCHEMA else
                "traces whose logprobs it held beyond them keep none")
        log.warning("%s: unreadable after %d complete rows (%s); set aside as %s (%s)", path, table.num_rows,
                    problem[:200], aside.name, lost)
    return table


def _set_aside(path: Path) -> Path:
    aside = path.with_name(path.name + ".corrupt")
    for i in range(1, 1000):
        if not aside.exists():
            break
        aside = path.with_name(f"{path.name}.corrupt{i}")
    path.rename(aside)
    return aside


def _write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def _next_seq(directory: Path, prefix: str) -> int:
    seqs = [int(p.name[len(prefix):].split(".")[0]) for p in directory.glob(f"{prefix}*.parquet")]
    return max(seqs, default=-1) + 1


def write_problems(run_dir: Path, problems: list[dict], source: str, shard: tuple[int, int]) -> Path:
    """`problems/<source>.<i>of<N>.parquet`: the problems this shard works on (replaced when the set changes,
    e.g. a larger `limit`, or when the file is damaged). Readers take the union over files; an id has one
    content across them."""
    path = run_dir / "problems" / f"{source}.{shard[0]}of{shard[1]}.parquet"
    table = pa.Table.from_pylist([problem_row(p) for p in problems], schema=PROBLEM_SCHEMA)
    if path.exists():
        try:
            if pq.read_table(path, schema=PROBLEM_SCHEMA).equals(table):
                return path
        except (pa.ArrowException, OSError) as e:  # this run has the problems it holds: write it again
            log.warning("%s: unreadable (%s); written again from the problem source", path, " ".join(str(e).split()))
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_parquet(table, path)
    return path


def check_parts(run_dir: Path) -> None:
    """Every finished trace and logprob part of a local run has an intact Parquet footer: a part cut short
    (a partial copy, a full disk outside tracegen) is named before anything reads or adds to the run."""
    for sub, hint in (("traces", "its traces are generated again"),
                      ("logprobs", "move traces/{name} too: both are generated again")):
        for part in sorted((run_dir / sub).glob("part-*.parquet")):
            try:
                pq.read_metadata(part)
            except (pa.ArrowException, OSError) as e:
                raise InputError(f"{part}: not a readable Parquet part ({' '.join(str(e).split())}); move it out of "
                                 f"{run_dir} and rerun tracegen ({hint.format(name=part.name)})") from None


def read_traces(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """All finished trace rows of a run (every shard), including the error rows of failed requests."""
    files = sorted((run_dir / "traces").glob("part-*.parquet"))
    if not files:
        return TRACE_SCHEMA.empty_table().select(columns) if columns else TRACE_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(f, columns=columns, schema=TRACE_SCHEMA) for f in files)


def done_trace_ids(run_dir: Path) -> set[str]:
    """trace_ids that finished without error: a rerun skips these and retries everything else."""
    table = read_traces(run_dir, ["trace_id", "error"])
    ok = table.filter(pc.is_null(table["error"]))
    return set(ok["trace_id"].to_pylist())
