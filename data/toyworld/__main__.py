"""Command line for the toy world.

python -m data.toyworld build --out cache/toyworld [--seed 0] [--n-train 10000] [--n-test 500]
                             [--max-difficulty 5]
"""

import argparse
import json
import logging
from pathlib import Path

from data.toyworld.build import N_TEST, N_TRAIN, build
from data.toyworld.problems import DIFFICULTIES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.toyworld", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser(
        "build", help="build problems, tokenizer and initial models", allow_abbrev=False
    )
    cmd.add_argument("--out", type=Path, required=True, help="directory to build into, e.g. cache/toyworld")
    cmd.add_argument("--seed", type=int, default=0, help="seed for problems and model weights")
    cmd.add_argument("--n-train", type=int, default=N_TRAIN, help="number of training problems")
    cmd.add_argument("--n-test", type=int, default=N_TEST, help="number of held-out test problems")
    cmd.add_argument("--max-difficulty", type=int, choices=DIFFICULTIES, default=DIFFICULTIES[-1],
                     help="keep only difficulties 1..this (2: one-step sums and differences, the CI quickstart's)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("n_train", "n_test"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        paths = build(args.out, seed=args.seed, n_train=args.n_train, n_test=args.n_test,
                      max_difficulty=args.max_difficulty)
    except ValueError as e:  # a mismatch with what is already built: say what, without a traceback
        raise SystemExit(f"python -m data.toyworld build: {e}") from None
    print(json.dumps(json.loads(paths.manifest.read_text()), indent=2))


if __name__ == "__main__":
    main()
