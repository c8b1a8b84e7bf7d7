"""Rules: SQL files whose name is their reject reason, and the funnel they make.

A rule is `<order>_<reason>.sql` (e.g. `060_unverified.sql`: reason `unverified`), holding one SELECT of
the trace_ids to reject, over the `signals` view or anything else in the database. Thresholds are config
fields set as DuckDB variables before the rules run: `getvariable('max_repetition')`. The default rules
live in filter/rules/; a recipe adds its own folders (`rules_dir`), where a file with the same name as a
default replaces it, and `disable_rules` turns reasons off. Every rule runs on every trace, so table
`rejections(trace_id, reason, rule_order)` holds every reason that applied; the view `curated` is the labeled
traces no rule rejected (traces that arrived after the last filter run have no labels yet and are not in it),
`rejected` the rejected ones with their reasons.
"""

import re
from pathlib import Path

import duckdb

from data.config import ConfigError, InputError
from filter.config import FilterConfig

DEFAULT_RULES = Path(__file__).parent / "rules"
RULE_NAME = re.compile(r"(\d+)_([A-Za-z0-9_]+)\.sql")


def rule_files(cfg: FilterConfig) -> list[tuple[str, Path]]:
    """(reason, file) in run order: the defaults, then the recipe's folders (same file name replaces)."""
    by_name = {}
    for folder in [DEFAULT_RULES, *map(Path, cfg.rules_dir or [])]:
        for file in folder.glob("*.sql"):
            if not RULE_NAME.fullmatch(file.name):
                raise InputError(f"{file}: a rule file is named <order>_<reason>.sql, e.g. 060_unverified.sql")
            by_name[file.name] = file
    rules = [(RULE_NAME.fullmatch(name).group(2), by_name[name]) for name in sorted(by_name)]
    unknown = set(cfg.disable_rules or []) - {reason for reason, _ in rules}
    if unknown:
        raise ConfigError(f"disable_rules: no rule has the reason(s) {sorted(unknown)}; rules: "
                          f"{', '.join(reason for reason, _ in rules)}")
    return [(reason, file) for reason, file in rules if reason not in (cfg.disable_rules or [])]


def set_thresholds(con, cfg: FilterConfig) -> None:
    for name, value in cfg.thresholds.items():
        con.execute(f"SET VARIABLE {name} = ?", [value])


def apply_rules(con, cfg: FilterConfig) -> dict:
    """Run every rule into `rejections`; returns the funnel: rows in, per reason first/any, rows kept."""
    set_thresholds(con, cfg)
    con.execute("""CREATE OR REPLACE TABLE rejections (trace_id VARCHAR, reason VARCHAR, rule_order INTEGER,
                   rule_file VARCHAR)""")
    rules = rule_files(cfg)
    for order, (reason, file) in enumerate(rules):
        select = file.read_text(encoding="utf-8").strip().rstrip(";")
        try:
            con.execute(f"INSERT INTO rejections SELECT DISTINCT trace_id, ?, ?, ? FROM ({select}\n)",
                        [reason, order, str(file)])
        except duckdb.Error as e:
            raise InputError(f"{file}: {e}") from None
    create_result_views(con)
    rows_in = con.execute("SELECT count(*) FROM traces").fetchall()[0][0]
    counts = dict((r, (first, any_)) for r, first, any_ in con.execute("""
        SELECT reason, count(*) FILTER (WHERE first), count(*) FROM (
            SELECT reason, rule_order = min(rule_order) OVER (PARTITION BY trace_id) AS first FROM rejections)
        GROUP BY reason""").fetchall())
    dropped = con.execute("SELECT count(DISTINCT trace_id) FROM rejections").fetchall()[0][0]
    return {"rows_in": rows_in,
            "rules": [{"reason": reason, "file": str(file), "first_applicable": counts.get(reason, (0, 0))[0],
                       "any_applicable": counts.get(reason, (0, 0))[1]} for reason, file in rules],
            "kept": rows_in - dropped}


def create_result_views(con) -> None:
    con.execute("""
        CREATE OR REPLACE VIEW rejected AS
        SELECT trace_id, list(reason ORDER BY rule_order) AS reasons, arg_min(reason, rule_order) AS first_reason
        FROM rejections GROUP BY trace_id""")
    con.execute("""
        CREATE OR REPLACE VIEW curated AS
        SELECT s.*, t.messages, t.reasoning, t.content
        FROM signals s JOIN traces t USING (trace_id)
        WHERE s.trace_id IN (SELECT trace_id FROM form) AND s.trace_id NOT IN (SELECT trace_id FROM rejections)""")
