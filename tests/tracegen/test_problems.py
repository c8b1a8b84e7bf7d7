import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.config import ConfigError, InputError
from tracegen.problems import load_problems, make_renderer, shard_of


def cfg(path, **kw):
    """load_problems' arguments (plain values, as TracegenConfig.problem_source() gives them)."""
    return {"problems": str(path), **kw}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"id": "a", "domain": "math", "prompt": "1+1?", "answer": 2, "source": "t", "meta": {"difficulty": 1}}


def test_jsonl_loads_and_normalises(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, {**GOOD, "id": 7, "answer": None, "meta": '{"x": 1}'}])
    problems = load_problems(**cfg(path))
    assert [p["id"] for p in problems] == ["a", "7"]
    assert problems[0]["answer"] == "2" and problems[1]["answer"] is None
    assert problems[1]["meta"] == {"x": 1} and problems[0]["tests"] is None


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "p.jsonl:2: not valid JSON"),
    ('["a list"]', "p.jsonl:2: expected a JSON object"),
    (json.dumps({"id": "b", "domain": "math"}), "p.jsonl:2: missing field 'prompt'"),
    (json.dumps({**GOOD, "id": "b", "domain": "poetry"}), "p.jsonl:2: domain 'poetry'"),
    (json.dumps(GOOD), "p.jsonl:2: duplicate id 'a' (first at"),
    (json.dumps({**GOOD, "id": "b", "prompt": ["x"]}), "p.jsonl:2: prompt must be a string"),
])
def test_bad_input_names_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, bad_line, {**GOOD, "id": "c"}])
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_problems(**cfg(path))


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_problems(**cfg(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no rows"):
        load_problems(**cfg(tmp_path / "empty.jsonl"))


def test_parquet_with_column_map_row_ids_and_defaults(tmp_path):
    pq.write_table(pa.table({"question": ["q0", "q1"], "final": ["3", "4"]}), tmp_path / "gsm.parquet")
    problems = load_problems(**cfg(tmp_path / "gsm.parquet", column_map={"id": "@row", "prompt": "question",
                                                                        "answer": "final"},
                                 problem_defaults={"domain": "math", "source": "gsm8k"}))
    assert problems == [
        {"id": "0", "domain": "math", "prompt": "q0", "answer": "3", "tests": None, "source": "gsm8k", "meta": None},
        {"id": "1", "domain": "math", "prompt": "q1", "answer": "4", "tests": None, "source": "gsm8k", "meta": None},
    ]


def test_answer_format_takes_the_final_answer_out_of_a_solution(tmp_path):
    gsm = "2 + 2 = 4\nSo 1,004 in all.\n#### 1,004"
    math = "Thus $x=\\frac{1}{2}$, and $y = \\boxed{\\frac{\\sqrt{2}}{2}}$."
    for name, solution, gold in (("gsm8k", gsm, "1004"), ("boxed", math, "\\frac{\\sqrt{2}}{2}")):
        pq.write_table(pa.table({"question": ["q"], "sol": [solution]}), tmp_path / f"{name}.parquet")
        (problem,) = load_problems(**cfg(tmp_path / f"{name}.parquet", answer_format=name, problem_defaults={
            "domain": "math"}, column_map={"id": "@row", "prompt": "question", "answer": "sol"}))
        assert (problem["answer"], problem["meta"]) == (gold, {"solution": solution})
    (problem,) = load_problems(**cfg(tmp_path / "boxed.parquet", answer_format="boxed", id_prefix="math/",
                                   problem_defaults={"domain": "math"}, column_map={"id": "@row", "prompt": "question",
                                                                                    "answer": "sol"}))
    assert problem["id"] == "math/0"
    with pytest.raises(InputError, match=r"gsm8k.parquet: row 0: answer_format boxed: the answer has no "):
        load_problems(**cfg(tmp_path / "gsm8k.parquet", answer_format="boxed", problem_defaults={"domain": "math"},
                          column_map={"id": "@row", "prompt": "question", "answer": "sol"}))


def test_parquet_error_names_row(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "domain": ["math", "math"], "prompt": ["x", None]}),
                   tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"p.parquet: row 1: missing field 'prompt'"):
        load_problems(**cfg(tmp_path / "p.parquet"))


def test_unknown_column_map_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD])
    with pytest.raises(ConfigError, match="column_map: unknown Problem fields"):
        load_problems(**cfg(path, column_map={"question": "prompt"}))


def test_hugging_face_dataset_from_local_folders(tmp_path):
    """The real loading code (datasets), on local data shaped like the hub's."""
    import datasets

    rows = {"question": ["q0", "q1", "q2"], "answer": ["1", "2", "3"]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(tmp_path / "saved")
    hub_like = tmp_path / "hub_like" / "data"
    hub_like.mkdir(parents=True)
    pq.write_table(pa.table(rows), hub_like / "test-00000-of-00001.parquet")
    for source in (tmp_path / "saved", tmp_path / "hub_like"):
        problems = load_problems(**cfg(source, problems_split="test", column_map={"id": "@row", "prompt": "question"},
                                     problem_defaults={"domain": "math"}))
        assert [(p["id"], p["prompt"], p["answer"]) for p in problems] == [("0", "q0", "1"), ("1", "q1", "2"),
                                                                           ("2", "q2", "3")]
    with pytest.raises(InputError, match="cannot load dataset"):
        load_problems(**cfg(tmp_path / "saved", problems_split="nope"))


def test_shards_partition_the_problems_deterministically():
    problems = [{"id": f"p{i}"} for i in range(200)]
    parts = [shard_of(problems, (i, 3)) for i in range(3)]
    ids = [p["id"] for part in parts for p in part]
    assert sorted(ids) == sorted(p["id"] for p in problems) and len(set(ids)) == 200
    assert all(len(part) > 40 for part in parts)
    assert [p["id"] for p in shard_of(list(reversed(problems)), (1, 3))] == [p["id"] for p in reversed(parts[1])]


def test_renderer(tmp_path):
    (tmp_path / "user.jinja").write_text("{{ prompt }}\nDifficulty {{ meta.difficulty }}. Box it.\n")
    (tmp_path / "system.txt").write_text("You are careful.\n")
    render = make_renderer(str(tmp_path / "user.jinja"), str(tmp_path / "system.txt"))
    assert render(GOOD) == [{"role": "system", "content": "You are careful."},
                            {"role": "user", "content": "1+1?\nDifficulty 1. Box it."}]
    assert make_renderer(None, None)(GOOD) == [{"role": "user", "content": "1+1?"}]
    (tmp_path / "bad.jinja").write_text("{{ prompt }\n")
    with pytest.raises(InputError, match="bad.jinja:1"):
        make_renderer(str(tmp_path / "bad.jinja"), None)
    (tmp_path / "undefined.jinja").write_text("{{ nope }}")
    with pytest.raises(ConfigError, match="'nope' is undefined"):
        make_renderer(str(tmp_path / "undefined.jinja"), None)(GOOD)
