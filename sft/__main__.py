"""python -m sft --config recipes/<x>/sft.yaml [--field value ...]  (see sft/main.py)"""

from data.config import run_command
from sft.main import main

if __name__ == "__main__":
    run_command(main, "sft", "rerun the same command to resume from the last checkpoint")
