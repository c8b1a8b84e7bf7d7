"""Benchmark contamination: word n-gram overlap of every problem with every eval benchmark, in DuckDB.

    from filter.contamination import label_contamination
    label_contamination(con, benchmarks=["gsm8k", "math500", "toy"], data_dir="../shared/benchmarks", ngram=8)

A problem is contaminated when one of its word n-grams (8 by default, as open-r1's decontamination) is an
n-gram of a benchmark problem's prompt; words as filter/words.py splits them (lowercased runs of `\\w`), so
case, punctuation, LaTeX braces and line breaks never hide a copy. Benchmarks are loaded with evals'
`load_benchmark` (`data_dir`: local copies in evals' layout; None: the pinned hub sets); an entry `name=path`
names a custom Problem file, and `toy` defaults to evals' toy path.

How (in DuckDB): each text becomes its word list, an n-gram is `hash(w[i], ..., w[i+n-1])` (UBIGINT).
Every n consecutive words contain a whole aligned block of m = (n+1)//2 words (words 1..m, m+1..2m, ...),
so only the problem's aligned blocks are hashed first and looked up among the benchmarks' m-grams; the
n-grams around the blocks that hit are joined to the benchmark n-grams on the hash, and every hit is
confirmed on the n-gram's text. Exact: the same answer as hashing every n-gram (see contamination_python).
When several match, the label names the first benchmark in list order, then its earliest problem (load
order), then the n-gram earliest in the problem. The benchmark n-grams (`benchmark_ngrams`, with their text)
and m-grams (`benchmark_blocks`) are cached in the database, keyed by benchmark, n and a fingerprint of the
benchmark's source (evals' `benchmark_source`: a local file's sha256, a pinned hub revision), so a rerun does
not even parse the benchmarks; they are rebuilt when the data changes (a hub set without a pinned revision is
loaded every time and fingerprinted by its problems). `contamination` has one row per problem (clean:
contaminated false and nulls) and records what it was checked against (`checked_against`); a rerun labels
the problems that are new or were checked against another benchmark list, data or n, and nothing else.
"""

import hashlib
import json
import logging

import duckdb
import pyarrow as pa

from evals.benchmarks import Benchmark, benchmark_source, load_benchmark
from filter.store import transaction
from filter.words import VERSION as WORDS_VERSION
from filter.words import word_function, words, words_sql

log = logging.getLogger(__name__)

NGRAMS_VERSION = "ngrams-v2"  # in the fingerprints: bump when the n-gram definition or the way evals reads a
# benchmark's prompts changes
TOY_PATH = "cache/toyworld/problems/test.jsonl"  # evals' default for `toy` (evals/config.py TOY_PATH)

CONTAMINATION = """CREATE TABLE IF NOT EXISTS contamination (problem_id VARCHAR PRIMARY KEY, contaminated BOOLEAN,
    benchmark VARCHAR, benchmark_problem_id VARCHAR, matched_ngram VARCHAR, checked_against VARCHAR)"""
BENCHMARK_NGRAMS = """CREATE TABLE IF NOT EXISTS benchmark_ngrams (benchmark VARCHAR, n INTEGER,
    fingerprint VARCHAR, problem_index INTEGER, benchmark_problem_id VARCHAR, ngram_hash UBIGINT, ngram VARCHAR)"""
BENCHMARK_BLOCKS = """CREATE TABLE IF NOT EXISTS benchmark_blocks (benchmark VARCHAR, n INTEGER, fingerprint VARCHAR,
    block_hash UBIGINT)"""
BENCHMARK_CACHED = """CREATE TABLE IF NOT EXISTS benchmark_cached (benchmark VARCHAR, n INTEGER, fingerprint VARCHAR,
    problems INTEGER, source VARCHAR)"""  # one row per (benchmark, n) whose n-grams and blocks are cached


def label_contamination(con: duckdb.DuckDBPyConnection, *, benchmarks: list[str], data_dir: str | None,
                        ngram: int = 8) -> int:
    """Label the problems not checked against these benchmarks yet (see the module docstring); returns how many."""
    if ngram < 1:
        raise ValueError(f"contamination: ngram must be >= 1, got {ngram}")
    con.execute(CONTAMINATION)
    con.execute("ALTER TABLE contamination ADD COLUMN IF NOT EXISTS checked_against VARCHAR")  # older databases
    con.execute(BENCHMARK_NGRAMS)
    con.execute(BENCHMARK_BLOCKS)
    con.execute(BENCHMARK_CACHED)
    specs = [_spec(s) for s in benchmarks]
    loaded = {}  # name -> Benchmark, for those only loading can fingerprint
    sets = []  # (name, fingerprint), in list order
    for name, custom in specs:
        source = benchmark_source(name, data_dir, custom)
        if source is None:
            loaded[name] = load_benchmark(name, data_dir=data_dir, custom=custom)
        sets.append((name, _source_fingerprint(name, source, ngram) if source
                      else _content_fingerprint(loaded[name], ngram)))
    checked = hashlib.sha256(json.dumps([ngram, sets]).encode()).hexdigest()[:16]
    # The problems to label, as Arrow batches: DuckDB scans those in parallel, where a temporary table of fewer
    # than 122,880 rows (one row group) is scanned by one thread (measured: 1.6x slower on 2 cores).
    todo_rows = con.sql("""SELECT problem_id AS id, coalesce(prompt, '') AS text FROM problems
        ANTI JOIN (SELECT problem_id FROM contamination WHERE checked_against = ?) USING (problem_id)""",
                        params=[checked]).to_arrow_table()
    con.register("_contam_todo", pa.Table.from_batches(todo_rows.to_batches(max_chunksize=8192), todo_rows.schema))
    todo = len(todo_rows)
    if todo:
        with word_function(con), transaction(con):
            for (name, custom), (_, fp) in zip(specs, sets, strict=True):
                if not _cached(con, name, fp, ngram):
                    bench = loaded.get(name) or load_benchmark(name, data_dir=data_dir, custom=custom)
                    _cache_benchmark_ngrams(con, bench, fp, ngram)
            _label(con, sets, ngram, checked)
        found = con.execute("""SELECT benchmark, count(*) FROM contamination WHERE problem_id IN
            (SELECT id FROM _contam_todo) AND contaminated GROUP BY 1 ORDER BY 1""").fetchall()
        log.info("contamination: %d problems checked against %s (%d-grams): %s", todo,
                 ", ".join(name for name, _ in sets), ngram,
                 ", ".join(f"{n} from {name}" for name, n in found) or "none contaminated")
    con.unregister("_contam_todo")
    return todo


def load_benchmarks(specs: list[str], data_dir: str | None) -> list[Benchmark]:
    """`name` (evals' public sets, `toy`) or `name=path` (a custom Problem file), in list order."""
    return [load_benchmark(name, data_dir=data_dir, custom=custom) for name, custom in map(_spec, specs)]


def _spec(spec: str) -> tuple[str, dict | None]:
    """`name` or `name=path` -> (name, evals' `custom` mapping or None)."""
    name, _, path = spec.partition("=")
    return name, {name: path or TOY_PATH} if path or name == "toy" else None


def _source_fingerprint(name: str, source: str, n: int) -> str:
    """Changes when the benchmark's source (file contents, pinned revision), n, or the tokenization change."""
    return hashlib.sha256(json.dumps([WORDS_VERSION, NGRAMS_VERSION, n, name, source]).encode()).hexdigest()[:16]


def _content_fingerprint(bench: Benchmark, n: int) -> str:
    """Changes when the benchmark's ids or prompts, n, or the tokenization change (for sources that
    `benchmark_source` cannot key)."""
    data = json.dumps([WORDS_VERSION, NGRAMS_VERSION, n, bench.name, [[p["id"], p["prompt"]] for p in bench.problems]])
    return hashlib.sha256(data.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- DuckDB


def _block(n: int) -> int:
    """Every n consecutive words contain one whole aligned block (words 1..m, m+1..2m, ...) of this size."""
    return (n + 1) // 2


def _grams(source: str, n: int, step: int = 1) -> str:
    """SQL: (id, pos, h) for the word n-grams of `source(id, w)` starting at every step-th word (pos 1-based)."""
    starts = f"range(1, len(w) - {n - 2}, {step})"
    args = ", ".join(f"w[i + {k}]" for k in range(n))
    return f"SELECT id, unnest({starts}) AS pos, unnest(list_transform({starts}, lambda i: hash({args}))) AS h " \
           f"FROM {source}"


def _words(source: str, columns: str = "id") -> str:
    """SQL: `columns` and w, the word list of `text`, from `source`."""
    return f"SELECT {columns}, {words_sql('text')} AS w FROM {source}"


def _cached(con, name: str, fp: str, n: int) -> bool:
    return con.execute("SELECT count(*) FROM benchmark_cached WHERE benchmark = ? AND n = ? AND fingerprint = ?",
                       [name, n, fp]).fetchall()[0][0] > 0


def _cache_benchmark_ngrams(con, bench: Benchmark, fp: str, n: int) -> None:
    """(Re)build this benchmark's rows of `benchmark_ngrams` (and of `benchmark_blocks`, its m-grams for the
    prefilter)."""
    for table in ("benchmark_ngrams", "benchmark_blocks", "benchmark_cached"):
        con.execute(f"DELETE FROM {table} WHERE benchmark = ? AND n = ?", [bench.name, n])
    con.register("_contam_bench", pa.table({
        "id": pa.array(range(len(bench.problems)), pa.int32()),
        "problem_id": [p["id"] for p in bench.problems],
        "text": [p["prompt"] or "" for p in bench.problems]}))
    con.execute(f"CREATE OR REPLACE TEMP TABLE _contam_bench_words AS {_words('_contam_bench', 'id, problem_id')}")
    con.unregister("_contam_bench")
    con.execute(f"""INSERT INTO benchmark_ngrams
        SELECT ?, {n}, ?, g.id, any_value(b.problem_id), g.h, arg_min(array_to_string(b.w[g.pos:g.pos + {n - 1}], ' '),
                                                                     g.pos)
        FROM ({_grams('_contam_bench_words', n)}) g JOIN _contam_bench_words b USING (id)
        GROUP BY g.id, g.h""", [bench.name, fp])
    long_enough = f"(SELECT * FROM _contam_bench_words WHERE len(w) >= {n})"  # their m-grams are in n-grams
    con.execute(f"INSERT INTO benchmark_blocks SELECT DISTINCT ?, {n}, ?, h FROM ({_grams(long_enough, _block(n))})",
                [bench.name, fp])
    con.execute("DROP TABLE _contam_bench_words")
    con.execute("INSERT INTO benchmark_cached VALUES (?, ?, ?, ?, ?)", [bench.name, n, fp, len(bench.problems),
                                                                       bench.source])
    rows = con.execute("SELECT count(*) FROM benchmark_ngrams WHERE benchmark = ? AND n = ?",
                       [bench.name, n]).fetchall()[0][0]
    log.info("contamination: cached %d %d-grams of %s (%d problems, %s)", rows, n, bench.name,
             len(bench.problems), bench.source)


def _label(con, sets: list[tuple[str, str]], n: int, checked: str) -> None:
    """One row per problem of _contam_todo: the first confirmed match (module docstring), or clean."""
    con.register("_contam_sets", pa.table({"benchmark": [s[0] for s in sets], "fingerprint": [s[1] for s in sets],
                                           "ord": pa.array(range(len(sets)), pa.int32())}))
    # DuckDB underestimates unnested lists and would build its hash tables on the problems' (millions of)
    # blocks and n-grams instead of on the benchmark's: several times slower. Keep the sides as written.
    saved = con.execute("SELECT current_setting('disabled_optimizers')").fetchall()[0][0]
    con.execute("SET disabled_optimizers = ?", [",".join(o for o in (saved, "build_side_probe_side") if o)])
    try:
        _find_matches(con, n)
    finally:
        con.execute("SET disabled_optimizers = ?", [saved])
    con.execute("DELETE FROM contamination WHERE problem_id IN (SELECT id FROM _contam_todo)")
    con.execute("""INSERT INTO contamination
        SELECT t.id, f.id IS NOT NULL, f.benchmark, f.benchmark_problem_id, f.ngram, ?
        FROM _contam_todo t LEFT JOIN _contam_found f USING (id)""", [checked])
    con.execute("DROP TABLE _contam_found")
    con.unregister("_contam_sets")


def _find_matches(con, n: int) -> None:
    """_contam_found: per problem of _contam_todo, its first confirmed match (module docstring).

    Prefilter: a shared n-gram contains one of the problem's aligned m-word blocks, which is then an m-gram
    of the benchmark; only the n-grams around such blocks are hashed (a quarter of the blocks' work, and
    about 4% of the blocks hit on math problems against GSM8K + MATH-500). The hash matches are confirmed
    on the n-gram's text with the words of only the matched problems split again: joins that carry word
    lists are what costs here."""
    m = _block(n)
    starts = f"range(1, len(w) - {m - 2}, {m})"
    block = ", ".join(f"w[i + {k}]" for k in range(m))
    gram = ", ".join(f"w[pos + {k}]" for k in range(n))
    con.execute(f"""CREATE OR REPLACE TEMP TABLE _contam_found AS
        WITH sets AS (SELECT * FROM _contam_sets),
        bench AS (SELECT b.*, s.ord FROM benchmark_ngrams b JOIN sets s USING (benchmark, fingerprint)
                  WHERE b.n = {n}),
        blocks AS (SELECT k.block_hash FROM benchmark_blocks k JOIN sets s USING (benchmark, fingerprint)
                   WHERE k.n = {n}),
        words AS ({_words('_contam_todo')}),  -- (no len(w) >= n filter: DuckDB would split twice)
        hit_blocks AS (SELECT * FROM (SELECT id, w, unnest({starts}) AS block,
                                             unnest(list_transform({starts}, lambda i: hash({block}))) AS h FROM words)
                       WHERE h IN (SELECT block_hash FROM blocks)),
        windows AS (SELECT id, w, unnest(range(greatest(1, block - {n - m}), least(block, len(w) - {n - 1}) + 1)) AS pos
                    FROM hit_blocks),  -- the n-grams around a hit block (a window next to two hits comes twice)
        hits AS (SELECT id, pos, hash({gram}) AS h FROM windows),
        matched AS (SELECT h.id, h.pos, b.ord, b.problem_index, b.benchmark, b.benchmark_problem_id, b.ngram
                    FROM hits h JOIN bench b ON b.ngram_hash = h.h),
        matched_words AS ({_words('(SELECT * FROM _contam_todo WHERE id IN (SELECT id FROM matched))')})
        SELECT m.* FROM matched m JOIN matched_words x USING (id)
        WHERE array_to_string(x.w[m.pos:m.pos + {n - 1}], ' ') = m.ngram  -- a hash collision is not a match
        QUALIFY row_number() OVER (PARTITION BY m.id ORDER BY m.ord, m.problem_index, m.pos) = 1""")


# ----------------------------------------------------------------------------- the plain-Python reference


def contamination_python(problems: list[tuple[str, str]], benchmarks: list[Benchmark],
                         n: int = 8) -> dict[str, tuple[str, str, str]]:
    """The same check the straightforward way (open-r1's decontaminate.py: a lookup of benchmark n-grams, a
    loop over each problem's n-grams): problem_id -> (benchmark, benchmark_problem_id, n-gram) of the
    contaminated ones, chosen like label_contamination. For tests and the benchmark."""
    lookup: dict[str, tuple[int, int, str, str]] = {}
    for order, bench in enumerate(benchmarks):
        for index, p in enumerate(bench.problems):
            for gram in _ngrams(p["prompt"] or "", n):
                lookup.setdefault(gram, (order, index, bench.name, p["id"]))  # first = smallest (order, index)
    found = {}
    for problem_id, prompt in problems:
        best = None
        for gram in _ngrams(prompt or "", n):
            hit = lookup.get(gram)
            if hit and (best is None or hit[:2] < best[0][:2]):
                best = (hit, gram)
        if best:
            found[problem_id] = (best[0][2], best[0][3], best[1])
    return found


def _ngrams(text: str, n: int) -> list[str]:
    w = words(text)
    return [" ".join(w[i:i + n]) for i in range(len(w) - n + 1)]
