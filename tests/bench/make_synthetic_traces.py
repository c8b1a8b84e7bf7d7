"""Write a synthetic tracegen run directory for benchmarking the filter stage.

    .venv/bin/python tests/bench/make_synthetic_traces.py --out runs/bench-200k [--traces 200000] [--seed 0]

What tracegen itself writes, through tracegen's own writer (`tracegen.main.open_writer`): the resolved
`tracegen.config.yaml`, `problems/<source>.0of1.parquet`, `traces/part-0of1-<seq>.parquet` and, for
`--logprob-fraction` of the traces, `logprobs/part-0of1-<seq>.parquet` (top-5). Plus `problems.jsonl`, the
problem file the config names, and `planted.json`: which problems are planted duplicates and benchmark copies.

The data: arithmetic word problems of 30-120 words made from sentence templates (gold answers are numbers),
`--samples` traces each. Reasoning length is lognormal (median 900 words, a few hundred to several
thousand); 20% of answers are wrong (a boxed number other than the gold), 5% are cut off (finish_reason
length, reasoning not closed, no answer), 3% loop (one passage repeated until the length limit), 0.1% are
failed requests (error set). Planted: 2% exact duplicate problems (case/whitespace/punctuation variants), 2%
near duplicates (one word changed), and 1% problems copied from the GSM8K test set (../shared/benchmarks)
or, without it, from the toy world's test split (cache/toyworld). Deterministic for a seed.
"""

import argparse
import json
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tracegen.config import TracegenConfig  # noqa: E402
from tracegen.main import endpoint_id, open_writer, sampling_params  # noqa: E402
from tracegen.records import request_key, trace_id  # noqa: E402

GSM8K_TEST = ROOT.parent / "shared" / "benchmarks" / "gsm8k" / "test.jsonl"
TOY_TEST = ROOT / "cache" / "toyworld" / "problems" / "test.jsonl"
BASE_URL = "http://synthetic-teacher.invalid/v1"
MODEL = "synthetic-r1"
SYNTHETIC_TIME = datetime(2025, 1, 1, tzinfo=UTC)
SHARE = {"wrong": 0.20, "unfinished": 0.05, "repetitive": 0.03, "error": 0.001,
         "exact_dup": 0.02, "near_dup": 0.02, "contaminated": 0.01}

NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kemal", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Ximena", "Yusuf", "Zoe"]
ITEMS = ["apples", "marbles", "stamps", "pencils", "books", "cookies", "tickets", "coins", "shells", "cards",
         "bottles", "plants", "bricks", "ribbons", "stickers", "boxes", "eggs", "lemons", "candles", "tiles"]
PLACES = ["market", "school", "library", "garden", "bakery", "museum", "harbor", "farm", "workshop", "station"]
PROBLEM_SENTENCES = [
    "{n1} has {a} {i1} and buys {b} more at the {p1}.",
    "Every day {n2} gives away {c} {i1} to friends from the {p2}.",
    "A box at the {p1} holds {d} {i2}, and there are {b} such boxes.",
    "{n1} sells each of the {i2} for {c} dollars but pays a fee of {d} dollars per sale.",
    "On the weekend {n2} collects twice as many {i1} as on a weekday.",
    "The {p2} orders {a} {i2} in the morning and {c} more in the afternoon.",
    "{n1} and {n2} share the {i1} equally, and {n2} loses {d} of them on the way home.",
    "After {b} weeks the number of {i2} at the {p1} has grown by {c} each week.",
    "Half of the {i1} are red, a third of the rest are blue, and the remaining {d} are green.",
    "{n2} needs {a} {i2} for a project at the {p2} and already has {b}.",
]
QUESTIONS = ["How many {i1} does {n1} have at the end?", "How much money does {n1} earn in total?",
             "How many more {i2} does {n2} need?", "How many {i2} are there altogether?",
             "How many {i1} are left after {b} days?"]
REASONING_SENTENCES = [
    "Let me compute {a} {op} {b} first, which gives {c}.",
    "Wait, I should double-check that step: {a} {op} {b} is {c}, not {d}.",
    "So {n1} ends up with {c} {i1} after the trade at the {p1}.",
    "Hmm, maybe I misread the problem, because it says {n2} buys {a} {i2} and not {b}.",
    "Now multiply the {c} {i1} by the {b} boxes to get {d} in total.",
    "Alternatively, I can count the {i2} per week: {a} per day for {b} days makes {d}.",
    "That does not match the earlier estimate of {c}, so let me redo the subtraction.",
    "The fee is {b} dollars per sale, so over {a} sales {n1} pays {d} dollars.",
    "Let me restate what we know: {n2} had {a}, gave away {b}, and received {c}.",
    "Checking the units again, the answer should be a number of {i1}, which is {c}.",
    "If I add the morning order of {a} to the afternoon order of {b}, the {p2} has {c}.",
    "Okay, so the remaining {i2} are {c} minus {b}, which leaves {d}.",
]


def main() -> int:
    args = parse_args()
    t0 = time.perf_counter()
    rng = random.Random(args.seed)
    np_rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    problems, planted = make_problems(rng, args.traces // args.samples)
    out.mkdir(parents=True, exist_ok=True)
    problems_file = out / "problems.jsonl"
    problems_file.write_text("".join(json.dumps(p) + "\n" for p in problems))
    (out / "planted.json").write_text(json.dumps(planted, indent=1))
    cfg = TracegenConfig(problems=str(problems_file), output_dir=str(out), base_url=[BASE_URL], model=MODEL,
                         n=args.samples, shard_rows=args.rows_per_part,
                         top_logprobs=5 if args.logprob_fraction > 0 else 0)
    bank = reasoning_bank(rng, 20_000)
    written = write_traces(cfg, problems, bank, rng, np_rng, args)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{written:,} traces of {len(problems):,} problems in {out} ({size / 2**20:,.0f} MiB on disk) in "
          f"{time.perf_counter() - t0:.0f}s; planted: " + ", ".join(f"{k} {len(v)}" for k, v in planted.items()))
    return 0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", required=True, help="The run directory to write (e.g. runs/bench-200k).")
    parser.add_argument("--traces", type=int, default=200_000, help="Number of traces.")
    parser.add_argument("--samples", type=int, default=4, help="Traces per problem.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of everything random.")
    parser.add_argument("--logprob-fraction", type=float, default=0.01,
                        help="Share of traces with a logprobs row (top-5), 0 for none.")
    parser.add_argument("--rows-per-part", type=int, default=10_000, help="Traces per Parquet part.")
    return parser.parse_args()


# ----------------------------------------------------------------------------- problems


def fill(template: str, rng: random.Random) -> str:
    n1, n2 = rng.sample(NAMES, 2)
    i1, i2 = rng.sample(ITEMS, 2)
    p1, p2 = rng.sample(PLACES, 2)
    a, b, c, d = (rng.randint(2, 999) for _ in range(4))
    return template.format(n1=n1, n2=n2, i1=i1, i2=i2, p1=p1, p2=p2, a=a, b=b, c=c, d=d,
                           op=rng.choice("+-*"))


def make_problems(rng: random.Random, count: int) -> tuple[list[dict], dict]:
    problems = []
    for i in range(count):
        sentences = [fill(t, rng) for t in rng.sample(PROBLEM_SENTENCES, rng.randint(3, 8))]
        text = " ".join(sentences + [fill(rng.choice(QUESTIONS), rng)])
        problems.append({"id": f"syn-{i:07d}", "domain": "math", "prompt": text, "answer": str(rng.randint(1, 9999)),
                         "tests": None, "source": "synthetic", "meta": {"difficulty": rng.randint(1, 5)}})
    planted = {"exact_dup": [], "near_dup": [], "contaminated": []}
    slots = rng.sample(range(count), int(count * (SHARE["exact_dup"] + SHARE["near_dup"] + SHARE["contaminated"])))
    n_exact, n_near = int(count * SHARE["exact_dup"]), int(count * SHARE["near_dup"])
    benchmark = benchmark_problems()
    untouched = sorted(set(range(count)) - set(slots))  # sources stay as they are: the plants are known pairs
    for k, slot in enumerate(slots):
        target = problems[slot]
        source = problems[rng.choice(untouched)]
        if k < n_exact:  # same text up to case, whitespace and punctuation
            target["prompt"] = source["prompt"].upper().replace(". ", " .  ").replace("?", " ?")
            target["answer"] = source["answer"]
            planted["exact_dup"].append([target["id"], source["id"]])
        elif k < n_exact + n_near:  # one word changed
            words = source["prompt"].split()
            words[rng.randrange(len(words))] = "purple"
            target["prompt"], target["answer"] = " ".join(words), source["answer"]
            planted["near_dup"].append([target["id"], source["id"]])
        elif benchmark:
            name, bench_id, prompt, answer = benchmark[rng.randrange(len(benchmark))]
            target["prompt"], target["answer"] = prompt, answer
            planted["contaminated"].append([target["id"], name, bench_id])
    return problems, planted


def benchmark_problems() -> list[tuple[str, str, str, str]]:
    """(benchmark, id, prompt, answer) to copy: GSM8K test when ../shared/benchmarks is there, else toy test."""
    if GSM8K_TEST.is_file():
        rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()]
        return [("gsm8k", str(i), r["question"], r["answer"].rsplit("####", 1)[1].strip().replace(",", ""))
                for i, r in enumerate(rows)]
    if TOY_TEST.is_file():
        rows = [json.loads(line) for line in TOY_TEST.read_text().splitlines()]
        return [("toy", r["id"], r["prompt"], r["answer"]) for r in rows]
    print(f"no benchmark copies ({GSM8K_TEST}, {TOY_TEST}): no planted contamination", file=sys.stderr)
    return []


# ----------------------------------------------------------------------------- traces


def reasoning_bank(rng: random.Random, size: int) -> list[str]:
    return [fill(rng.choice(REASONING_SENTENCES), rng) for _ in range(size)]


def write_traces(cfg: TracegenConfig, problems: list[dict], bank: list[str], rng: random.Random,
                 np_rng: np.random.Generator, args) -> int:
    sampling = sampling_params(cfg)
    sampling_json = json.dumps(sampling, sort_keys=True)
    endpoint = endpoint_id(cfg, cfg.base_url)
    words_per_sentence = np.mean([len(s.split()) for s in bank])
    written, traces, logprobs = 0, [], []
    with open_writer(cfg, problems) as writer:
        for problem in problems:
            messages = [{"role": "user", "content": problem["prompt"]}]
            key = request_key(messages, cfg.model, endpoint, sampling)
            for index in range(cfg.n):
                row = trace(problem, key, index, messages, sampling_json, bank, words_per_sentence, rng, np_rng)
                traces.append(row)
                if cfg.top_logprobs and row["error"] is None and rng.random() < args.logprob_fraction:
                    logprobs.append(fake_logprobs(row["trace_id"], row["completion_tokens"], np_rng))
            if len(traces) >= 2000:  # one journal batch per 2000 traces, as tracegen appends per request
                writer.append(traces, logprobs)
                written, traces, logprobs = written + len(traces), [], []
        if traces:
            writer.append(traces, logprobs)
            written += len(traces)
    return written


def trace(problem, key, index, messages, sampling_json, bank, words_per_sentence, rng, np_rng) -> dict:
    words = float(np.clip(np_rng.lognormal(np.log(900), 0.7), 150, 12_000))
    sentences = max(1, int(words / words_per_sentence))
    start = rng.randrange(len(bank) - sentences) if sentences < len(bank) else 0
    reasoning = " ".join(bank[start:start + sentences])
    answer = problem["answer"] if rng.random() >= SHARE["wrong"] else wrong(problem["answer"], rng)
    content, finish, source = f"The answer is \\boxed{{{answer}}}.", "stop", rng.choice(["field"] * 7 + ["think_tags"] * 3)
    roll, error = rng.random(), None
    if roll < SHARE["repetitive"]:  # a loop: one passage again and again until the length limit
        reasoning = " ".join(bank[start:start + 3] * rng.randint(40, 200))
        content, finish = None, rng.choice(["length", "repetition"])
    elif roll < SHARE["repetitive"] + SHARE["unfinished"]:  # cut off mid-thought: no answer
        reasoning = reasoning[: len(reasoning) * 2 // 3]
        content, finish = None, "length"
    elif roll < SHARE["repetitive"] + SHARE["unfinished"] + SHARE["error"]:
        reasoning = content = finish = source = None
        error = "APIStatusError: 503 Service Unavailable (after 8 retries)"
    tokens = None if error else (len(reasoning) + len(content or "")) // 4  # ~4 characters per token
    return {
        "trace_id": trace_id(key, problem["id"], index), "request_key": key, "problem_id": problem["id"],
        "sample_index": index, "model": MODEL, "messages": json.dumps(messages, ensure_ascii=False),
        "reasoning": reasoning, "content": content, "reasoning_source": source or "none", "finish_reason": finish,
        "prompt_tokens": int(len(problem["prompt"].split()) * 1.3) + 8, "completion_tokens": tokens,
        "reasoning_tokens": None, "latency_s": round(rng.uniform(5, 300), 2), "attempts": 9 if error else 1,
        "error": error, "sampling": sampling_json, "created_at": SYNTHETIC_TIME}


def wrong(gold: str, rng: random.Random) -> str:
    try:
        return str(int(gold) + rng.randint(1, 50))
    except ValueError:  # a benchmark gold such as "3.5"
        return gold + str(rng.randint(1, 9))


def fake_logprobs(tid: str, tokens: int, np_rng: np.random.Generator) -> dict:
    top = np.sort(-np_rng.exponential(1.0, size=(tokens, 5)), axis=1)[:, ::-1]
    return {"trace_id": tid, "token_ids": np_rng.integers(0, 150_000, tokens, dtype=np.int32).tolist(),
            "logprobs": top[:, 0].astype(np.float32).tolist(),
            "top_ids": np_rng.integers(0, 150_000, (tokens, 5), dtype=np.int32).tolist(),
            "top_logprobs": top.astype(np.float16).tolist()}


if __name__ == "__main__":
    raise SystemExit(main())
