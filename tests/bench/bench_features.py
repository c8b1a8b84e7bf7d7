"""Feature alignment and attention transfer on this machine: their cost per training step, and the attention loss's
memory chunked vs whole.

    .venv/bin/python tests/bench/bench_features.py [--length 512] [--steps 8]

1. step time: DistillTrainer with kd: online (CE + KL to an in-process teacher) as the baseline, then + feature
   alignment (a projection: the student is narrower), + attention transfer over the last layer, over the last two;
   the same student, teacher, data and steps; the median wall and CPU time between consecutive optimizer steps and
   the ratios to the baseline, interleaved in rounds so a busy machine slows every variant alike, on one thread.
2. memory: sft.features.attention_loss forward + backward on one long sequence (random queries and keys of 8 heads),
   in chunks of 128 queries vs one chunk of the whole sequence (what an eager [B, H, T, T] map costs), each in its own
   process (with glibc's mmap threshold fixed, so that peak RSS follows the live tensors); peak RSS growth.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback  # noqa: E402
from trl import SFTConfig  # noqa: E402

from sft.config import DistillArguments  # noqa: E402
from sft.features import AttentionInputs, attention_loss  # noqa: E402
from sft.trainer import DistillTrainer  # noqa: E402

VOCAB = 600
VARIANTS = {"kd online (baseline)": {}, "+ feature": {"feature_weight": 1.0},
            "+ attention, last layer": {"attention_weight": 1.0, "attention_layers": 1},
            "+ attention, last 2 layers": {"attention_weight": 1.0, "attention_layers": 2}}


class StepTimer(TrainerCallback):
    """Wall and CPU (this process, all threads) time at each step's end: on a shared machine the CPU time is the
    steadier measure of the work a step does."""

    def __init__(self):
        self.ends, self.cpu = [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())


def model(layers: int, hidden: int, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=hidden // 32,
                                        num_key_value_heads=hidden // 32, head_dim=32, tie_word_embeddings=True))


def tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)},
                                                                              unk_token="t0")))
    tok.pad_token, tok.eos_token = "t0", "t1"
    return tok


def rows(length: int, n: int) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = rng.integers(2, VOCAB, length).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 4) + ids[length // 4:]})
    return datasets.Dataset.from_list(out)


def step_time(variant: dict, data, steps: int, batch: int, out: Path) -> float:
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
                     report_to="none", save_strategy="no", logging_steps=steps, use_cpu=True, max_length=None,
                     disable_tqdm=True, bf16=False, seed=0)
    distill = DistillArguments(dataset="unused", kd="online", teacher_model="unused", **variant)
    timer = StepTimer()
    trainer = DistillTrainer(model=model(2, 64, 0), args=args, train_dataset=data, processing_class=tokenizer(),
                             distill=distill, teacher_model=model(4, 128, 1), callbacks=[timer])
    trainer.train()
    # the first step (warm-up) is left out
    return statistics.median(np.diff(timer.ends[1:])), statistics.median(np.diff(timer.cpu[1:]))


def compare_steps(args) -> None:
    # one thread: spinning OpenMP workers on a shared, oversubscribed machine made even the CPU-time ratios noise
    torch.set_num_threads(1)
    data = rows(args.length, args.batch * args.steps)
    times = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, variant in VARIANTS.items():
                times[name].append(step_time(variant, data, args.steps, args.batch, Path(tmp)))
    base = [statistics.median(v[i] for v in times["kd online (baseline)"]) for i in (0, 1)]
    print(f"\nstep time: student 2x64 (2 heads), teacher 4x128 (4 heads), batch {args.batch} x {args.length} tokens, "
          f"median of {args.steps - 2} steps, median of {args.rounds} interleaved rounds, 1 thread")
    for name, values in times.items():
        wall, cpu = (statistics.median(v[i] for v in values) for i in (0, 1))
        print(f"  {name:28s} wall {wall * 1000:8.1f} ms/step x{wall / base[0]:.2f}   "
              f"cpu {cpu * 1000:8.1f} ms/step x{cpu / base[1]:.2f}")


def memory_probe(length: int, chunk: int) -> None:
    torch.manual_seed(0)
    heads, dim = 8, 64
    student = AttentionInputs(torch.randn(1, heads, length, dim, requires_grad=True),
                              torch.randn(1, heads, length, dim, requires_grad=True), None, dim ** -0.5)
    teacher = AttentionInputs(torch.randn(1, heads, length, dim), torch.randn(1, heads, length, dim), None, dim ** -0.5)
    rows = torch.ones(1, length, dtype=torch.bool)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = attention_loss({1: student}, {1: teacher}, {1: 1}, rows, chunk)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mib": (peak - before) / 1024, "loss": loss.item()}))


def compare_memory(args) -> None:
    print(f"\nattention loss memory: one sequence of {args.memory_length} tokens, 8 heads of 64, forward + backward")
    results = {}
    for chunk in (128, args.memory_length):
        # a fixed mmap threshold returns every freed large block to the OS, so peak RSS follows the live tensors;
        # glibc's adaptive threshold keeps chunks of growing size on the heap (measured: 637 vs 112 MiB, chunked)
        proc = subprocess.run([sys.executable, __file__, "--probe", str(args.memory_length), str(chunk)],
                              capture_output=True, text=True, check=True, cwd=ROOT,
                              env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        results[chunk] = json.loads(proc.stdout.strip().splitlines()[-1])
        label = "whole (one chunk)" if chunk == args.memory_length else f"chunks of {chunk}"
        print(f"  {label:20s} peak RSS growth {results[chunk]['growth_mib']:8.1f} MiB   loss {results[chunk]['loss']:.6f}")
    whole, chunked = results[args.memory_length]["growth_mib"], results[128]["growth_mib"]
    print(f"  whole / chunked: x{whole / max(chunked, 1e-9):.1f} "
          f"(one [8, T, T] float32 score map is {8 * args.memory_length ** 2 * 4 / 2 ** 20:.0f} MiB)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory_length", type=int, default=4096)
    parser.add_argument("--skip_memory", action="store_true", help="only the step times")
    parser.add_argument("--probe", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        memory_probe(*args.probe)
        return
    if not args.skip_memory:
        compare_memory(args)
    compare_steps(args)


if __name__ == "__main__":
    main()
