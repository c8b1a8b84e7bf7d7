"""python -m evals --config recipes/<x>/evals.yaml [--field value ...]  (see evals/main.py)"""

import logging
import signal
import sys

from evals.main import main


def _terminate(signum, frame):
    raise KeyboardInterrupt  # a batch scheduler's SIGTERM: tracegen closes its shard and stops a managed server


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        logging.getLogger("evals").warning("interrupted; finished generations are kept, rerun to continue")
        sys.exit(130)
