"""python -m filter --config recipes/<x>/filter.yaml [--field value ...]   (see filter/main.py)
python -m filter query <run_dir> "SELECT ..." [--out x.parquet]           (see filter/query.py)"""

import logging
import signal
import sys


def _terminate(signum, frame):
    raise KeyboardInterrupt  # a batch scheduler's SIGTERM: the database keeps its previous state


if __name__ == "__main__":
    if sys.argv[1:2] == ["query"]:
        from filter.query import main as query_main

        sys.exit(query_main(sys.argv[2:]))
    from filter.main import main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        logging.getLogger("filter").warning("interrupted; the database and curated/ keep their previous state")
        sys.exit(130)
