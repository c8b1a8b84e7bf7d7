"""python -m filter --config recipes/<x>/filter.yaml [--field value ...]   (see filter/main.py)
python -m filter query <run_dir> "SELECT ..." [--out x.parquet]           (see filter/query.py)"""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["query"]:
        from filter.query import main as query_main

        sys.exit(query_main(sys.argv[2:]))
    from data.config import run_command
    from filter.main import main

    run_command(main, "filter", "the database and curated/ keep their previous state")
