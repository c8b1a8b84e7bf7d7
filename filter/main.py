"""python -m filter --config recipes/<x>/filter.yaml [--field value ...]
python -m filter query <run_dir> "SELECT ..." [--out result.parquet]        (see filter/query.py)

Turns a run's trace shards into a curated SFT dataset through a DuckDB database anyone can query:
views over traces/ and logprobs/ (filter/store.py), one label table per signal, computed only for traces
not labeled yet (filter/labels.py, filter/verify.py, filter/dedup.py, filter/contamination.py), rules as SQL
files whose names are their reject reasons (filter/rules.py), selection policies (filter/select.py), and the
export with its card (filter/export.py, filter/card.py). The database and the curated folder switch to the new
state only when the run finishes (filter/store.py): an interrupted run leaves the previous state. Exit codes:
0 done, 2 a config or input error (named).
"""

import json
import logging
import os
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import yaml

from data.config import ConfigError, InputError
from filter import labels
from filter.card import print_funnel, stats, write_card
from filter.config import DEFAULT_DB, FilterConfig, is_url, parse_config
from filter.export import export
from filter.rules import apply_rules
from filter.select import select
from filter.store import create_views, run_sql_files, update_problems, updating
from filter.verify import label_verified

log = logging.getLogger("filter")


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    try:
        cfg = parse_config(argv)
        log.info("resolved config:\n%s", yaml.safe_dump(asdict(cfg), sort_keys=False).rstrip())
        with updating(cfg.db, cfg.output_dir) as (con, curated):
            # --- the store: views over the parts, the problems behind them --------------------------------
            create_views(con, cfg.run_dir)
            labels.create_macros(con)
            if cfg.relabel:
                labels.drop_labels(con)
            labeled = {"problems": update_problems(con, cfg)}
            # --- labels, for what is new --------------------------------------------------------------------
            labeled |= label_everything(con, cfg)
            labels.create_signals_view(con)
            views = run_sql_files(con, cfg.views_dir or [])
            # --- rules, then selection ----------------------------------------------------------------------
            funnel = apply_rules(con, cfg)
            funnel["selection"] = select(con, cfg)
            # --- export the curated set with its card and funnel ---------------------------------------------
            st = stats(con)
            funnel["exported"] = st["rows"]
            export(con, cfg, curated, lambda folder: write_card(folder, cfg, funnel, st))
            save_funnel(con, funnel)
    except (ConfigError, InputError, OSError) as e:
        log.error("%s", e)
        return 2
    # --- report ---------------------------------------------------------------------------------------------
    print_funnel(funnel)
    write_summary(cfg, labeled, views, funnel, st, time.monotonic() - start)
    log.info("done in %.1fs: %s traces in, %s kept by the rules, %s exported to %s", time.monotonic() - start,
             f"{funnel['rows_in']:,}", f"{funnel['kept']:,}", f"{st['rows']:,}", cfg.output_dir)
    return 0


def label_everything(con, cfg: FilterConfig) -> dict:
    """Every label table, each for the traces (or problems) it does not hold yet; returns the counts."""
    counts = {}
    for name, fn in (("verified", lambda: label_verified(con, cfg.workers or os.cpu_count() or 1,
                                                          cfg.math_timeout_s)),
                     ("form", lambda: labels.label_form(con)),
                     ("quality", lambda: labels.label_quality(con, cfg.repetition_ngram)),
                     ("agreement (problems)", lambda: labels.label_agreement(con))):
        t = time.monotonic()
        counts[name] = fn()
        log.info("labels %s: %s new in %.1fs", name, f"{counts[name]:,}", time.monotonic() - t)
    t = time.monotonic()
    counts |= labels.label_problems(con, cfg)
    log.info("labels dup_problems / contamination: %s / %s new problems in %.1fs", f"{counts['dup_problems']:,}",
             f"{counts['contamination']:,}", time.monotonic() - t)
    return counts


def save_funnel(con, funnel: dict) -> None:
    con.execute("CREATE OR REPLACE TABLE funnel (created_at TIMESTAMPTZ, funnel JSON)")
    con.execute("INSERT INTO funnel VALUES (now(), ?)", [json.dumps(funnel)])


def write_summary(cfg: FilterConfig, labeled: dict, views: list, funnel: dict, st: dict, wall_s: float) -> None:
    """filter.config.yaml and filter.summary.json in the run directory (next to the db for remote runs); a run
    with another database (`db: <run>/unfiltered.duckdb`) writes <its name>.filter.config.yaml and .summary.json,
    so two curations of one run, even side by side, keep their own records."""
    folder = Path(cfg.db).parent if is_url(cfg.run_dir) else Path(cfg.run_dir)
    prefix = "" if Path(cfg.db).name == DEFAULT_DB else f"{Path(cfg.db).stem}."
    cfg.save(folder / f"{prefix}filter.config.yaml")
    summary = {"finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "wall_s": round(wall_s, 1),
               "db": cfg.db, "output_dir": cfg.output_dir, "labeled_this_run": labeled, "views": views,
               "funnel": funnel, "exported": {k: v for k, v in st.items() if k != "lengths"}}
    tmp = folder / f"{prefix}filter.summary.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(folder / f"{prefix}filter.summary.json")
