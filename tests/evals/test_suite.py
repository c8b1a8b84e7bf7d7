"""python -m evals end to end: grade-only on real benchmark data, generation through tracegen against the
fake OpenAI server, the files it writes, and config/input errors (exit 2, the knob or file named)."""

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from evals.config import parse_config
from evals.main import main
from evals.report import SAMPLE_SCHEMA
from evals.sandbox import isolation
from tests.fake_openai import FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT.parent / "shared" / "benchmarks"
RECIPES = sorted((ROOT / "recipes").glob("*/evals.yaml"))
CORE_KEYS = {"pass@1", "pass@k", "n", "num_problems", "stderr", "truncation_rate", "mean_tokens", "protocol"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """A tripwire: tests have no Hugging Face hub, so loading from it would be a test bug."""
    def refuse(name, hub):
        raise AssertionError(f"a test tried to load {name} from the hub; give it data_dir or a custom file")
    monkeypatch.setattr("evals.benchmarks._hub_rows", refuse)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name)
def test_every_evals_recipe_parses(recipe):
    cfg, engine = parse_config(["--config", str(recipe)])
    assert cfg.output_dir.startswith("runs/") and cfg.benchmarks and cfg.model_name and engine.has_model


# ----------------------------------------------------------------------------- grade-only, real data


def reference_completions() -> list[dict]:
    """gsm8k (n=3, pass@1 2/3, maj@3 2/3), math500 (n=3, all right) and HumanEval (n=1, all right)."""
    gsm8k = read_jsonl(BENCHMARKS / "gsm8k" / "test.jsonl")[:30]
    math500 = read_jsonl(BENCHMARKS / "math500" / "test.jsonl")[:20]
    humaneval = [json.loads(line) for line in gzip.open(BENCHMARKS / "humaneval" / "HumanEval.jsonl.gz", "rt")][:8]
    rows = []
    for i, r in enumerate(gsm8k):
        # 0-9: right x3; 10-19: right, wrong, right; 20-29: wrong, wrong, right
        pattern = [True] * 3 if i < 10 else [True, False, True] if i < 20 else [False, False, True]
        for ok in pattern:
            rows.append({"benchmark": "gsm8k", "problem_id": i, "completion": r["answer"] if ok else "#### -1"})
    for r in math500:
        for index in (2, 0, 1):  # explicit sample indexes, any order
            rows.append({"benchmark": "math500", "problem_id": r["unique_id"], "sample_index": index,
                         "completion": f"<think>\nwork\n</think>\n\n{r['solution']}", "completion_tokens": 100})
    for r in humaneval:
        code = r["prompt"] + r["canonical_solution"]
        rows.append({"benchmark": "humaneval", "problem_id": r["task_id"], "finish_reason": "stop",
                     "completion": f"<think>\nplan\n</think>\n\n```python\n{code}```\n"})
    rows[0]["finish_reason"] = "length"
    return rows


@pytest.mark.benchmarks
def test_grade_only_on_real_benchmarks_two_models_side_by_side(tmp_path):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"{BENCHMARKS} not found (benchmarks live beside the repository)")
    out = tmp_path / "evals"
    good = write_jsonl(tmp_path / "good.jsonl", reference_completions())
    flags = ["--output_dir", str(out), "--data_dir", str(BENCHMARKS), "--grader_workers", "2"]
    assert main([*flags, "--completions", str(good), "--model_name", "reference"]) == 0

    scores = json.loads((out / "scores.json").read_text())["reference"]
    assert list(scores) == ["gsm8k", "math500", "humaneval"]
    gsm8k, math500, humaneval = scores["gsm8k"], scores["math500"], scores["humaneval"]
    assert CORE_KEYS | {"maj@k"} <= set(gsm8k) and CORE_KEYS <= set(humaneval) and "maj@k" not in humaneval
    assert (gsm8k["n"], gsm8k["num_problems"], gsm8k["pass@1"], gsm8k["maj@k"]) == (3, 30, 0.666667, 0.666667)
    assert gsm8k["pass@k"] == 1.0 and gsm8k["truncation_rate"] == pytest.approx(1 / 90, abs=1e-6)
    assert (math500["pass@1"], math500["maj@k"], math500["n"], math500["mean_tokens"]) == (1.0, 1.0, 3, 100)
    assert set(math500["by_level"]) <= {"1", "2", "3", "4", "5"}
    assert sum(v["num_problems"] for v in math500["by_level"].values()) == 20
    assert (humaneval["pass@1"], humaneval["n"], humaneval["num_problems"]) == (1.0, 1, 8)
    assert gsm8k["protocol"]["temperature"] == 0.6 and gsm8k["protocol"]["grader"].startswith("math-v1")
    assert humaneval["protocol"]["grader"].startswith("code-v2")
    assert humaneval["protocol"]["sandbox"] == isolation().describe() and "sandbox" not in gsm8k["protocol"]
    assert "HumanEval.jsonl.gz (sha256 b796127e635a67f9)" in humaneval["protocol"]["data"]

    table = pq.read_table(out / "samples" / "reference" / "gsm8k.parquet")
    assert table.schema.names == SAMPLE_SCHEMA.names and table.num_rows == 90
    rows = table.to_pylist()
    assert sum(r["correct"] for r in rows) == 60 and {r["model"] for r in rows} == {"reference"}
    wrong = next(r for r in rows if not r["correct"])
    assert (wrong["extracted"], wrong["reason"]) == ("-1", "mismatch")
    he = pq.read_table(out / "samples" / "reference" / "humaneval.parquet").to_pylist()
    assert all(r["correct"] and r["reason"] == "ok" and "def " in r["extracted"] for r in he)

    # A second "model" into the same output_dir: both are kept, side by side.
    bad = [dict(r, completion="#### 0") for r in reference_completions() if r["benchmark"] == "gsm8k"]
    assert main([*flags, "--completions", str(write_jsonl(tmp_path / "bad.jsonl", bad)),
                 "--model_name", "wrong"]) == 0
    everything = json.loads((out / "scores.json").read_text())
    assert list(everything) == ["reference", "wrong"] and everything["wrong"]["gsm8k"]["pass@1"] == 0.0
    report = (out / "report.md").read_text()
    assert "| model | gsm8k pass@1 | gsm8k maj@k | math500 pass@1 | math500 maj@k | humaneval pass@1 |" in report
    assert "| reference | 66.7 ± 5.1 | 66.7 | 100.0 ± 0.0 | 100.0 | 100.0 ± 0.0 |" in report
    assert "| wrong | 0.0 ± 0.0 | 0.0 | — | — | — |" in report
    assert "## Protocol" in report and "evals/templates/r1_math.jinja (sha256 " in report
    assert (out / "evals.config.yaml").is_file()


# ----------------------------------------------------------------------------- generation via tracegen


MATH = [  # prompt directives of the fake server decide every sample: n=4 samples are choices 0..3
    {"id": "all", "prompt": "2+2? [answer:4]", "answer": "4"},  # 4/4
    {"id": "most", "prompt": "q [answers:7|7|9]", "answer": "7"},  # 7 7 9 7: 3/4, majority right
    {"id": "tie", "prompt": "q [answers:1|2|2]", "answer": "1"},  # 1 2 2 1: 2/4, tie -> "1" (voted first)
    {"id": "none", "prompt": "q [answer:5]", "answer": "6"},  # 0/4
    {"id": "cut", "prompt": "q [finish:length]", "answer": "6"},  # truncated, no answer: 0/4
]


def test_generation_through_tracegen_scores_exactly_and_resumes(tmp_path):
    math = write_jsonl(tmp_path / "mine.jsonl", [dict(p, domain="math") for p in MATH])
    stdio = {"kind": "stdio", "cases": [{"input": "1\n", "output": "2\n"}]}
    code = write_jsonl(tmp_path / "lcb.jsonl", [{"id": "c1", "domain": "code", "prompt": "Print n+1.", "tests": stdio}])
    out = tmp_path / "evals"
    with FakeOpenAIServer() as server:
        argv = ["--output_dir", str(out), "--benchmarks", "mine", "lcb", "--custom_benchmarks",
                json.dumps({"mine": str(math), "lcb": str(code)}), "--base_url", server.base_url,
                "--model", "fake-teacher", "--n", "4", "--max_tokens", "64", "--grader_workers", "2"]
        assert main(argv) == 0
        requests = len(server.chat_requests())
        assert requests == 6  # one request of n=4 per problem
        first = json.loads((out / "scores.json").read_text())
        assert main(argv) == 0  # resumes: every sample is found, nothing is asked again
        assert len(server.chat_requests()) == requests
        prompts = {r.prompt for r in server.chat_requests()}
    again = json.loads((out / "scores.json").read_text())
    assert list(again) == ["fake-teacher"]  # model_name defaults to the model's name
    mine, lcb = again["fake-teacher"]["mine"], again["fake-teacher"]["lcb"]
    assert {k: v for k, v in mine.items() if k != "protocol"} == {
        k: v for k, v in first["fake-teacher"]["mine"].items() if k != "protocol"}
    assert (mine["pass@1"], mine["maj@k"], mine["pass@k"], mine["n"], mine["num_problems"]) == (
        0.45, 0.6, 0.6, 4, 5)
    assert mine["truncation_rate"] == 0.2 and mine["categories"] == {"correct": 9, "wrong": 7, "no_answer": 4}
    assert mine["protocol"]["max_tokens"] == 64 and "base_url=" in mine["protocol"]["generation"]
    assert "maj@k" not in lcb and lcb["pass@1"] == 0.0 and lcb["n"] == 4
    assert "2+2? [answer:4]\nPlease reason step by step, and put your final answer within \\boxed{}." in prompts
    assert "Print n+1.\nPlease reason step by step, then give your complete solution in a single ```python code " \
           "block." in prompts
    assert (out / "generations" / "mine" / "problems.jsonl").is_file()
    assert (out / "generations" / "fake-teacher" / "mine" / "traces").is_dir()
    rows = pq.read_table(out / "samples" / "fake-teacher" / "mine.parquet").to_pylist()
    by_id = {(r["problem_id"], r["sample_index"]): r for r in rows}
    assert by_id[("all", 0)]["completion"].startswith("<think>\nLet me think step by step.")
    assert by_id[("all", 0)]["completion"].endswith("</think>\n\nThe answer is \\boxed{4}.")
    assert [by_id[("tie", i)]["extracted"] for i in range(4)] == ["1", "2", "2", "1"]
    assert by_id[("cut", 0)]["finish_reason"] == "length" and by_id[("cut", 0)]["category"] == "no_answer"


def test_failed_generations_are_recorded_counted_wrong_and_exit_1(tmp_path, caplog):
    problems = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "ok", "domain": "math", "prompt": "[answer:3]", "answer": "3"},
        {"id": "down", "domain": "math", "prompt": "[fail:always500][answer:3]", "answer": "3"}])
    out = tmp_path / "evals"
    with FakeOpenAIServer() as server:
        code = main(["--output_dir", str(out), "--benchmarks", "p", "--custom_benchmarks",
                     json.dumps({"p": str(problems)}), "--base_url", server.base_url, "--model_name", "m",
                     "--n", "2", "--max_retries", "1", "--retry_backoff_s", "0.01"])
    assert code == 1 and "2 samples could not be generated" in caplog.text
    scores = json.loads((out / "scores.json").read_text())["m"]["p"]
    assert (scores["pass@1"], scores["errors"], scores["categories"]["error"]) == (0.5, 2, 2)
    failed = [r for r in pq.read_table(out / "samples" / "m" / "p.parquet").to_pylist() if r["error"]]
    assert [r["problem_id"] for r in failed] == ["down", "down"] and "500" in failed[0]["error"]


# ----------------------------------------------------------------------------- errors: exit 2, named


def test_config_errors_exit_2_naming_the_setting(tmp_path, caplog):
    base = ["--output_dir", str(tmp_path / "out"), "--base_url", "http://127.0.0.1:9/v1", "--model_name", "m"]
    (tmp_path / "c.yaml").write_text("output_dir: x\nbase_url: http://127.0.0.1:9/v1\nnn: 3\n")
    cases = [
        (["--config", str(tmp_path / "c.yaml")], "c.yaml: unknown keys ['nn']"),
        ([*base, "--n", "0"], "n: must be >= 1"),
        ([*base, "--benchmarks", "gsm9k"], "benchmarks: unknown benchmark 'gsm9k'"),
        ([*base, "--top_p", "0"], "top_p"),
        (["--output_dir", str(tmp_path / "out")], "base_url / serve_model / model"),
        ([*base, "--math_prompt_template", "nope.jinja"], "math_prompt_template: no such file: nope.jinja"),
        ([*base, "--tracegen_args", "--n 3"], "tracegen_args: removed; set tracegen's settings as keys"),
        ([*base, "--custom_benchmarks", '{"gsm8k": "x.jsonl"}'], "custom_benchmarks: 'gsm8k'"),
        ([*base, "--benchmarks", "gsm8k", "--data_dir", str(tmp_path)], f"{tmp_path}/gsm8k/test.jsonl: no such file"),
        ([*base, "--benchmarks", "toy", "--custom_benchmarks", '{"toy": "missing.jsonl"}'], "missing.jsonl"),
        ([*base, "--completions", "missing.jsonl"], "completions: no such file: missing.jsonl"),
        ([*base, "--nope", "1"], "command line: unknown flags or extra values ['--nope', '1']"),
    ]
    for argv, message in cases:
        caplog.clear()
        assert main(argv) == 2, argv
        assert message in caplog.text, (argv, caplog.text)


def test_bad_completions_exit_2_naming_the_line(tmp_path, caplog):
    toy = write_jsonl(tmp_path / "toy.jsonl", [
        {"id": f"t{i}", "domain": "math", "prompt": f"{i}+1?", "answer": str(i + 1)} for i in range(3)])
    base = ["--output_dir", str(tmp_path / "out"), "--custom_benchmarks", json.dumps({"toy": str(toy)})]
    good = {"benchmark": "toy", "problem_id": "t0", "completion": "\\boxed{1}"}
    cases = [
        ([good, dict(good, problem_id="t9")], ":2: unknown problem id 't9' in toy"),
        ([good, dict(good, benchmark="gsm9k")], ":2: unknown benchmark 'gsm9k'"),
        ([dict(good, sample_index=0), dict(good, sample_index=0)], ":2: sample 0 of toy 't0' again (first at"),
        ([good, dict(good, completion=None)], ":2: field 'completion' must be a string"),
        ([good, good, dict(good, problem_id="t1")], "toy: problem 't1' has 1 samples, most have 2"),
        ([good, dict(good, sample_index=True)], ":2: field 'sample_index' must be absent, null or a non-negative "
                                                "integer, got true"),
        ([good, dict(good, sample_index=-5)], ":2: field 'sample_index' must be absent, null or a non-negative "
                                              "integer, got -5"),
    ]
    for rows, message in cases:
        caplog.clear()
        assert main([*base, "--completions", str(write_jsonl(tmp_path / "c.jsonl", rows))]) == 2, rows
        assert message in caplog.text, (rows, caplog.text)
    (tmp_path / "c.jsonl").write_bytes(json.dumps(good).encode() + b'\n{"benchmark": "toy", "completion": "\xff"}\n')
    assert main([*base, "--completions", str(tmp_path / "c.jsonl")]) == 2
    assert "c.jsonl:2: not UTF-8 text (byte 0xff at column 37)" in caplog.text
    (tmp_path / "c.jsonl").write_text(json.dumps(good) + "\n{oops\n")
    assert main([*base, "--completions", str(tmp_path / "c.jsonl")]) == 2 and "c.jsonl:2: not valid JSON" in caplog.text
    caplog.clear()
    assert main([*base, "--completions", str(write_jsonl(tmp_path / "c.jsonl", [good])), "--benchmarks", "toy",
                 "gsm8k", "--data_dir", str(tmp_path)]) == 2
    assert "gsm8k/test.jsonl: no such file" in caplog.text


@pytest.mark.parametrize("tests, message", [
    ({"kind": "stdio"}, "kind stdio needs `cases`: a non-empty list of {input, output} strings"),
    ({"kind": "stdio", "cases": [{"input": "1"}]}, "kind stdio needs `cases`"),
    ({"kind": "functional", "entry_point": "f"}, "kind functional needs `test`"),
    ({"kind": "functional", "test": "def check(candidate):\n    assert candidate(1) == 2\n"},
     "kind functional: `test` defines check(candidate), so `entry_point` (the function it tests) is needed"),
    ({"kind": "quiz"}, "kind 'quiz' is not one of functional, evalplus, stdio"),
], ids=["no-cases", "case-without-output", "no-test", "check-without-entry-point", "unknown-kind"])
def test_code_tests_that_cannot_run_are_named_not_graded_wrong(tmp_path, caplog, tests, message):
    code = write_jsonl(tmp_path / "lcb.jsonl", [
        {"id": "ok", "domain": "code", "prompt": "Print 2.", "tests": {"kind": "stdio", "cases": [
            {"input": "", "output": "2\n"}]}},
        {"id": "broken", "domain": "code", "prompt": "Write f.", "tests": tests}])
    rows = [{"benchmark": "lcb", "problem_id": pid, "completion": "```python\nprint(2)\n```"} for pid in ("ok", "broken")]
    assert main(["--output_dir", str(tmp_path / "out"), "--custom_benchmarks", json.dumps({"lcb": str(code)}),
                 "--completions", str(write_jsonl(tmp_path / "c.jsonl", rows))]) == 2
    assert f"{code}:2: tests: {message}" in caplog.text and not (tmp_path / "out" / "scores.json").exists()


def test_one_benchmark_name_as_a_string_is_a_list_of_one(tmp_path, caplog):
    cb = write_jsonl(tmp_path / "cb.jsonl", [{"id": "a", "domain": "math", "prompt": "1+1?", "answer": "2"}])
    rows = [{"benchmark": "cb", "problem_id": "a", "completion": "\\boxed{2}"}]
    config = tmp_path / "evals.yaml"
    config.write_text(f"benchmarks: cb\noutput_dir: {tmp_path / 'out'}\ncustom_benchmarks: {{cb: {cb}}}\n"
                      f"completions: {write_jsonl(tmp_path / 'c.jsonl', rows)}\n")
    assert main(["--config", str(config)]) == 0  # cb, not the letters c and b
    assert list(json.loads((tmp_path / "out" / "scores.json").read_text())["c"]) == ["cb"]
    config.write_text(config.read_text().replace("benchmarks: cb", "benchmarks: bc"))
    assert main(["--config", str(config)]) == 2
    assert "benchmarks: unknown benchmark 'bc'" in caplog.text


def test_grade_only_toy_with_limit_and_levels(tmp_path):
    # Imported here: data.toyworld imports transformers (seconds), which only these tests need.
    from data.toyworld.problems import generate_problems, to_jsonl

    test = generate_problems(seed=0, n_train=50, n_test=20)["test"]
    (tmp_path / "test.jsonl").write_bytes(to_jsonl(test))
    rows = [{"benchmark": "toy", "problem_id": p["id"], "completion": p["meta"]["solution"]} for p in test]
    out = tmp_path / "out"
    assert main(["--output_dir", str(out), "--custom_benchmarks", json.dumps({"toy": str(tmp_path / "test.jsonl")}),
                 "--completions", str(write_jsonl(tmp_path / "toy-gold.jsonl", rows)), "--limit", "10"]) == 0
    toy = json.loads((out / "scores.json").read_text())["toy-gold"]["toy"]
    assert (toy["pass@1"], toy["num_problems"], toy["n"]) == (1.0, 10, 1)
    assert list(toy["by_level"]) == ["1", "2", "3", "4", "5"] and toy["protocol"]["prompt_template"].startswith("none")
