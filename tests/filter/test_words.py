"""filter/words.py: the DuckDB word splitter equals Python's `re.findall(r"\\w+", text.lower())` on ASCII and
non-ASCII text, nulls and empty strings, across DuckDB's batches (sliced Arrow arrays included).

    .venv/bin/python -m pytest -q tests/filter/test_words.py
"""

import random

import duckdb
import pyarrow as pa

from filter.words import _word_text, word_function, words, words_sql

TEXTS = [
    "What is 2+2?", "  Leading,  trailing.  ", "", "Ünïcode – naïve’s café, ÉCOLE", "x^{2}+\\frac{a_1}{b}",
    "tab\tnew\nline\r\nend", "İstanbul ΣΟΦΙΑ 東京 3.14", "___", "!!!", "MiXeD CaSe_Words 42",
]


def test_words_in_duckdb_equal_the_python_definition():
    rng = random.Random(0)
    alphabet = "abcXYZ019_ .,;:!?()[]{}$\\^\"'\n\t-+=*/<>|&%#@~`éß’–東"
    texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(60))) for _ in range(5000)]
    con = duckdb.connect()
    con.register("t", pa.table({"i": range(len(texts) + 1), "text": [*texts, None]}))
    with word_function(con):
        got = dict(con.execute(f"SELECT i, {words_sql('text')} FROM t").fetchall())  # several batches of 2,048
    assert got.pop(len(texts)) is None
    assert got == {i: words(t) for i, t in enumerate(texts)}
    assert words(TEXTS[3]) == ["ünïcode", "naïve", "s", "café", "école"]  # ’ and – separate words


def test_sliced_and_chunked_arrays_keep_their_rows():
    arr = pa.array(["A b", "c,D", "é f", None, "g"])
    for piece in (arr.slice(1, 3), pa.chunked_array([arr.slice(0, 2), arr.slice(2)])):
        rows = piece.to_pylist()
        assert [None if t is None else t.split() for t in _word_text(piece).to_pylist()] == [
            None if t is None else words(t) for t in rows]


def test_the_function_is_registered_only_inside_the_block():
    con = duckdb.connect()
    with word_function(con):
        assert con.execute(f"SELECT {words_sql(repr('Hi, there'))}").fetchall() == [(["hi", "there"],)]
    with word_function(con):  # registering again works: the block removed it
        pass
    try:
        con.execute("SELECT _word_text('x')")
    except duckdb.CatalogException:
        pass
    else:
        raise AssertionError("_word_text is still registered after the block")
