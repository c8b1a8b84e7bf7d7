"""Label tables, one per signal, keyed by trace_id (problem-level ones by problem_id), and the `signals` view.

Each label is computed once per trace: a rerun labels only the trace_ids a table does not hold yet (traces
whose request failed get no labels; their successful retry is new). `agreement` is per trace but depends on
the problem's other samples, so it is recomputed for every problem that got a new trace.

    verified       filter/verify.py (the evals graders)
    form           finish_reason; has_reasoning; think_closed (reasoning present, an answer after it, no
                   <think>/</think> left in either part); has_answer; reasoning/answer tokens (the API's
                   reasoning_tokens when given, else completion_tokens split in proportion to characters)
    quality        repetition: share of the trace's word n-grams (n = repetition_ngram, reasoning + answer)
                   that repeat an earlier one (0 = none, ~1 = a loop);
                   language_mixing: share of letters in scripts the prompt does not use (Latin, Greek and
                   Unicode's Common/Inherited letters always count as the prompt's: formulas and code);
                   from the logprobs table, when the trace has a row there: mean_logprob and min_logprob of
                   the sampled tokens, mean_entropy (nats) of each position's top-k: the top-k probabilities
                   (each token once; vLLM may list the sampled token twice) plus one bucket with the mass left
                   over, renormalized when half-precision rounding makes the top-k sum above 1. The bucket makes
                   it a lower bound of the full distribution's entropy.
    agreement      answer_key (the extracted answer, lowercased, spaces/$/thousands commas removed; code: a hash
                   of the code with whitespace collapsed); agreement = share of the problem's graded samples with
                   this answer_key (itself included; 0 without an answer); n_samples; pass_rate = the problem's
                   share of correct samples (null when unverifiable)
    signals        also model_pass_rate: the pass rate of the trace's own teacher (`model`) on its problem, so traces
                   of several teachers in one run directory can be compared and chosen per teacher
    dup_problems   filter/dedup.py (per problem)
    contamination  filter/contamination.py (per problem)
"""

import logging

log = logging.getLogger(__name__)

WS = "' ' || chr(9) || chr(10) || chr(13)"
MACROS = f"""
CREATE OR REPLACE MACRO strip(s) AS trim(coalesce(s, ''), {WS});
CREATE OR REPLACE MACRO topk_probs(ids, lps) AS
    list_transform(list_distinct(list_zip(ids, lps)), lambda e: exp(e[2]::DOUBLE));
CREATE OR REPLACE MACRO entropy_of(ps, total) AS
    - list_sum(list_transform(ps, lambda p: CASE WHEN p > 0 THEN p / greatest(total, 1.0) * ln(p / greatest(total, 1.0))
                                         ELSE 0 END))
    - CASE WHEN total < 1 THEN (1 - total) * ln(1 - total) ELSE 0 END;
CREATE OR REPLACE MACRO topk_entropy(ids, lps) AS entropy_of(topk_probs(ids, lps), list_sum(topk_probs(ids, lps)));
CREATE OR REPLACE MACRO answer_key(domain, extracted) AS CASE
    WHEN extracted IS NULL THEN NULL
    WHEN domain = 'code' THEN md5(regexp_replace(trim(extracted), '\\s+', ' ', 'g'))
    ELSE regexp_replace(regexp_replace(lower(extracted), '\\s+|\\$|\\\\[,;!]|\\.$', '', 'g'),
                        '^(-?\\d{{1,3}}),(\\d{{3}})', '\\1\\2', 'g') END;
"""
DUP_TABLE = """CREATE TABLE IF NOT EXISTS dup_problems (problem_id VARCHAR PRIMARY KEY, norm_hash VARCHAR,
    exact_of VARCHAR, near_of VARCHAR, jaccard DOUBLE, representative BOOLEAN)"""
CONTAMINATION_TABLE = """CREATE TABLE IF NOT EXISTS contamination (problem_id VARCHAR PRIMARY KEY,
    contaminated BOOLEAN, benchmark VARCHAR, benchmark_problem_id VARCHAR, matched_ngram VARCHAR)"""
NEW = "error IS NULL AND trace_id NOT IN (SELECT trace_id FROM {table})"


def repetition_sql(words: str, n: int) -> str:
    """Share of repeated word n-grams: 1 - distinct / all. Each n-gram is hashed from its n words
    (hash(w[i], ..., w[i+n-1])): a list slice per position would make this quadratic in the trace length."""
    gram = ", ".join(f"{words}[i + {k}]" for k in range(n))
    return (f"CASE WHEN len({words}) < {n} THEN 0.0 ELSE 1 - len(list_distinct(list_transform("
            f"range(1, len({words}) - {n} + 2), lambda i: hash({gram})))) / (len({words}) - {n} + 1) END")


def create_macros(con) -> None:
    con.execute(MACROS)


def drop_labels(con) -> None:
    for table in ("verified", "form", "quality", "agreement", "problems", "dup_problems", "contamination"):
        con.execute(f"DROP TABLE IF EXISTS {table} CASCADE")


def label_form(con) -> int:
    con.execute("""CREATE TABLE IF NOT EXISTS form (trace_id VARCHAR PRIMARY KEY, finish_reason VARCHAR,
        has_reasoning BOOLEAN, think_closed BOOLEAN, has_answer BOOLEAN, reasoning_tokens INTEGER,
        answer_tokens INTEGER)""")
    before = _count(con, "form")
    con.execute(f"""
        INSERT INTO form
        WITH t AS (
            SELECT trace_id, finish_reason, completion_tokens, reasoning_tokens AS api_reasoning_tokens,
                   length(strip(reasoning)) AS r_chars, length(strip(content)) AS a_chars,
                   coalesce(reasoning LIKE '%<think>%' OR reasoning LIKE '%</think>%' OR content LIKE '%<think>%'
                            OR content LIKE '%</think>%', false) AS tags_left
            FROM traces WHERE {NEW.format(table="form")}),
        e AS (SELECT *, coalesce(api_reasoning_tokens,
                        round(completion_tokens * r_chars / greatest(r_chars + a_chars, 1))::INTEGER) AS r_tokens
              FROM t)
        SELECT trace_id, finish_reason, r_chars > 0, r_chars > 0 AND a_chars > 0 AND NOT tags_left, a_chars > 0,
               r_tokens, completion_tokens - r_tokens
        FROM e""")
    return _count(con, "form") - before


def label_quality(con, ngram: int) -> int:
    con.execute("""CREATE TABLE IF NOT EXISTS quality (trace_id VARCHAR PRIMARY KEY, repetition DOUBLE,
        language_mixing DOUBLE, mean_logprob DOUBLE, min_logprob DOUBLE, mean_entropy DOUBLE,
        logprob_tokens INTEGER)""")
    before = _count(con, "quality")
    con.execute(f"""
        INSERT INTO quality
        WITH t AS (
            SELECT t.trace_id, strip(t.reasoning) || chr(10) || strip(t.content) AS text, coalesce(p.scripts, '') AS scripts
            FROM traces t LEFT JOIN problems p USING (problem_id)
            WHERE t.{NEW.format(table="quality")}),
        s AS (
            SELECT trace_id, scripts, string_split_regex(strip(text), '\\s+') AS words,
                   length(regexp_replace(text, '\\P{{L}}', '', 'g')) AS letters,
                   regexp_replace(text, '[\\P{{L}}\\p{{Latin}}\\p{{Greek}}\\p{{Common}}\\p{{Inherited}}]', '', 'g')
                       AS foreign_letters
            FROM t),
        l AS (SELECT trace_id, any_value(logprobs) AS lp, any_value(top_ids) AS ti, any_value(top_logprobs) AS tl
              FROM logprobs WHERE trace_id IN (SELECT trace_id FROM t) GROUP BY trace_id)
        SELECT s.trace_id, {repetition_sql("words", int(ngram))},
               CASE WHEN foreign_letters = '' THEN 0
                    WHEN scripts = '' THEN length(foreign_letters)
                    ELSE length(regexp_replace(foreign_letters, '[' || scripts || ']', '', 'g')) END
                   / greatest(letters, 1),
               list_avg(l.lp), list_min(l.lp),
               list_avg(list_transform(list_zip(l.ti, l.tl), lambda pos: topk_entropy(pos[1], pos[2]))),
               len(l.lp)
        FROM s LEFT JOIN l USING (trace_id)""")
    return _count(con, "quality") - before


def label_agreement(con) -> int:
    """Recompute agreement for every problem that has a graded trace not in the table yet."""
    con.execute("""CREATE TABLE IF NOT EXISTS agreement (trace_id VARCHAR PRIMARY KEY, problem_id VARCHAR,
        answer_key VARCHAR, agreement DOUBLE, n_samples INTEGER, pass_rate DOUBLE)""")
    con.execute("""
        CREATE OR REPLACE TEMP TABLE changed AS
        SELECT DISTINCT t.problem_id FROM traces t JOIN verified v USING (trace_id)
        WHERE t.trace_id NOT IN (SELECT trace_id FROM agreement)""")
    changed = _count(con, "changed")
    con.execute("DELETE FROM agreement WHERE problem_id IN (SELECT problem_id FROM changed)")
    con.execute("""
        INSERT INTO agreement
        WITH s AS (
            SELECT t.trace_id, t.problem_id, v.verdict, answer_key(p.domain, v.extracted) AS key
            FROM traces t JOIN verified v USING (trace_id) LEFT JOIN problems p USING (problem_id)
            WHERE t.problem_id IN (SELECT problem_id FROM changed))
        SELECT trace_id, problem_id, key,
               CASE WHEN key IS NULL THEN 0.0
                    ELSE count(*) OVER (PARTITION BY problem_id, key) / count(*) OVER (PARTITION BY problem_id) END,
               count(*) OVER (PARTITION BY problem_id),
               avg(CASE WHEN verdict <> 'unverifiable' THEN (verdict = 'correct')::INTEGER END)
                   OVER (PARTITION BY problem_id)
        FROM s""")
    con.execute("DROP TABLE changed")
    return changed


def label_problems(con, cfg) -> dict:
    """Near-duplicate and contaminated problems (filter/dedup.py, filter/contamination.py)."""
    try:
        from filter.contamination import label_contamination
        from filter.dedup import label_duplicates
    except ModuleNotFoundError as e:  # TODO(lead): drop this guard once dedup/contamination are merged
        if e.name not in ("filter.dedup", "filter.contamination"):
            raise
        log.warning("%s is missing: problems are not checked for duplicates and contamination", e.name)
        con.execute(DUP_TABLE)
        con.execute(CONTAMINATION_TABLE)
        return {"dup_problems": 0, "contamination": 0}

    dups = label_duplicates(con, threshold=cfg.dedup_threshold, num_perm=cfg.dedup_num_perm,
                            shingle=cfg.dedup_shingle)
    contaminated = label_contamination(con, benchmarks=cfg.contamination_benchmarks, data_dir=cfg.benchmarks_dir,
                                       ngram=cfg.contamination_ngram)
    return {"dup_problems": dups, "contamination": contaminated}


def create_signals_view(con) -> None:
    """Every trace with every label, one row each: what rules and queries read."""
    con.execute("""
        CREATE OR REPLACE VIEW signals AS
        SELECT t.trace_id, t.problem_id, t.sample_index, t.model, p.domain, p.difficulty, t.error,
               t.finish_reason, t.completion_tokens, t.created_at,
               v.verdict, v.extracted, v.method AS extract_method, v.reason AS grade_reason,
               f.has_reasoning, f.think_closed, f.has_answer, f.reasoning_tokens, f.answer_tokens,
               q.repetition, q.language_mixing, q.mean_logprob, q.min_logprob, q.mean_entropy, q.logprob_tokens,
               a.answer_key, a.agreement, a.n_samples, a.pass_rate,
               avg(CASE WHEN v.verdict <> 'unverifiable' THEN (v.verdict = 'correct')::INTEGER END)
                   OVER (PARTITION BY t.problem_id, t.model) AS model_pass_rate,
               d.representative IS NOT NULL AND NOT d.representative AS duplicate,
               coalesce(d.exact_of, d.near_of) AS duplicate_of, d.jaccard AS duplicate_jaccard,
               coalesce(c.contaminated, false) AS contaminated, c.benchmark AS contaminated_benchmark,
               c.benchmark_problem_id AS contaminated_problem_id, c.matched_ngram
        FROM traces t
        LEFT JOIN problems p USING (problem_id)
        LEFT JOIN verified v USING (trace_id)
        LEFT JOIN form f USING (trace_id)
        LEFT JOIN quality q USING (trace_id)
        LEFT JOIN agreement a USING (trace_id)
        LEFT JOIN dup_problems d ON d.problem_id = t.problem_id
        LEFT JOIN contamination c ON c.problem_id = t.problem_id""")


def _count(con, table: str) -> int:
    return con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
