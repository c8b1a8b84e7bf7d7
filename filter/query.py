"""python -m filter query <run_dir | db.duckdb> "SELECT ..." [--out result.parquet] [--max_rows N]

Runs one SQL statement on a run's curation database, opened read-only (safe while a filter run updates
it: that run works on a copy), and prints the result as a table, or writes it to Parquet or CSV with
--out. A wrong query prints DuckDB's own message and exits 2; so does a missing run or database.
"""

import argparse
import sys

import duckdb

from data.config import InputError
from filter.store import open_readonly

MAX_CELL = 80  # characters shown per cell; --out writes whole values


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m filter query", allow_abbrev=False,
                                     description="Query a run's curation database (read-only).")
    parser.add_argument("run", help="the run directory (or its curation.duckdb)")
    parser.add_argument("sql", help="one SQL statement, e.g. \"SELECT reason, count(*) FROM rejections GROUP BY 1\"")
    parser.add_argument("--out", help="write the whole result here instead (.parquet, or .csv)")
    parser.add_argument("--max_rows", type=int, default=40, help="rows printed (the count is always shown)")
    args = parser.parse_args(argv)
    try:
        con = open_readonly(args.run)
    except (InputError, duckdb.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.out:
            result = con.sql(args.sql)
            if result is None:
                print("error: the statement returned no result to write", file=sys.stderr)
                return 2
            result.write_csv(args.out) if args.out.endswith(".csv") else result.to_parquet(args.out)
            print(f"wrote {result.shape[0]:,} rows to {args.out}")
        else:
            print_table(con.execute(args.sql), args.max_rows)
    except duckdb.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        con.close()
    return 0


def print_table(cursor, max_rows: int) -> None:
    from rich.console import Console
    from rich.table import Table

    if cursor.description is None:
        print("ok")
        return
    names = [d[0] for d in cursor.description]
    rows = cursor.fetchmany(max_rows + 1)
    table = Table()
    for name in names:  # one line per row: long cells are cut, not wrapped
        table.add_column(name, no_wrap=True, overflow="ellipsis", max_width=MAX_CELL)
    for row in rows[:max_rows]:
        table.add_row(*(_cell(v) for v in row))
    console = Console() if sys.stdout.isatty() else Console(width=100_000)  # a pipe or file: never wrap
    console.print(table)
    more = len(rows) > max_rows
    console.print(f"{max_rows}+ rows (first {max_rows} shown; --max_rows N or --out file for all)" if more
                  else f"{len(rows)} row{'s' if len(rows) != 1 else ''}")


def _cell(value) -> str:
    if value is None:
        return "NULL"
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 3] + "..."
