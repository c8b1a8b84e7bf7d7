"""Samples/s and tokens/s of tracegen's three ways to run the toy teacher, at the same batch.

    .venv/bin/python -m data.toyworld build --out cache/toyworld
    .venv/bin/python tests/bench/bench_engines.py [--model cache/toyworld/teacher-init] [--prompts 64] [--n 4]

Runs `python -m tracegen` (the real CLI, one process each) with engine hf, engine vllm (offline LLM) and
engine http with a managed vLLM server, on the same problems, n, max_tokens and batch/concurrency, and
reads each run's tracegen.summary.json. Model loading and server start-up are excluded: the figures are
the generation phase's samples/s and tokens/s; start-up is printed separately.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(engine: str, args, out: Path) -> dict:
    common = ["--problems", str(args.problems), "--limit", str(args.prompts), "--output_dir", str(out), "--n",
              str(args.n), "--max_tokens", str(args.max_tokens), "--temperature", "1.0", "--top_p", "1.0",
              "--log_every_s", "1e9"]
    vllm_kwargs = {"max_model_len": 1024, "gpu_memory_utilization": 0.2}
    if engine == "hf":
        extra = ["--engine", "hf", "--model", args.model, "--batch_size", str(args.prompts)]
    elif engine == "vllm":
        extra = ["--engine", "vllm", "--model", args.model, "--batch_size", str(args.prompts),
                 "--engine_kwargs", json.dumps(vllm_kwargs)]
    else:
        extra = ["--serve_model", args.model, "--concurrency", str(args.prompts), "--serve_args",
                 "--max-model-len 1024 --gpu-memory-utilization 0.2"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tracegen", *common, *extra], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"{engine} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "tracegen.summary.json").read_text())["this_run"]
    summary["total_s"] = time.perf_counter() - start
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cache/toyworld/teacher-init")
    parser.add_argument("--problems", default="cache/toyworld/problems/test.jsonl")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    print(f"{args.model}: {args.prompts} prompts x n={args.n}, max_tokens {args.max_tokens}, "
          f"batch/concurrency {args.prompts}")
    with tempfile.TemporaryDirectory() as tmp:
        results = {engine: run(engine, args, Path(tmp) / engine) for engine in ("hf", "vllm", "http")}
    base = results["hf"]["tokens_per_s"]
    for engine, r in results.items():
        label = {"hf": "hf generate", "vllm": "vllm offline", "http": "vllm server (http)"}[engine]
        print(f"{label:>19}: {r['samples_per_s']:7.2f} samples/s {r['tokens_per_s']:9.1f} tokens/s "
              f"({r['tokens_per_s'] / base:5.1f}x hf)  generation {r['wall_s']:6.1f}s, whole command "
              f"{r['total_s']:6.1f}s")


if __name__ == "__main__":
    main()
