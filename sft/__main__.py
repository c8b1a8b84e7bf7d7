"""python -m sft --config recipes/<x>/sft.yaml [--field value ...]  (see sft/main.py)"""

import logging
import signal
import sys

from sft.main import main


def _terminate(signum, frame):
    raise KeyboardInterrupt  # a batch scheduler's SIGTERM: checkpoints already saved stay, a rerun resumes


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        logging.getLogger("sft").warning("interrupted; rerun the same command to resume from the last checkpoint")
        sys.exit(130)
