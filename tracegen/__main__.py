"""python -m tracegen --config recipes/<x>/tracegen.yaml [--field value ...]  (see tracegen/main.py)"""

from data.config import run_command
from tracegen.main import main

if __name__ == "__main__":
    run_command(main, "tracegen", "finished traces are kept, rerun to continue",
                quiet_loggers=("httpx", "httpx2", "openai"))
