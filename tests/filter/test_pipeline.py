"""The filter stage on hand-made runs: the right traces rejected for the right reason, resume, atomic
updates, selection, and the export as the sft stage reads it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import duckdb
import pyarrow.parquet as pq
import pytest
import yaml

from filter.main import main
from tests.filter.runs import (
    FIRST_REASON,
    KEPT,
    TRACES,
    filter_argv,
    logprob_row,
    make_run,
    trace_row,
    write_part,
)

ROOT = Path(__file__).resolve().parents[2]


def _db(run):
    return duckdb.connect(str(run / "curation.duckdb"), read_only=True)


def _rows(run, sql):
    with _db(run) as con:
        return con.execute(sql).fetchall()


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("filter"))
    assert main(filter_argv(run)) == 0
    return run


def test_rules_reject_exactly_the_right_traces_for_the_right_reason(done_run):
    first = dict(_rows(done_run, "SELECT trace_id, first_reason FROM rejected"))
    assert first == FIRST_REASON
    kept = {r[0] for r in _rows(done_run, "SELECT trace_id FROM curated")}
    assert kept == KEPT
    # every reason that applied stays queryable, not only the first one
    reasons = dict(_rows(done_run, "SELECT trace_id, reasons FROM rejected"))
    assert reasons["length"] == ["unfinished", "unclosed_think", "no_answer", "unverified"]
    assert reasons["noanswer"] == ["no_answer", "unverified"]


def test_labels_hold_what_the_rules_read(done_run):
    v = dict(_rows(done_run, "SELECT trace_id, verdict FROM verified"))
    assert v["good1"] == v["code_ok"] == "correct"
    assert v["wrong"] == v["code_bad"] == "wrong"
    assert v["proof"] == "unverifiable" and v["noanswer"] == "no_answer" and v["orphan"] == "error"
    assert "failed" not in v  # a failed request is not graded; its retry will be
    agreement = dict(_rows(done_run, "SELECT trace_id, (agreement, n_samples, pass_rate) FROM agreement"))
    assert agreement["good1"] == (0.8, 5, 0.8)  # m1: 4 of 5 samples answer 12, one 13
    assert agreement["wrong"] == (0.2, 5, 0.8)
    assert agreement["proof"][2] is None  # no gold: no pass rate


def test_funnel_counts_first_and_any_reason(done_run):
    funnel = json.loads((done_run / "curated" / "funnel.json").read_text())
    assert funnel["rows_in"] == len(TRACES) and funnel["kept"] == len(KEPT) == funnel["exported"]
    by_reason = {r["reason"]: (r["first_applicable"], r["any_applicable"]) for r in funnel["rules"]}
    assert by_reason["unverified"] == (3, 5) and by_reason["no_answer"] == (1, 2)
    assert sum(first for first, _ in by_reason.values()) == funnel["rows_in"] - funnel["kept"]
    stored = json.loads(_rows(done_run, "SELECT funnel FROM funnel")[0][0])
    assert stored == funnel
    summary = json.loads((done_run / "filter.summary.json").read_text())
    assert summary["labeled_this_run"]["verified"] == len(TRACES) - 1
    assert (done_run / "filter.config.yaml").is_file()


def test_export_loads_with_datasets_in_the_agreed_format(done_run):
    ds = datasets.load_dataset("parquet", data_files=str(done_run / "curated" / "*.parquet"), split="train")
    assert set(ds["trace_id"]) == KEPT
    row = next(r for r in ds if r["trace_id"] == "good1")
    assert row["messages"][0] == {"role": "user", "content": json.loads(trace_row("good1", *TRACES["good1"])
                                                                         ["messages"])[0]["content"],
                                  "reasoning_content": None}
    reasoning, answer = TRACES["good1"][2:4]
    assert row["messages"][1]["content"] == f"<think>\n{reasoning}\n</think>\n\n{answer}"
    assert row["completion_token_ids"] == logprob_row("good1", -0.1)["token_ids"]
    part = done_run / "curated" / row["logprobs_file"]
    assert part.is_file() and "good1" in pq.read_table(part)["trace_id"].to_pylist()
    no_logprobs = next(r for r in ds if r["trace_id"] == "good2")
    assert no_logprobs["completion_token_ids"] is None and no_logprobs["logprobs_file"] is None
    assert (row["difficulty"], row["verdict"], row["teacher_model"]) == (1, "correct", "teacher-x")
    schema = pq.read_schema(next((done_run / "curated").glob("*.parquet")))
    assert str(schema.field("sample_index").type) == "int32" and str(schema.field("difficulty").type) == "int32"
    assert (done_run / "curated" / "card.md").read_text().count("| rule ") == 11
    assert (done_run / "curated" / "lengths.png").stat().st_size > 1000


def test_rerun_labels_only_new_traces_and_updates_agreement(tmp_path):
    run = make_run(tmp_path)
    assert main(filter_argv(run)) == 0
    # more traces arrive: a new sample of m2, and the successful retry of the failed request (same trace_id)
    write_part(run, "part-0of1-000001", [trace_row("new_m2", "m2", 9, "10-3=7.", "\\boxed{7}", "stop", None),
                                         trace_row("failed", "m2", 0, "10-3=7!", "\\boxed{7}", "stop", None)])
    assert main(filter_argv(run)) == 0
    summary = json.loads((run / "filter.summary.json").read_text())
    assert summary["labeled_this_run"]["verified"] == 2
    assert summary["labeled_this_run"]["form"] == summary["labeled_this_run"]["quality"] == 2
    assert summary["labeled_this_run"]["agreement (problems)"] == 1  # only m2 is recomputed
    assert _rows(run, "SELECT n_samples FROM agreement WHERE trace_id = 'unsure'") == [(7,)]
    kept = {r[0] for r in _rows(run, "SELECT trace_id FROM curated")}
    assert kept == KEPT | {"new_m2", "failed"}  # the retry replaced the error row
    assert main(filter_argv(run)) == 0  # nothing new: nothing graded
    assert json.loads((run / "filter.summary.json").read_text())["labeled_this_run"]["verified"] == 0


def test_two_curations_of_one_run_side_by_side_keep_their_own_records(tmp_path):
    """The quickstart curates a run twice at once (curated, and every trace unfiltered, into another database):
    each writes its config and summary under its database's name, and neither breaks the other's."""
    run = make_run(tmp_path)
    other = ["--db", str(run / "unfiltered.duckdb"), "--output_dir", str(run / "unfiltered")]
    config = filter_argv(run)[1]
    procs = [subprocess.Popen([sys.executable, "-m", "filter", "--config", config, *flags], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for flags in ([], [*other, "--disable_rules", '["unverified", "no_answer"]'])]
    for proc in procs:
        assert proc.wait(300) == 0, proc.stderr.read()[-2000:]
    curated, unfiltered = (json.loads((run / name).read_text())
                           for name in ("filter.summary.json", "unfiltered.filter.summary.json"))
    assert curated["db"] == str(run / "curation.duckdb") and unfiltered["db"] == str(run / "unfiltered.duckdb")
    assert curated["funnel"]["kept"] == len(KEPT) < unfiltered["funnel"]["kept"]
    assert yaml.safe_load((run / "unfiltered.filter.config.yaml").read_text())["output_dir"] == str(run / "unfiltered")
    assert not list(run.glob("*.tmp"))


def test_interrupted_run_leaves_the_previous_database(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    assert main(filter_argv(run)) == 0
    before = _rows(run, "SELECT count(*) FROM verified")
    write_part(run, "part-0of1-000001", [trace_row("new_m2", "m2", 9, "10-3=7.", "\\boxed{7}", "stop", None)])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C after verified got its new row, before the other labels

    monkeypatch.setattr("filter.labels.label_quality", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(filter_argv(run))
    assert _rows(run, "SELECT count(*) FROM verified") == before  # not half-updated
    assert not (run / "curation.duckdb.tmp").exists()
    assert {r[0] for r in _rows(run, "SELECT trace_id FROM curated")} == KEPT
    monkeypatch.undo()
    assert main(filter_argv(run)) == 0  # the next run picks the new trace up
    assert _rows(run, "SELECT verdict FROM verified WHERE trace_id = 'new_m2'") == [("correct",)]


def test_selection_policies(tmp_path):
    words = lambda n: " ".join(f"w{k}" for k in range(n))  # noqa: E731 (no repetition)
    traces = {f"s{p}{i}": (f"m{p}", i, words(10 + 5 * i), f"\\boxed{{{12 if p == 1 else 7}}}", "stop", None)
              for p in (1, 2) for i in range(4)}
    traces |= {"m1_confident": ("m1", 9, words(50), "\\boxed{12}", "stop", None)}
    run = make_run(tmp_path, traces)
    write_part(run, "part-0of1-000001", [], [logprob_row("m1_confident", -0.01), logprob_row("s10", -0.5)])
    shortest = lambda: {r[0] for r in _rows(run, "SELECT trace_id FROM selected")}  # noqa: E731
    assert main(filter_argv(run, max_per_problem=1, min_mean_logprob=None)) == 0
    assert shortest() == {"s10", "s20"}
    assert main(filter_argv(run, max_per_problem=1, select_by="most_confident", min_mean_logprob=None)) == 0
    assert {"m1_confident"} <= shortest() and len(shortest()) == 2
    assert main(filter_argv(run, max_per_difficulty=2, min_mean_logprob=None)) == 0
    levels = _rows(run, "SELECT difficulty, count(*) FROM selected JOIN signals USING (trace_id) GROUP BY 1")
    assert sorted(levels) == [(1, 2), (2, 2)]
    assert main(filter_argv(run, token_budget=60, seed=1, min_mean_logprob=None)) == 0
    total, n = _rows(run, "SELECT sum(completion_tokens), count(*) FROM selected JOIN traces USING (trace_id)")[0]
    assert total <= 60 and n >= 2
    funnel = json.loads((run / "curated" / "funnel.json").read_text())
    assert funnel["selection"][0]["step"].startswith("token_budget") and funnel["exported"] == n
    again = {r[0] for r in _rows(run, "SELECT trace_id FROM selected")}
    assert main(filter_argv(run, token_budget=60, seed=1, min_mean_logprob=None)) == 0
    assert again == {r[0] for r in _rows(run, "SELECT trace_id FROM selected")}  # seeded: the same pick


def test_recipe_rules_views_and_disabled_rules(tmp_path):
    run = make_run(tmp_path)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "200_too_short.sql").write_text("-- Variables: none\nSELECT trace_id FROM short_traces\n")
    (rules / "070_repetitive.sql").write_text("SELECT trace_id FROM signals WHERE false")  # replaces the default
    views = tmp_path / "views"
    views.mkdir()
    (views / "short.sql").write_text("CREATE OR REPLACE VIEW short_traces AS "
                                     "SELECT trace_id FROM signals WHERE completion_tokens < 10;")
    argv = filter_argv(run, rules_dir=[str(rules)], views_dir=[str(views)], disable_rules=["language_mixing"])
    assert main(argv) == 0
    reasons = dict(_rows(run, "SELECT trace_id, reasons FROM rejected"))
    assert "loop" not in reasons  # the replaced rule rejects nothing
    assert "language_mixing" not in reasons.get("mixing", [])  # the disabled rule did not run
    assert reasons["wrong"] == ["unverified", "too_short"]  # 9 completion tokens
    assert "good1" not in reasons  # 16


def test_reasoning_as_a_field(tmp_path):
    run = make_run(tmp_path)
    assert main(filter_argv(run, reasoning_format="field", output_dir=str(tmp_path / "out"))) == 0
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "*.parquet"), split="train")
    turn = next(r for r in ds if r["trace_id"] == "good1")["messages"][-1]
    assert (turn["reasoning_content"], turn["content"]) == TRACES["good1"][2:4]


def test_planted_duplicate_and_contaminated_problems_are_rejected(tmp_path):
    pytest.importorskip("filter.dedup")
    pytest.importorskip("filter.contamination")
    from tests.filter.runs import PROBLEMS

    bench_problem = {"id": "b0", "domain": "math", "prompt": "Tom has 5 red marbles and 8 blue marbles in a big "
                     "green bag on the kitchen table. How many marbles does Tom have?", "answer": "13",
                     "tests": None, "source": "bench", "meta": {}}
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps(bench_problem) + "\n")
    problems = [*PROBLEMS, {**PROBLEMS[0], "id": "m1_copy"}, {**bench_problem, "id": "leak", "source": "web"}]
    traces = {"good1": TRACES["good1"], "copy": ("m1_copy", 0, *TRACES["good1"][2:]),
              "leak": ("leak", 0, "5+8=13.", "\\boxed{13}", "stop", None)}
    run = make_run(tmp_path, traces, problems)
    assert main(filter_argv(run, contamination_benchmarks=[f"bench={bench}"])) == 0
    first = dict(_rows(run, "SELECT trace_id, first_reason FROM rejected"))
    assert first == {"copy": "duplicate", "leak": "contaminated"}
    assert _rows(run, "SELECT contaminated_benchmark FROM signals WHERE trace_id = 'leak'") == [("bench",)]


def test_url_run_dirs_need_local_outputs(tmp_path):
    assert main(["--run_dir", "s3://bucket/runs/x"]) == 2  # db and output_dir must be local paths


def test_missing_run_and_empty_run_are_named(tmp_path, caplog):
    assert main(["--run_dir", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no such directory" in caplog.text
    (tmp_path / "empty").mkdir()
    assert main(["--run_dir", str(tmp_path / "empty")]) == 2
    assert "no trace parts" in caplog.text and str(tmp_path / "empty") in caplog.text


def test_rule_with_a_typo_names_the_file(tmp_path, caplog):
    run = make_run(tmp_path)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "300_typo.sql").write_text("SELEC trace_id FROM signals")
    assert main(filter_argv(run, rules_dir=[str(rules)])) == 2
    assert f"{rules / '300_typo.sql'}: Parser Error" in caplog.text
    assert not (run / "curation.duckdb").exists() and not (run / "curated").exists()  # nothing half-written
    (rules / "300_typo.sql").write_text("SELECT trace_id FROM signals WHERE no_such_column")
    assert main(filter_argv(run, rules_dir=[str(rules)])) == 2
    assert "no_such_column" in caplog.text
    shutil.rmtree(rules)
    rules.mkdir()
    (rules / "typo.sql").write_text("SELECT trace_id FROM signals")
    assert main(filter_argv(run, rules_dir=[str(rules)])) == 2
    assert f"{rules / 'typo.sql'}: a rule file is named <order>_<reason>.sql" in caplog.text


def test_bad_config_names_the_file_and_field(tmp_path, caplog):
    run = make_run(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_text(f"run_dir: {run}\nmax_repetiton: 0.3\n")
    assert main(["--config", str(config)]) == 2
    assert str(config) in caplog.text and "max_repetiton" in caplog.text
    assert main(filter_argv(run, select_by="longest")) == 2
    assert "select_by: 'longest'" in caplog.text
    assert main(filter_argv(run, disable_rules=["nonsense"])) == 2
    assert "disable_rules: no rule has the reason(s) ['nonsense']" in caplog.text
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert f"no such file: {tmp_path / 'missing.yaml'}" in caplog.text
