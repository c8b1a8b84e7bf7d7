"""Traces of several teachers in one run directory, curated together: `model` and each teacher's own pass rate per
problem in the views, filter/README.md's teachers query, and the export and card per teacher."""

import datasets
import duckdb

from filter.main import main
from tests.filter.runs import GOOD_M1, GOOD_M2, filter_argv, make_run, trace_row, write_part

WRONG_M1 = ("3+9=13.", "The answer is \\boxed{13}.")
WRONG_M2 = ("10-3=6 pears.", "The answer is \\boxed{6}.")
# teacher-a solves m1 twice and m2 once in two; teacher-b fails m1 twice and solves m2 twice
TEACHERS = {
    "teacher-a": {"a1": ("m1", 0, *GOOD_M1), "a2": ("m1", 1, *GOOD_M1), "a3": ("m2", 0, *GOOD_M2),
                  "a4": ("m2", 1, *WRONG_M2)},
    "teacher-b": {"b1": ("m1", 0, *WRONG_M1), "b2": ("m1", 1, *WRONG_M1), "b3": ("m2", 0, *GOOD_M2),
                  "b4": ("m2", 1, *GOOD_M2)},
}
# filter/README.md's example (Curating with SQL), verbatim
PASS_RATES_BY_TEACHER = """
PIVOT (SELECT problem_id, model, any_value(model_pass_rate) AS pass_rate FROM signals GROUP BY ALL)
ON model USING any_value(pass_rate) ORDER BY problem_id"""


def test_several_teachers_are_curated_together_and_compared(tmp_path):
    run = None
    for i, (model, traces) in enumerate(TEACHERS.items()):
        rows = [trace_row(tid, problem, sample, reasoning, content, "stop", None) | {"model": model}
                for tid, (problem, sample, reasoning, content) in traces.items()]
        if run is None:
            run = make_run(tmp_path, traces={})
        write_part(run, f"part-0of1-00000{i}", rows)
    assert main(filter_argv(run)) == 0
    with duckdb.connect(str(run / "curation.duckdb"), read_only=True) as con:
        rates = dict(con.execute("SELECT trace_id, (model, model_pass_rate, pass_rate) FROM signals").fetchall())
        assert rates["a1"] == ("teacher-a", 1.0, 0.5) and rates["a4"] == ("teacher-a", 0.5, 0.75)
        assert rates["b1"] == ("teacher-b", 0.0, 0.5) and rates["b3"] == ("teacher-b", 1.0, 0.75)
        assert con.execute(PASS_RATES_BY_TEACHER).fetchall() == [("m1", 1.0, 0.0), ("m2", 0.5, 1.0)]
        assert [d[0] for d in con.execute(PASS_RATES_BY_TEACHER).description] == ["problem_id", "teacher-a",
                                                                                   "teacher-b"]
        kept = dict(con.execute("SELECT trace_id, model FROM curated").fetchall())
    assert kept == {"a1": "teacher-a", "a2": "teacher-a", "a3": "teacher-a", "b3": "teacher-b", "b4": "teacher-b"}
    exported = datasets.load_dataset("parquet", data_files=str(run / "curated" / "*.parquet"), split="train")
    assert dict(zip(exported["trace_id"], exported["teacher_model"], strict=True)) == kept
    assert "- traces per teacher: teacher-a 3, teacher-b 2" in (run / "curated" / "card.md").read_text()
