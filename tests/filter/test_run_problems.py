"""filter reads the problems tracegen kept in <run>/problems/ (so a run directory is self-contained), and refuses
two sources that give one id different problems."""

import duckdb

from filter.main import main
from tests.filter.runs import PROBLEMS, filter_argv, make_run
from tracegen.records import source_key
from tracegen.store import write_problems


def verdicts(run):
    with duckdb.connect(str(run / "curation.duckdb"), read_only=True) as con:
        return dict(con.sql("SELECT trace_id, verdict FROM verified").fetchall())


def test_problems_come_from_the_run_directory(tmp_path):
    run = make_run(tmp_path / "config")
    expected = (main(filter_argv(run)), verdicts(run))
    assert expected[0] in (0, 1)
    kept = make_run(tmp_path / "kept")
    (kept / "tracegen.config.yaml").unlink()  # nothing else says where the problems are
    write_problems(kept, PROBLEMS[:2], source_key({"problems": "a"}), (0, 1))
    write_problems(kept, PROBLEMS[2:], source_key({"problems": "b"}), (0, 1))
    assert (main(filter_argv(kept)), verdicts(kept)) == expected


def test_one_id_with_two_contents_is_refused(tmp_path, caplog):
    run = make_run(tmp_path)
    write_problems(run, PROBLEMS, source_key({"problems": "a"}), (0, 1))
    changed = [dict(PROBLEMS[0], answer="another")]
    write_problems(run, changed, source_key({"problems": "b"}), (0, 1))
    assert main(filter_argv(run)) == 2
    assert f"problem {PROBLEMS[0]['id']!r} differs" in caplog.text and "id_prefix" in caplog.text
