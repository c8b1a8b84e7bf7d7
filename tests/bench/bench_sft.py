"""Our sft stage vs TRL's defaults on this machine: the same model, data, batch and steps, side by side.

    .venv/bin/python -m data.toyworld build --out cache/toyworld
    .venv/bin/python tests/bench/bench_sft.py [--steps 30] [--batch 16]

(a) `python -m sft` (derived settings: fp32 and no gradient checkpointing on a CPU, lengths checked up front)
full fine-tuning of the toy teacher on the gold SFT set; (b) what a user gets from TRL's SFTConfig defaults with
`use_cpu=True` (bf16 autocast, gradient checkpointing) and assistant_only_loss on the same conversational data.
Prints trained tokens/s of each (from TRL's own num_tokens, so the count is the same definition) and the ratio.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRL_DEFAULTS = """
import json, sys, time, datasets, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
world, out, steps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(world + "/tokenizer")
model = AutoModelForCausalLM.from_pretrained(world + "/teacher-init")
data = datasets.load_dataset("parquet", data_files=world + "/gold/train.parquet", split="train")
data = data.select_columns(["messages"]).map(
    lambda m: {"messages": [{k: v for k, v in x.items() if v is not None} for x in m]}, input_columns="messages")
args = SFTConfig(output_dir=out, use_cpu=True, max_steps=steps, per_device_train_batch_size=batch,
                 assistant_only_loss=True, save_strategy="no", report_to="none", logging_steps=1)
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
start = time.monotonic(); trainer.train(); wall = time.monotonic() - start
tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h][-1]
print(json.dumps({"tokens": tokens, "wall_s": wall, "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing}))
"""


def ours(world: Path, out: Path, steps: int, batch: int) -> dict:
    subprocess.run([sys.executable, "-m", "sft", "--config", str(ROOT / "recipes/quickstart/sft-teacher.yaml"),
                    "--dataset", str(world / "gold"), "--model_name_or_path", str(world / "teacher-init"),
                    "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size",
                    str(batch), "--logging_steps", "1", "--save_strategy", "no"], cwd=ROOT, check=True,
                   capture_output=True)
    metrics = json.loads((out / "sft_metrics.json").read_text())
    return {"tokens": metrics["tokens"], "wall_s": metrics["wall_s"]}


def trl_defaults(world: Path, out: Path, steps: int, batch: int) -> dict:
    done = subprocess.run([sys.executable, "-c", TRL_DEFAULTS, str(world), str(out), str(steps), str(batch)],
                          cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=ROOT / "cache" / "toyworld")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        a = ours(args.world, Path(tmp) / "ours", args.steps, args.batch)
        b = trl_defaults(args.world, Path(tmp) / "trl", args.steps, args.batch)
    rate = {name: r["tokens"] / r["wall_s"] for name, r in (("ours", a), ("trl", b))}
    print(f"{'run':<28}{'tokens':>10}{'train s':>10}{'tokens/s':>10}")
    print(f"{'python -m sft':<28}{a['tokens']:>10,.0f}{a['wall_s']:>10.1f}{rate['ours']:>10,.0f}")
    print(f"{'TRL defaults (use_cpu)':<28}{b['tokens']:>10,.0f}{b['wall_s']:>10.1f}{rate['trl']:>10,.0f}"
          f"   (bf16={b['bf16']}, gradient_checkpointing={b['gradient_checkpointing']})")
    print(f"ours / TRL defaults: {rate['ours'] / rate['trl']:.1f}x tokens/s  ({time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
