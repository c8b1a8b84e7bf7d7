"""python -m tracegen --config recipes/<x>/tracegen.yaml [--field value ...]  (see tracegen/main.py)"""

import logging
import signal
import sys

from tracegen.main import main


def _terminate(signum, frame):
    raise KeyboardInterrupt  # a batch scheduler's SIGTERM: close the shard and stop a managed server


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        logging.getLogger("tracegen").warning("interrupted; finished traces are kept, rerun to continue")
        sys.exit(130)
