"""python -m evals --config recipes/<x>/evals.yaml [--field value ...]  (see evals/main.py)"""

from data.config import run_command
from evals.main import main

if __name__ == "__main__":
    run_command(main, "evals", "finished generations are kept, rerun to continue",
                quiet_loggers=("httpx", "httpx2", "openai"))
