"""The recipes' stages in the test's own process, for the end-to-end tests of recipes/*/run.py (their `call`).

A stage's command `python -m <stage> ...` becomes the stage's main(...) here: each launch would import torch,
transformers and the stage again, most of a tiny run's time, and what these tests check is the recipe (its
commands, files and resumption), not the launch (tests/test_help.py and the subprocess tests cover that)."""

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

# `python -m <name>`: the module holding that stage's main()
MAINS = {"data.toyworld": "data.toyworld.__main__", "sft": "sft.main", "sft.quantize": "sft.quantize",
         "tracegen": "tracegen.main", "filter": "filter.main", "evals": "evals.main"}


def in_process(cmd: list[str]) -> int:
    """Runs one stage's command and returns the exit code its launch would give; a script is launched."""
    if cmd[:2] != [sys.executable, "-m"]:
        return subprocess.call(cmd)
    main = importlib.import_module(MAINS[cmd[2]]).main
    try:
        return main(cmd[3:]) or 0
    except SystemExit as e:  # argparse's errors, and stages that exit with a message
        return e.code if isinstance(e.code, int) else int(e.code is not None)


def recipe_module(path: Path):
    """A recipe script (recipes/<name>/run.py and the like) as a module: they are scripts, not a package."""
    spec = importlib.util.spec_from_file_location(f"recipe_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
