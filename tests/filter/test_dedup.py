"""Duplicate problems: exact variants cluster, a one-word edit is a near duplicate, a different problem is not,
and a rerun labels only new problems against the old representatives.

    .venv/bin/python -m pytest -q tests/filter/test_dedup.py
"""

import duckdb
import pytest

from filter.dedup import label_duplicates

LONG = ("A farmer has 120 apples and wants to pack them into boxes that each hold exactly 8 apples. After packing, "
        "he sells every box at the market for 15 dollars, but he must pay a fee of 2 dollars per box to the "
        "market owner. How much money does he earn in total?")  # 52 words
ONE_WORD_CHANGED = LONG.replace("farmer", "gardener")
OTHER = ("Lena reads 12 pages of her novel every weekday and twice as many on each weekend day. The novel has 300 "
         "pages. How many full weeks does she need to finish it, and how many pages are left over?")


def problems_db(rows: dict[str, str], path=None) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(path) if path else ":memory:")
    con.execute("CREATE TABLE IF NOT EXISTS problems (problem_id VARCHAR PRIMARY KEY, prompt VARCHAR)")
    add(con, rows)
    return con


def add(con, rows: dict[str, str]) -> None:
    con.executemany("INSERT INTO problems VALUES (?, ?)", list(rows.items()))


def labels(con) -> dict[str, dict]:
    cur = con.execute("SELECT * FROM dup_problems ORDER BY problem_id")
    names = [d[0] for d in cur.description]
    return {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}


def representative(label: dict) -> str:
    return label["near_of"] or label["exact_of"] or label["problem_id"]


def test_exact_variants_cluster_with_one_representative():
    con = problems_db({
        "p1": "What is 12 plus 30?",
        "p0": "what  is 12 plus 30",  # case, whitespace, punctuation: the same problem
        "p2": "WHAT IS 12 PLUS 30 ?!",
        "p3": "What is 12 plus 31?",  # a different number is a different problem
    })
    assert label_duplicates(con) == 4
    got = labels(con)
    assert got["p0"]["representative"] and got["p0"]["exact_of"] is None
    assert got["p1"]["exact_of"] == got["p2"]["exact_of"] == "p0"  # the first id is the representative
    assert not got["p1"]["representative"] and got["p1"]["jaccard"] == 1.0
    assert got["p1"]["norm_hash"] == got["p0"]["norm_hash"] != got["p3"]["norm_hash"]
    assert got["p3"]["representative"]
    clusters = {}
    for label in got.values():
        clusters.setdefault(representative(label), []).append(label)
    for rep, members in clusters.items():
        assert [m["problem_id"] for m in members if m["representative"]] == [rep]  # exactly one per cluster


def test_near_duplicate_found_and_unrelated_not():
    con = problems_db({"a": LONG, "b": ONE_WORD_CHANGED, "c": OTHER})
    label_duplicates(con, threshold=0.8)
    got = labels(con)
    assert got["a"]["representative"]
    assert got["b"]["near_of"] == "a" and not got["b"]["representative"] and got["b"]["exact_of"] is None
    assert 0.8 <= got["b"]["jaccard"] < 1.0  # true Jaccard of the 5-gram sets: 43/53 = 0.81
    assert got["c"]["representative"] and got["c"]["near_of"] is None


def test_rerun_labels_only_new_rows_and_links_to_the_old_representative(tmp_path):
    db = tmp_path / "curation.duckdb"
    con = problems_db({"m": LONG, "x": OTHER}, db)
    assert label_duplicates(con) == 2
    before = labels(con)
    con.close()

    con = duckdb.connect(str(db))  # a later run: a fresh connection, the index comes from the database
    add(con, {"a_near": ONE_WORD_CHANGED, "a_exact": LONG.upper(), "z_new": "Compute 7 times 8."})
    assert label_duplicates(con) == 3
    got = labels(con)
    assert {k: got[k] for k in before} == before  # old labels untouched ("m" stays the representative)
    assert got["a_near"]["near_of"] == "m" and not got["a_near"]["representative"]  # sorts before "m"
    assert got["a_exact"]["exact_of"] == "m" and not got["a_exact"]["representative"]
    assert got["z_new"]["representative"]
    assert label_duplicates(con) == 0  # nothing new: nothing labeled
    assert con.execute("SELECT count(*) FROM dup_signatures").fetchall()[0][0] == 3  # representatives only


def test_changed_settings_rehash_old_representatives(tmp_path):
    con = problems_db({"m": LONG})
    label_duplicates(con, num_perm=64)
    add(con, {"n": ONE_WORD_CHANGED})
    assert label_duplicates(con, num_perm=128) == 1
    assert labels(con)["n"]["near_of"] == "m"
    assert con.execute("SELECT DISTINCT len(signature) FROM dup_signatures").fetchall() == [(128,)]


@pytest.mark.parametrize("threshold", [0, 1.5])
def test_bad_threshold_is_named(threshold):
    with pytest.raises(ValueError, match="threshold"):
        label_duplicates(problems_db({"a": "x"}), threshold=threshold)
