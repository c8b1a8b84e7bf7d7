"""End to end on the toy world: traces shaped like a real tracegen run (the gold working, a fifth of them with a
wrong answer, some cut at max_tokens), problems found through tracegen.config.yaml, and the curated set
rendered by the toy chat template exactly as the gold SFT set is."""

import json
import random

import datasets
import pytest
import yaml
from transformers import AutoTokenizer

from data.toyworld.problems import gold_conversation
from filter.main import main
from tests.filter.runs import trace_row, write_part


@pytest.fixture(scope="module")
def toy_run(toyworld, tmp_path_factory):
    problems = [json.loads(line) for line in toyworld.train.read_text().splitlines()][:60]
    run = tmp_path_factory.mktemp("toy") / "run"
    run.mkdir()
    rng, rows, expected = random.Random(0), [], {}
    for p in problems:
        gold = gold_conversation(p)[-1]
        for i in range(2):
            fate = rng.choice(["ok"] * 7 + ["wrong"] * 2 + ["length"])
            content = gold["content"] if fate == "ok" else f"The answer is \\boxed{{{int(p['answer']) + 1}}}."
            row = trace_row(f"{p['id']}-{i}", p["id"], i, gold["reasoning_content"],
                            None if fate == "length" else content, "length" if fate == "length" else "stop", None,
                            prompt=p["prompt"])
            rows.append(row)
            expected[row["trace_id"]] = fate
    write_part(run, "part-0of1-000000", rows)
    config = run.parent / "filter.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(run), "problems": str(toyworld.train),  # the source, not problems/
                                      "contamination_benchmarks": [], "workers": 2}))
    assert main(["--config", str(config)]) == 0
    return run, problems, expected


def test_toy_run_keeps_exactly_the_correct_finished_traces(toy_run):
    run, problems, expected = toy_run
    ds = datasets.load_dataset("parquet", data_files=str(run / "curated" / "*.parquet"), split="train")
    assert sorted(ds["trace_id"]) == sorted(t for t, fate in expected.items() if fate == "ok")
    assert set(ds["difficulty"]) <= {1, 2, 3, 4, 5} and set(ds["verdict"]) == {"correct"}
    funnel = json.loads((run / "curated" / "funnel.json").read_text())
    by_reason = {r["reason"]: r["first_applicable"] for r in funnel["rules"]}
    assert by_reason["unfinished"] == sum(f == "length" for f in expected.values())
    assert by_reason["unverified"] == sum(f == "wrong" for f in expected.values())


def test_curated_turns_render_like_the_gold_set_through_the_toy_chat_template(toy_run, toyworld):
    run, problems, _ = toy_run
    tok = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    ds = datasets.load_dataset("parquet", data_files=str(run / "curated" / "*.parquet"), split="train")
    by_id = {p["id"]: p for p in problems}
    for row in ds.select(range(5)):
        text = tok.apply_chat_template(row["messages"], tokenize=False)
        problem = by_id[row["problem_id"]]
        assert "<think>\n" in text and f"\\boxed{{{problem['answer']}}}" in text
        assert text == tok.apply_chat_template(gold_conversation(problem), tokenize=False)
