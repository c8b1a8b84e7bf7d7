"""Bad input to python -m filter ends in one line naming the file or setting (exit 2), and the database and the
curated set stay as they were: parts cut short, and the contamination benchmarks given on the command line."""

import logging
import shutil

import pytest
import yaml

from filter.main import main
from tests.filter.runs import filter_argv, make_run


def state(run):
    """What a failed run must not touch: the database's bytes and the curated files."""
    curated = run / "curated"
    return (run / "curation.duckdb").read_bytes(), {p.name: p.read_bytes() for p in sorted(curated.iterdir())}


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("filtered"))
    assert main(filter_argv(run)) == 0
    return run


@pytest.mark.parametrize("sub", ["traces", "logprobs", "problems"])
def test_a_part_cut_short_is_named_and_nothing_changes(tmp_path, caplog, filtered, sub):
    run = shutil.copytree(filtered, tmp_path / "run", symlinks=True)
    before = state(run)
    part = sorted((run / sub).glob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:-64])  # a partial copy of the run directory
    caplog.clear()
    assert main(filter_argv(run)) == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith(f"{part}: not a readable Parquet") and "rerun tracegen" in line
    assert state(run) == before


def test_contamination_benchmarks_on_the_command_line(tmp_path, caplog, filtered):
    run = shutil.copytree(filtered, tmp_path / "run", symlinks=True)
    off = filter_argv(run, "--contamination_benchmarks", "[]", contamination_benchmarks=None)  # YAML: the default
    assert main(off) == 0  # the check is off: no benchmark is loaded (the seven public ones are not here)
    assert yaml.safe_load((run / "filter.config.yaml").read_text())["contamination_benchmarks"] == []
    assert main(filter_argv(run, "--contamination_benchmarks", "gsm9k")) == 2
    assert "contamination_benchmarks: unknown benchmark 'gsm9k'; known: gsm8k, math500" in caplog.text
    assert main(filter_argv(run, "--contamination_benchmarks", f"mine={tmp_path / 'nope.jsonl'}")) == 2
    assert f"contamination_benchmarks: 'mine={tmp_path / 'nope.jsonl'}': no such file" in caplog.text
