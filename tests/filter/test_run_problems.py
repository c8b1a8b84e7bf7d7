"""filter reads the problems tracegen kept in <run>/problems/ (so a run directory is self-contained) or, when set,
the `problems` source; it refuses two sources that give one id different problems, and a run without either."""

import shutil

import duckdb

from filter.main import main
from tests.filter.runs import PROBLEMS, filter_argv, make_run
from tracegen.records import source_key
from tracegen.store import write_problems


def verdicts(run):
    with duckdb.connect(str(run / "curation.duckdb"), read_only=True) as con:
        return dict(con.sql("SELECT trace_id, verdict FROM verified").fetchall())


def test_problems_come_from_the_run_directory_or_the_source(tmp_path, caplog):
    run = make_run(tmp_path / "one")
    expected = (main(filter_argv(run)), verdicts(run))
    assert expected[0] == 0
    split = make_run(tmp_path / "two")  # two sources in one run, as tracegen keeps them
    shutil.rmtree(split / "problems")
    write_problems(split, PROBLEMS[:2], source_key({"problems": "a"}), (0, 1))
    write_problems(split, PROBLEMS[2:], source_key({"problems": "b"}), (0, 1))
    assert (main(filter_argv(split)), verdicts(split)) == expected
    source = make_run(tmp_path / "source")
    shutil.rmtree(source / "problems")
    assert main(filter_argv(source)) == 2
    assert "problems: not set, and" in caplog.text and "problems/ has no problem files" in caplog.text
    assert main(filter_argv(source, problems=str(tmp_path / "source" / "problems.jsonl"))) == 0
    assert verdicts(source) == expected[1]


def test_one_id_with_two_contents_is_refused(tmp_path, caplog):
    run = make_run(tmp_path)
    write_problems(run, PROBLEMS, source_key({"problems": "a"}), (0, 1))
    changed = [dict(PROBLEMS[0], answer="another")]
    write_problems(run, changed, source_key({"problems": "b"}), (0, 1))
    assert main(filter_argv(run)) == 2
    assert f"problem {PROBLEMS[0]['id']!r} differs" in caplog.text and "id_prefix" in caplog.text
