"""The quality and form signals on an in-memory database (tables standing in for the views)."""

import math

import duckdb
import pytest

from filter import labels
from filter.store import prompt_scripts


@pytest.fixture
def con():
    con = duckdb.connect()
    labels.create_macros(con)
    con.execute("""CREATE TABLE traces (trace_id VARCHAR, problem_id VARCHAR, reasoning VARCHAR, content VARCHAR,
                   finish_reason VARCHAR, completion_tokens INTEGER, reasoning_tokens INTEGER, error VARCHAR)""")
    con.execute("CREATE TABLE problems (problem_id VARCHAR, scripts VARCHAR)")
    con.execute("INSERT INTO problems VALUES ('en', ''), ('zh', ?)", [prompt_scripts("小明有3个苹果 x+y")])
    con.execute("""CREATE TABLE logprobs (trace_id VARCHAR, token_ids INTEGER[], logprobs FLOAT[],
                   top_ids INTEGER[][], top_logprobs FLOAT[][], file VARCHAR)""")
    return con


def _add(con, trace_id, problem, reasoning, content="\\boxed{1}", finish="stop", tokens=100, reasoning_tokens=None):
    con.execute("INSERT INTO traces VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                [trace_id, problem, reasoning, content, finish, tokens, reasoning_tokens])


def test_prompt_scripts():
    assert prompt_scripts("Ada has 3 apples, θ = π/2, ∑ x_i") == ""  # Latin, Greek and symbols
    assert prompt_scripts("小明有3个苹果") == "\\p{Han}"
    assert prompt_scripts("Сколько яблок? りんご") == "\\p{Cyrillic}\\p{Hiragana}"


def test_repetition_and_language_mixing(con):
    _add(con, "plain", "en", " ".join(f"word{i}" for i in range(100)))
    _add(con, "loop", "en", "I add seven and get twelve " * 30)
    _add(con, "greek", "en", "Let θ be the angle and π the constant; then θ = π/2. " * 3)
    _add(con, "zh_in_en", "en", "First add the apples. 然后我们把它们加起来得到答案")
    _add(con, "zh_in_zh", "zh", "然后我们把它们加起来得到答案 so x = 3")
    assert labels.label_quality(con, ngram=8) == 5
    q = {r[0]: r[1:] for r in con.execute("SELECT trace_id, repetition, language_mixing FROM quality").fetchall()}
    assert q["plain"][0] < 0.01 and q["loop"][0] > 0.9
    assert q["greek"][1] == 0.0 and q["zh_in_zh"][1] == 0.0
    letters_zh, letters_en = 14, len("Firstaddtheapples") + len("boxed")
    assert q["zh_in_en"][1] == pytest.approx(letters_zh / (letters_zh + letters_en))
    assert labels.label_quality(con, ngram=8) == 0  # labeled once


def test_confidence_from_logprobs_with_a_repeated_sampled_token(con):
    _add(con, "t", "en", "some reasoning")
    # two positions; vLLM lists the sampled token (id 5) again inside the top-k
    con.execute("INSERT INTO logprobs VALUES ('t', [5, 6], [-0.5, -2.0], [[5, 5, 7], [6, 8, 9]], "
                "[[-0.5, -0.5, -1.5], [-2.0, -0.1, -5.0]], 'p')")
    labels.label_quality(con, ngram=8)
    mean, low, entropy, n = con.execute(
        "SELECT mean_logprob, min_logprob, mean_entropy, logprob_tokens FROM quality").fetchall()[0]

    def h(lps):  # top-k plus the left-over mass as one bucket, renormalized when above 1
        ps = [math.exp(x) for x in lps]
        total = sum(ps)
        rest = max(0.0, 1 - total)
        return -sum(p / max(total, 1) * math.log(p / max(total, 1)) for p in ps) - (rest * math.log(rest) if rest else 0)

    assert (mean, low, n) == (pytest.approx(-1.25), -2.0, 2)
    assert entropy == pytest.approx((h([-0.5, -1.5]) + h([-2.0, -0.1, -5.0])) / 2, rel=1e-5)


def test_form(con):
    _add(con, "ok", "en", "think", "\\boxed{1}", tokens=30)
    _add(con, "cut", "en", "think think", None, finish="length")
    _add(con, "stray", "en", "think", "</think> \\boxed{1}")
    _add(con, "bare", "en", None, "\\boxed{1}")
    _add(con, "api", "en", "abc", "d", tokens=50, reasoning_tokens=45)
    assert labels.label_form(con) == 5
    f = {r[0]: r[1:] for r in con.execute(
        "SELECT trace_id, has_reasoning, think_closed, has_answer, reasoning_tokens, answer_tokens FROM form").fetchall()}
    assert f["ok"] == (True, True, True, 11, 19)  # 30 tokens split 5 : 9 by characters (an estimate)
    assert f["cut"][:3] == (True, False, False)
    assert f["stray"][:3] == (True, False, True)
    assert f["bare"][:3] == (False, False, True)
    assert f["api"][3:] == (45, 5)  # the API's count wins over the estimate
