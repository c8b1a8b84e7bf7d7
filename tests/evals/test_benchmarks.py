"""Benchmark loaders: the real public sets beside the repository, the toy world's split, custom files."""

import gzip
import json
import re
from pathlib import Path

import pytest

from data.config import InputError
from evals.benchmarks import PUBLIC, benchmark_source, level_of, load_benchmark, max_tokens_for

BENCHMARKS = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"
COUNTS = {"gsm8k": 1319, "math500": 500, "aime24": 30, "amc23": 40, "humaneval": 164, "humanevalplus": 164,
          "mbppplus": 378}


@pytest.fixture(scope="module")
def data_dir():
    if not BENCHMARKS.is_dir():
        pytest.skip(f"{BENCHMARKS} not found (benchmarks live beside the repository)")
    return str(BENCHMARKS)


@pytest.mark.benchmarks
@pytest.mark.parametrize("name", list(COUNTS))
def test_public_benchmark_counts_ids_and_records(data_dir, name):
    bench = load_benchmark(name, data_dir)
    assert len(bench.problems) == COUNTS[name] and bench.name == name
    assert bench.source.startswith(f"{data_dir}/{PUBLIC[name][1]} (sha256 ")
    for p in bench.problems:
        assert set(p) == {"id", "domain", "prompt", "answer", "tests", "source", "meta"}
        assert p["domain"] == bench.domain and p["source"] == name and p["prompt"].strip()
    ids = [p["id"] for p in bench.problems]
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) for i in ids)


@pytest.mark.benchmarks
def test_math_ids_and_golds(data_dir):
    gsm8k = load_benchmark("gsm8k", data_dir).problems
    assert [p["id"] for p in gsm8k[:3]] == ["0", "1", "2"] and gsm8k[0]["answer"] == "18"
    assert all(re.fullmatch(r"-?\d+", p["answer"]) for p in gsm8k)  # "#### 1,450,000" -> "1450000"
    assert "1450000" in {p["answer"] for p in gsm8k}
    math500 = load_benchmark("math500", data_dir).problems
    assert math500[0]["id"] == "test/precalculus/807.json"
    assert math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert {level_of(p) for p in math500} == {"1", "2", "3", "4", "5"}
    aime = load_benchmark("aime24", data_dir).problems
    assert [p["id"] for p in aime[:2]] == ["60", "61"] and aime[0]["answer"] == "204"
    assert all(re.fullmatch(r"\d{1,3}", p["answer"]) for p in aime) and "25" in {p["answer"] for p in aime}
    amc = load_benchmark("amc23", data_dir).problems
    assert [(p["id"], p["answer"]) for p in amc[:2]] == [("0", "27"), ("1", "36")]
    assert all(re.fullmatch(r"-?\d+", p["answer"]) for p in amc)


@pytest.mark.benchmarks
def test_code_ids_and_tests(data_dir):
    humaneval = load_benchmark("humaneval", data_dir).problems
    assert humaneval[0]["id"] == "HumanEval/0"
    tests = humaneval[0]["tests"]
    assert tests["kind"] == "functional" and tests["entry_point"] == "has_close_elements"
    assert "def check(candidate)" in tests["test"] and tests["prompt"] == humaneval[0]["prompt"]
    for name, first in (("humanevalplus", "HumanEval/0"), ("mbppplus", "Mbpp/2")):
        problems = load_benchmark(name, data_dir).problems
        assert problems[0]["id"] == first
        assert all(p["tests"]["kind"] == "evalplus" and p["tests"]["task_id"] == p["id"] for p in problems)
        assert all(isinstance(p["tests"]["base_input"], list) for p in problems)


@pytest.mark.benchmarks
def test_limit_takes_the_first_problems(data_dir):
    assert [p["id"] for p in load_benchmark("aime24", data_dir, limit=3).problems] == ["60", "61", "62"]


def test_source_is_known_without_loading_and_follows_the_data(tmp_path):
    """benchmark_source (what caches key on) equals the loaded benchmark's source and changes with the file."""
    (tmp_path / "gsm8k").mkdir()
    path = tmp_path / "gsm8k" / "test.jsonl"
    path.write_text('{"question": "q", "answer": "x\\n#### 3"}\n')
    before = benchmark_source("gsm8k", str(tmp_path))
    assert before == load_benchmark("gsm8k", str(tmp_path)).source
    path.write_text('{"question": "q2", "answer": "x\\n#### 3"}\n')
    assert benchmark_source("gsm8k", str(tmp_path)) not in (before, None)
    custom = tmp_path / "c.jsonl"
    custom.write_text(json.dumps({"id": "a", "domain": "math", "prompt": "1+1", "answer": "2"}) + "\n")
    assert benchmark_source("c", custom={"c": str(custom)}) == load_benchmark("c", custom={"c": str(custom)}).source
    assert benchmark_source("math500").startswith("HuggingFaceH4/MATH-500@")  # pinned: no download needed
    assert benchmark_source("amc23") is None  # unpinned: only loading can tell
    with pytest.raises(InputError, match="no such file"):
        benchmark_source("math500", str(tmp_path))


def test_missing_local_file_names_the_path(tmp_path):
    with pytest.raises(InputError, match=re.escape(f"{tmp_path}/gsm8k/test.jsonl: no such file")):
        load_benchmark("gsm8k", str(tmp_path))


def test_bad_local_rows_name_the_line(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "x\\n#### 3"}\n{"question": "q"}\n')
    with pytest.raises(InputError, match=r"gsm8k/test.jsonl:2: not a gsm8k row \(KeyError: 'answer'\)"):
        load_benchmark("gsm8k", str(tmp_path))


def test_local_files_that_are_not_utf8_or_whole_gzip_are_named(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_bytes(b'{"question": "q", "answer": "x\\n#### 3"}\n{"question": "\xff"}\n')
    with pytest.raises(InputError, match=r"gsm8k/test.jsonl:2: not UTF-8 text \(byte 0xff\)"):
        load_benchmark("gsm8k", str(tmp_path))
    (tmp_path / "humaneval").mkdir()
    whole = gzip.compress(b'{"task_id": "HumanEval/0"}\n' * 50)
    (tmp_path / "humaneval" / "HumanEval.jsonl.gz").write_bytes(whole[:len(whole) // 2])  # a download cut short
    with pytest.raises(InputError, match=r"HumanEval.jsonl.gz: not a readable gzip file"):
        load_benchmark("humaneval", str(tmp_path))


def test_toy_split_loads_with_difficulty_levels(tmp_path):
    # Imported here: data.toyworld imports transformers (seconds), which only these tests need.
    from data.toyworld.problems import generate_problems, to_jsonl

    test = generate_problems(seed=0, n_train=50, n_test=20)["test"]
    (tmp_path / "test.jsonl").write_bytes(to_jsonl(test))
    bench = load_benchmark("toy", custom={"toy": str(tmp_path / "test.jsonl")})
    assert bench.domain == "math" and len(bench.problems) == 20
    assert [p["id"] for p in bench.problems] == [p["id"] for p in test]
    assert [p["answer"] for p in bench.problems] == [p["answer"] for p in test]
    assert {level_of(p) for p in bench.problems} == {"1", "2", "3", "4", "5"}
    assert max_tokens_for("toy") == 512 and max_tokens_for("aime24") == 32768


def test_custom_benchmarks_are_checked(tmp_path):
    path = tmp_path / "lcb.jsonl"
    stdio = {"kind": "stdio", "cases": [{"input": "1\n", "output": "2\n"}]}
    path.write_text(json.dumps({"id": 7, "domain": "code", "prompt": "print n+1", "tests": stdio}) + "\n")
    bench = load_benchmark("lcb", custom={"lcb": str(path)})
    assert bench.domain == "code" and bench.problems[0]["id"] == "7" and bench.problems[0]["tests"] == stdio
    path.write_text(json.dumps({"id": "a", "domain": "math", "prompt": "1+1"}) + "\n")
    with pytest.raises(InputError, match="problem 'a' has no gold answer"):
        load_benchmark("lcb", custom={"lcb": str(path)})
    path.write_text(json.dumps({"id": "a", "domain": "math", "prompt": "1+1", "answer": "2"}) + "\n"
                    + json.dumps({"id": "b", "domain": "code", "prompt": "x", "tests": stdio}) + "\n")
    with pytest.raises(InputError, match=r"mixes domains \['code', 'math'\]"):
        load_benchmark("lcb", custom={"lcb": str(path)})
    path.write_text('{"id": "a", "domain": "math"}\n')
    with pytest.raises(InputError, match="lcb.jsonl:1: missing field 'prompt'"):
        load_benchmark("lcb", custom={"lcb": str(path)})
    with pytest.raises(InputError, match="toy: nope.jsonl: no such file .*data.toyworld build"):
        load_benchmark("toy", custom={"toy": "nope.jsonl"})
