"""Sparse KD on this machine: teacher-logprob storage, KD step time / SFT step time, peak memory of the loss.

    .venv/bin/python -m data.toyworld build --out cache/toyworld
    .venv/bin/python tests/bench/bench_kd.py [--teacher cache/toyworld/teacher-init] [--top-logprobs 20]

1. storage: a real `python -m tracegen --engine hf --top_logprobs k` run of the teacher; the logprobs part's
   parquet bytes (float16 top_logprobs, zstd) per top-k entry, and per completion token; and the same table
   rewritten without `rest_logprobs` and `prompt_token_ids` (the side table before they were stored), side by side.
2. step time: the same traces as a curated set (prepare_kd_dataset), trained with TRL's SFTTrainer (CE, its
   fused chunked LM head) and with DistillTrainer (kd: sparse), same student, batch, data and steps; the median wall time
   between consecutive optimizer steps (data loading and collation included), and the ratio. Twice: the toy
   student (vocabulary 595) on the teacher's traces, and a random Qwen2 with a 32k vocabulary on random tokens
   with random top-k, where the LM head (the part KD changes) dominates.
3. memory: the KD loss's forward + backward on one long sequence, chunked (sft.losses.sparse_kd_loss) vs a dense
   implementation that builds the full [T, V] logits, each in its own process; peak RSS growth.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainerCallback,
)
from trl import SFTConfig, SFTTrainer  # noqa: E402

from sft.config import DistillArguments  # noqa: E402
from sft.kd_data import prepare_kd_dataset  # noqa: E402
from sft.losses import OutputHead, sparse_kd_loss  # noqa: E402
from sft.trainer import DistillTrainer  # noqa: E402


# ---------------------------------------------------------------------------------------- 1. storage
def teacher_run(args, out: Path) -> Path:
    cmd = [sys.executable, "-m", "tracegen", "--engine", "hf", "--model", args.teacher, "--problems",
           args.problems, "--output_dir", str(out), "--limit", str(args.prompts), "--n", "4", "--max_tokens",
           str(args.max_tokens), "--top_logprobs", str(args.top_logprobs), "--temperature", "1.0", "--top_p",
           "1.0", "--seed", "0", "--batch_size", str(args.prompts), "--log_every_s", "1e9"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    (part,) = (out / "logprobs").glob("part-*.parquet")
    return part


def storage(part: Path) -> None:
    table = pq.read_table(part)
    entries = pc.sum(pc.list_value_length(pc.list_flatten(table["top_ids"]))).as_py()
    tokens = pc.sum(pc.list_value_length(table["token_ids"])).as_py()
    print(f"storage: {len(table)} traces, {tokens} completion tokens, {entries} top-k entries "
          f"({entries / tokens:.1f} per token)")
    before = table.drop_columns(["rest_logprobs", "prompt_token_ids"])
    for label, t in (("without rest_logprobs, prompt_token_ids", before), ("as tracegen writes it", table)):
        path = part.with_name(f"rewritten-{len(t.column_names)}.parquet")
        pq.write_table(t, path, compression="zstd")  # as tracegen's store writes a part
        columns = column_bytes(path)
        size = path.stat().st_size
        extra = "".join(f", {name} {columns[name] / entries:.3f}" for name in ("rest_logprobs", "prompt_token_ids")
                        if name in columns)
        print(f"  {label:42s} {size / entries:.3f} bytes per top-k entry (whole file; top_ids "
              f"{columns['top_ids'] / entries:.3f}, top_logprobs {columns['top_logprobs'] / entries:.3f}{extra}), "
              f"{size / tokens:.1f} per completion token, {size} bytes")


def column_bytes(path: Path) -> dict[str, int]:
    meta = pq.ParquetFile(path).metadata
    out = {}
    for g in range(meta.num_row_groups):
        for i in range(meta.num_columns):
            column = meta.row_group(g).column(i)
            name = column.path_in_schema.split(".")[0]
            out[name] = out.get(name, 0) + column.total_compressed_size
    return out


# ---------------------------------------------------------------------------------------- 2. step time
class StepTimer(TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def step_time(trainer_cls, model, dataset, tokenizer, batch: int, steps: int, out: Path, **kd) -> float:
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps + 2,
                     learning_rate=1e-4, report_to="none", save_strategy="no", logging_steps=10**6, use_cpu=True,
                     max_length=None, seed=0, disable_tqdm=True, dataloader_drop_last=True)
    timer = StepTimer()
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[timer], **kd)
    trainer.train()
    return statistics.median(np.diff(timer.ends[1:]))  # the first step (warm-up) is left out


def compare_steps(label: str, make_model, kd_data, tokenizer, batch: int, steps: int, out: Path) -> None:
    sft_data = kd_data.select_columns(["input_ids", "labels"])
    sft = step_time(SFTTrainer, make_model(), sft_data, tokenizer, batch, steps, out / "sft")
    kd = step_time(DistillTrainer, make_model(), kd_data, tokenizer, batch, steps, out / "kd",
                   distill=DistillArguments(dataset="unused", kd="sparse", kd_alpha=0.5, kd_chunk_size=1024))
    tokens = sum(len(r) for r in kd_data[: batch]["input_ids"])
    print(f"{label}: SFT step {sft * 1000:.0f} ms, KD step {kd * 1000:.0f} ms, ratio {kd / sft:.2f}   "
          f"(target <= 1.25; batch {batch}, ~{tokens} tokens per step, median of {steps})")


def curated_from_run(run: Path, part: Path) -> Path:
    traces = pq.read_table(run / "traces").to_pylist()
    logprobs = {r["trace_id"]: r["token_ids"] for r in pq.read_table(part, columns=["trace_id", "token_ids"])
                .to_pylist()}
    rows = [{"messages": [*json.loads(t["messages"]), {"role": "assistant", "content": t["content"] or ""}],
             "trace_id": t["trace_id"], "completion_token_ids": logprobs[t["trace_id"]],
             "logprobs_file": f"../logprobs/{part.name}"} for t in traces]
    (run / "curated").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), run / "curated" / "train.parquet")
    return run / "curated"


def random_kd_rows(vocab: int, rows: int, length: int, k: int) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(rows):
        ids = rng.integers(0, vocab, length)
        top = rng.integers(0, vocab, (length, k)).astype(np.int32)
        probs = np.log(rng.dirichlet(np.ones(k + 1), length))
        logprobs, rest = probs[:, :k].astype(np.float16), probs[:, k].astype(np.float32)
        prompt = 32
        top[:prompt], logprobs[:prompt], rest[:prompt] = -1, -np.inf, -np.inf
        out.append({"input_ids": ids.tolist(), "labels": [-100] * prompt + ids[prompt:].tolist(),
                    "teacher_top_ids": top, "teacher_top_logprobs": logprobs, "teacher_rest_logprobs": rest})
    return datasets.Dataset.from_list(out)


# ---------------------------------------------------------------------------------------- 3. memory
def dense_kd_loss(hidden, weight, target, top_ids, top_logprobs, alpha: float):
    """The obvious implementation: full [N, V] logits, softmax, top-k + bucket, KL (temperature 1)."""
    logq = torch.log_softmax(hidden @ weight.T, dim=-1)
    ce = -logq.gather(1, target[:, None]).squeeze(1)
    student_top = logq.gather(1, top_ids)
    rest = logq.scatter(1, top_ids, -torch.inf).logsumexp(-1, keepdim=True)
    log_ps = torch.cat([student_top, rest], 1)
    teacher_rest = torch.log1p(-top_logprobs.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    log_pt = torch.cat([top_logprobs, teacher_rest], 1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return (alpha * ce + (1 - alpha) * kl).sum()


def memory_probe(kind: str, positions: int, vocab: int, hidden_size: int, k: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, positions + 1, hidden_size, generator=g, requires_grad=True)
    weight = (0.05 * torch.randn(vocab, hidden_size, generator=g)).requires_grad_()
    labels = torch.randint(0, vocab, (1, positions + 1), generator=g)
    top_ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(positions + 1)])[None]
    probs = torch.log(torch.distributions.Dirichlet(torch.ones(k + 1)).sample((1, positions + 1)))
    top_logprobs, rest = probs[..., :k], probs[..., k]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if kind == "dense":
        loss = dense_kd_loss(hidden[0, :-1], weight, labels[0, 1:], top_ids[0, 1:], top_logprobs[0, 1:], 0.5)
    else:
        loss = sparse_kd_loss(hidden, OutputHead(weight), labels, top_ids, top_logprobs, rest, 0.5, 0.5, 1.0, chunk)[0]
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": (peak - before) / 1024, "seconds": time.perf_counter() - start}))


def compare_memory(args) -> None:
    shape = [str(args.memory_positions), str(args.memory_vocab), "256", str(args.top_logprobs), "1024"]
    results = {}
    for kind in ("dense", "chunked"):
        proc = subprocess.run([sys.executable, __file__, "--memory-probe", kind, *shape], capture_output=True,
                              text=True, check=True)
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    logits_mb = args.memory_positions * args.memory_vocab * 4 / 2**20
    print(f"memory: KD loss fwd+bwd on {args.memory_positions} positions, vocab {args.memory_vocab}, hidden 256, "
          f"top-{args.top_logprobs} (one fp32 [T, V] logits tensor = {logits_mb:.0f} MB)")
    for kind, r in results.items():
        print(f"  {kind:8s} peak RSS growth {r['peak_mb']:7.0f} MB   {r['seconds']:.2f} s")


# ---------------------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="cache/toyworld/teacher-init")
    parser.add_argument("--student", default="cache/toyworld/student-init")
    parser.add_argument("--problems", default="cache/toyworld/problems/train.jsonl")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--top-logprobs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--memory-positions", type=int, default=8192)
    parser.add_argument("--memory-vocab", type=int, default=32000)
    parser.add_argument("--memory-probe", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        kind, *shape = args.memory_probe
        return memory_probe(kind, *map(int, shape))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        part = teacher_run(args, run)
        storage(part)

        tokenizer = AutoTokenizer.from_pretrained(args.teacher)
        kd_data = prepare_kd_dataset(datasets.Dataset.from_parquet(str(curated_from_run(run, part) / "train.parquet")),
                                     tokenizer, run / "curated")
        compare_steps(f"toy student ({args.student})", lambda: AutoModelForCausalLM.from_pretrained(args.student),
                      kd_data, tokenizer, 8, args.steps, Path(tmp) / "toy")

        config = Qwen2Config(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True)
        compare_steps("random Qwen2, vocab 32000, hidden 256, 2 layers, 4 x 512 tokens",
                      lambda: Qwen2ForCausalLM(config), random_kd_rows(32000, 64, 512, args.top_logprobs),
                      tokenizer, 4, args.steps, Path(tmp) / "wide")
    compare_memory(args)


if __name__ == "__main__":
    main()
