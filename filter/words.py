"""Words of a text for the filter's n-gram checks (contamination, near duplicates), computed inside DuckDB.

    from filter.words import word_function, words_sql
    with word_function(con):
        con.sql(f"SELECT problem_id, {words_sql('prompt')} AS w FROM problems")

A word is a maximal run of letters, digits and `_` of the lowercased text: Python's
`re.findall(r"\\w+", text.lower())`, so case, punctuation, LaTeX braces and line breaks never matter.
`_word_text` is a vectorized (Arrow) function that DuckDB calls on its batches: for ASCII text, which is
nearly all of it, one `bytes.translate` over the batch's whole data buffer lowercases and blanks every
non-word byte (row offsets unchanged), and DuckDB splits on the blanks; other rows go through the regex.
DuckDB's own `regexp_extract_all(lower(text), '[\\pL\\pN_]+')` gives the same words about 5x slower here (it
allocates per match) and agrees with Python's `\\w` only up to Unicode corner cases.
"""

import re
from contextlib import contextmanager

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

WORD_PY = re.compile(r"\w+")
VERSION = "words-v2"  # part of every fingerprint of derived data: bump when the definition changes
# bytes.translate table for ASCII text: A-Z -> a-z, every byte \w does not match -> a blank
_ASCII = bytes(c + 32 if 65 <= c <= 90 else c if c >= 128 or WORD_PY.fullmatch(chr(c)) else 32 for c in range(256))


def words(text: str) -> list[str]:
    """The same words in plain Python (references and tests)."""
    return WORD_PY.findall(text.lower())


def words_sql(text: str) -> str:
    """SQL for the word list (VARCHAR[]) of the expression `text`; needs word_function(con) active."""
    return f"list_filter(string_split(_word_text({text}), ' '), lambda x: x <> '')"


@contextmanager
def word_function(con: duckdb.DuckDBPyConnection):
    """`_word_text` registered on the connection for the `with` block (a connection holds one at a time)."""
    con.create_function("_word_text", _word_text, ["VARCHAR"], "VARCHAR", type="arrow")
    try:
        yield
    finally:
        con.remove_function("_word_text")


def _word_text(text: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each text's words, separated by one or more blanks (Arrow strings in and out, nulls kept)."""
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    if not pa.types.is_string(text.type):
        text = text.cast(pa.string())
    validity, offsets, data = text.buffers()
    if data is None:  # only empty strings or nulls
        return text
    blanked = pa.py_buffer(data.to_pybytes().translate(_ASCII))
    out = pa.StringArray.from_buffers(len(text), offsets, blanked, validity, text.null_count, text.offset)
    ascii_rows = pc.string_is_ascii(text)
    if pc.all(ascii_rows).as_py() is not False:
        return out
    other = [None if is_ascii or t is None else " ".join(words(t))
             for is_ascii, t in zip(ascii_rows.to_pylist(), text.to_pylist(), strict=True)]
    return pc.if_else(ascii_rows, out, pa.array(other, pa.string()))
