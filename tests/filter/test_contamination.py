"""Benchmark contamination in DuckDB: a planted GSM8K test problem is found with its id and n-gram, a
paraphrase is not, the toy benchmark works offline, reruns are incremental, and the result equals the
plain-Python reference on a mixed set.

    .venv/bin/python -m pytest -q tests/filter/test_contamination.py

The GSM8K/MATH-500/HumanEval cases read ../shared/benchmarks (see its MANIFEST.md) and skip without it.
"""

import json
import random
from pathlib import Path

import duckdb
import pytest

from data.config import InputError
from filter.contamination import contamination_python, label_contamination, load_benchmarks

BENCHMARKS = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"
needs_benchmarks = pytest.mark.skipif(not (BENCHMARKS / "gsm8k" / "test.jsonl").is_file(),
                                      reason=f"{BENCHMARKS} (real benchmark copies) is not there")
# Janet's ducks (GSM8K test line 0) retold: no 8 consecutive words in common with any GSM8K test problem.
PARAPHRASE = ("Each day Janet's ducks produce 16 eggs. Three of them are her breakfast and four go into the "
              "muffins she bakes for friends. She sells what remains at the market, charging $2 for one egg. "
              "What are her daily earnings?")


def db_with(problems: dict[str, str]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("CREATE TABLE problems (problem_id VARCHAR PRIMARY KEY, prompt VARCHAR)")
    add(con, problems)
    return con


def add(con, problems: dict[str, str]) -> None:
    con.executemany("INSERT INTO problems VALUES (?, ?)", list(problems.items()))


def labels(con) -> dict[str, tuple]:
    rows = con.execute("""SELECT problem_id, contaminated, benchmark, benchmark_problem_id, matched_ngram
                          FROM contamination ORDER BY problem_id""").fetchall()
    return {row[0]: row[1:] for row in rows}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@needs_benchmarks
def test_planted_gsm8k_problem_is_found_and_a_paraphrase_is_not():
    question = read_jsonl(BENCHMARKS / "gsm8k" / "test.jsonl")[0]["question"]
    planted = "Solve the following.\n\n" + question.upper().replace(". ", ".\n")  # reformatted, still a copy
    con = db_with({"planted": planted, "paraphrase": PARAPHRASE, "clean": "What is 2 plus 2?"})
    assert label_contamination(con, benchmarks=["gsm8k"], data_dir=str(BENCHMARKS)) == 3
    got = labels(con)
    contaminated, benchmark, benchmark_id, ngram = got["planted"]
    assert (contaminated, benchmark, benchmark_id) == (True, "gsm8k", "0")
    assert len(ngram.split()) == 8 and ngram in " ".join(question.lower().replace("\u2019", " ").split())
    assert got["paraphrase"] == (False, None, None, None)
    assert got["clean"] == (False, None, None, None)


def test_toy_benchmark_offline_incremental_and_cached(toyworld, tmp_path):
    test = read_jsonl(toyworld.test)
    train = read_jsonl(toyworld.train)
    con = db_with({"t-planted": test[3]["prompt"], **{p["id"]: p["prompt"] for p in train[:50]}})
    toy = f"toy={toyworld.test}"
    assert label_contamination(con, benchmarks=[toy], data_dir=None) == 51
    assert labels(con)["t-planted"][:3] == (True, "toy", test[3]["id"])
    assert label_contamination(con, benchmarks=[toy], data_dir=None) == 0  # nothing new
    add(con, {"z-new": test[5]["prompt"]})
    assert label_contamination(con, benchmarks=[toy], data_dir=None) == 1  # only the new problem
    assert labels(con)["z-new"][:3] == (True, "toy", test[5]["id"])

    # The benchmark's data changes: its cached n-grams are rebuilt and every problem is checked again.
    changed = tmp_path / "toy-test.jsonl"
    changed.write_text("".join(json.dumps({**p, "prompt": p["prompt"] + " Answer in words."}) + "\n"
                               for p in test if p["id"] != test[3]["id"]))
    assert label_contamination(con, benchmarks=[f"toy={changed}"], data_dir=None) == 52
    assert labels(con)["t-planted"][0] is False or labels(con)["t-planted"][2] != test[3]["id"]
    fingerprints = con.execute("SELECT DISTINCT fingerprint FROM benchmark_ngrams WHERE benchmark = 'toy'").fetchall()
    assert len(fingerprints) == 1  # the old data's n-grams are gone


def test_custom_path_missing_is_named(tmp_path):
    con = db_with({"a": "x"})
    with pytest.raises(InputError, match="nope.jsonl"):
        label_contamination(con, benchmarks=[f"toy={tmp_path / 'nope.jsonl'}"], data_dir=None)


def mixed_problems(toyworld, rng: random.Random) -> dict[str, str]:
    """Copies, partial copies, reformatted copies, unrelated and paraphrased problems."""
    toy = [p["prompt"] for p in read_jsonl(toyworld.test)] + [p["prompt"] for p in read_jsonl(toyworld.train)]
    problems = {f"toy-{i:03d}": text for i, text in enumerate(rng.sample(toy, 200))}
    problems["paraphrase"] = PARAPHRASE
    if (BENCHMARKS / "gsm8k").is_dir():
        gsm_test = [r["question"] for r in read_jsonl(BENCHMARKS / "gsm8k" / "test.jsonl")]
        gsm_train = [r["question"] for r in read_jsonl(BENCHMARKS / "gsm8k" / "train.jsonl")]
        math500 = [r["problem"] for r in read_jsonl(BENCHMARKS / "math500" / "test.jsonl")]
        for i, text in enumerate(rng.sample(gsm_test, 40)):
            words = text.split()
            cut = rng.randrange(len(words) // 2)
            problems[f"gsm-copy-{i:02d}"] = " ".join(words[cut:cut + 9]) if i % 2 else text.lower()
        problems.update({f"gsm-train-{i:03d}": text for i, text in enumerate(rng.sample(gsm_train, 300))})
        problems.update({f"math-{i:02d}": "Hint: think.\n" + text for i, text in enumerate(rng.sample(math500, 20))})
    return problems


def test_duckdb_equals_the_python_reference_on_a_mixed_set(toyworld):
    names = [f"toy={toyworld.test}"]
    data_dir = None
    if (BENCHMARKS / "gsm8k").is_dir():
        names = ["gsm8k", "math500", "humaneval"] + names
        data_dir = str(BENCHMARKS)
    problems = mixed_problems(toyworld, random.Random(0))
    con = db_with(problems)
    label_contamination(con, benchmarks=names, data_dir=data_dir)
    got = {pid: label[1:] for pid, label in labels(con).items() if label[0]}
    want = contamination_python(list(problems.items()), load_benchmarks(names, data_dir))
    assert got == want
    assert len(got) >= 10 and len(got) < len(problems)  # the set really mixes both kinds
    assert {"paraphrase"}.isdisjoint(got)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_every_alignment_of_an_exact_n_word_copy_is_found(toyworld, n):
    """The aligned-block prefilter is exact: a copy of exactly n benchmark words at any offset is found."""
    rng = random.Random(n)
    bench = read_jsonl(toyworld.test)
    filler = "zq xv wk jj qz vv kx zz yq".split()
    problems = {}
    for k in range(24):
        words = bench[k]["prompt"].split()
        start = rng.randrange(len(words) - n + 1)
        problems[f"p{k:02d}"] = " ".join(filler[:k % 9] + words[start:start + n] + filler[:3])
    con = db_with(problems)
    names = [f"toy={toyworld.test}"]
    label_contamination(con, benchmarks=names, data_dir=None, ngram=n)
    got = {pid: label[1:] for pid, label in labels(con).items() if label[0]}
    assert got == contamination_python(list(problems.items()), load_benchmarks(names, None), n)
    if n >= 5:  # long enough to be specific: each copy is found (in its own or an identical problem)
        assert set(got) == set(problems)
