"""`python -m filter query`: a readable table, --out, DuckDB's own error for a wrong query, named paths."""

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from filter.main import main
from filter.query import main as query
from tests.filter.runs import KEPT, filter_argv, make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("query"))
    assert main(filter_argv(run)) == 0
    return run


def test_query_cli_prints_a_table_and_duckdbs_error(run):
    ok = subprocess.run([sys.executable, "-m", "filter", "query", str(run),
                         "SELECT reason, count(*) AS n FROM rejections GROUP BY reason ORDER BY reason"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "unverified" in ok.stdout and "│ n " in ok.stdout.replace("┃", "│") and "9 rows" in ok.stdout  # reasons that rejected something
    bad = subprocess.run([sys.executable, "-m", "filter", "query", str(run), "SELECT nope FROM curated"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert 'Binder Error: Referenced column "nope" not found' in bad.stderr and "Traceback" not in bad.stderr


def test_query_writes_parquet(run, tmp_path, capsys):
    out = tmp_path / "kept.parquet"
    assert query([str(run), "SELECT trace_id, messages FROM curated", "--out", str(out)]) == 0
    assert set(pq.read_table(out)["trace_id"].to_pylist()) == KEPT
    assert query([str(run / "curation.duckdb"), "SELECT count(*) AS n FROM traces", "--max_rows", "1"]) == 0
    assert "15" in capsys.readouterr().out


def test_query_names_a_missing_run_or_database(tmp_path, capsys):
    assert query([str(tmp_path / "nope"), "SELECT 1"]) == 2
    assert f"{tmp_path / 'nope'}: no such run directory" in capsys.readouterr().err
    assert query([str(tmp_path), "SELECT 1"]) == 2
    assert f"{tmp_path / 'curation.duckdb'}: no curation database" in capsys.readouterr().err


def test_query_is_read_only(run, capsys):
    assert query([str(run), "DROP TABLE verified"]) == 2
    assert "read-only" in capsys.readouterr().err
