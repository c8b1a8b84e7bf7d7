"""Selection policies applied, in this order, to the traces the rules kept (the `curated` view):

    max_per_problem k   at most k traces per problem: the shortest (completion tokens) or the most confident
                        (mean sampled-token logprob; traces without logprobs last)
    balance_difficulty  equal counts per difficulty level: max_per_difficulty each, else as many as the
                        smallest level has (traces without a difficulty are one more level)
    token_budget        traces in seeded random order while their completion tokens add up to the budget

Ties and random picks use md5(trace_id, seed), so a selection is the same on every run and machine.
The result is table `selected(trace_id)`; each step's row count goes into the funnel.
"""

from filter.config import FilterConfig


def select(con, cfg: FilterConfig) -> list[dict]:
    con.execute("""
        CREATE OR REPLACE TEMP TABLE pool AS
        SELECT trace_id, problem_id, difficulty, coalesce(completion_tokens, 0) AS tokens, mean_logprob,
               md5(trace_id || ':' || ?) AS shuffle
        FROM curated""", [str(cfg.seed)])
    steps = []
    if cfg.max_per_problem:
        order = "tokens ASC" if cfg.select_by == "shortest" else "mean_logprob DESC NULLS LAST"
        _keep(con, f"row_number() OVER (PARTITION BY problem_id ORDER BY {order}, shuffle) <= {cfg.max_per_problem}")
        steps.append(_step(con, f"max_per_problem={cfg.max_per_problem} ({cfg.select_by})"))
    if cfg.balance_difficulty or cfg.max_per_difficulty:
        cap = cfg.max_per_difficulty or con.execute(
            "SELECT coalesce(min(n), 0) FROM (SELECT count(*) AS n FROM pool GROUP BY difficulty)").fetchall()[0][0]
        _keep(con, f"row_number() OVER (PARTITION BY difficulty ORDER BY shuffle) <= {int(cap)}")
        steps.append(_step(con, f"balance_difficulty (at most {cap} per level)"))
    if cfg.token_budget:
        _keep(con, f"sum(tokens) OVER (ORDER BY shuffle ROWS UNBOUNDED PRECEDING) <= {cfg.token_budget}")
        steps.append(_step(con, f"token_budget={cfg.token_budget:,}"))
    con.execute("CREATE OR REPLACE TABLE selected AS SELECT trace_id FROM pool ORDER BY shuffle")
    con.execute("DROP TABLE pool")
    return steps


def _keep(con, condition: str) -> None:
    con.execute(f"CREATE OR REPLACE TEMP TABLE pool AS SELECT * FROM pool QUALIFY {condition}")


def _step(con, name: str) -> dict:
    return {"step": name, "rows": con.execute("SELECT count(*) FROM pool").fetchall()[0][0]}
