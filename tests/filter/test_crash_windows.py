"""A filter run killed (SIGKILL) at each step of its switch to the new state: readers never see a missing or
half-written curated set or database, and the next start finishes a committed switch or drops an uncommitted one.

The kill is real: the run goes on in a forked child that sends itself SIGKILL when it reaches the step, so no
`finally` and no cleanup of its own runs.
"""

import os
import shutil
import signal
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

import filter.export
import filter.store
from filter.main import main
from filter.store import recover
from tests.filter.runs import KEPT, filter_argv, make_run

NEW = {"good1", "proof", "code_ok"}  # max_per_problem: 1 keeps the shortest of good1/good2

# (module, function, kill before or after it runs, what readers see after the kill, the state after the next start)
STEPS = {
    "export-written": (filter.export, "write_files", "after", ("old", "old"), "old"),
    "before-record": (filter.store, "_write_record", "before", ("old", "old"), "old"),
    "record-written": (filter.store, "_replace_db", "before", ("old", "old"), "new"),
    "db-switched": (filter.store, "_point", "before", ("new", "old"), "new"),
    "curated-switched": (filter.store, "_drop_old", "before", ("new", "new"), "new"),
    "old-dropped": (filter.store, "_drop_record", "before", ("new", "new"), "new"),
}


def killed_at(module, name: str, when: str, argv: list[str]) -> None:
    """Run filter's main in a forked child that SIGKILLs itself before/after `module.name` runs."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            original = getattr(module, name)

            def dying(*args, **kwargs):
                if when == "after":
                    original(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)

            setattr(module, name, dying)
            main(argv)
        finally:
            os._exit(3)  # reached only when the step never came
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the child ended with {status}"


def seen(run: Path) -> tuple[str, str]:
    """What a reader finds now: ("old" | "new") for the database's selection and for the curated files."""
    with duckdb.connect(str(run / "curation.duckdb"), read_only=True) as con:
        in_db = {r[0] for r in con.sql("SELECT trace_id FROM selected").fetchall()}
    curated = run / "curated"
    assert (curated / "card.md").is_file() and (curated / "funnel.json").is_file()  # a whole export
    exported = set(pq.read_table(sorted(curated.glob("*.parquet"))[0])["trace_id"].to_pylist())
    name = {frozenset(KEPT): "old", frozenset(NEW): "new"}
    return name[frozenset(in_db)], name[frozenset(exported)]


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("crash"))
    assert main(filter_argv(run)) == 0
    return run


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_each_step_of_the_switch(tmp_path, old_run, step):
    run = tmp_path / "run"
    shutil.copytree(old_run, run, symlinks=True)
    module, name, when, right_after, after_restart = STEPS[step]
    killed_at(module, name, when, filter_argv(run, max_per_problem=1))
    assert seen(run) == right_after
    recover(run / "curation.duckdb", run / "curated")  # what the next filter start does first
    assert seen(run) == (after_restart, after_restart)
    leftovers = sorted(p.name for p in run.iterdir() if p.name.startswith(".") or p.suffix in (".tmp", ".old"))
    assert leftovers == sorted([".curation.duckdb.lock", os.readlink(run / "curated")])  # the lock and one export


def test_an_export_folder_of_an_older_filter_becomes_a_link(tmp_path, old_run):
    run = tmp_path / "run"
    shutil.copytree(old_run, run, symlinks=True)
    target = run / os.readlink(run / "curated")
    (run / "curated").unlink()
    target.rename(run / "curated")  # the layout before links: a plain folder
    assert seen(run) == ("old", "old")
    assert main(filter_argv(run, max_per_problem=1)) == 0
    assert (run / "curated").is_symlink() and seen(run) == ("new", "new")
    assert [p.name for p in run.glob(".curated-*")] == [os.readlink(run / "curated")]
