"""How far a student's own writing is from the teacher: the exact per-token reverse KL(student || teacher), over the
full vocabulary, on completions the student samples (temperature 1) for curated prompts.

    .venv/bin/python recipes/quickstart/student_kl.py runs/quickstart filtered-full filtered-on-policy

On-policy distillation minimises this quantity (sft/on_policy.py estimates it on the teacher's top-k); this measures
it without the top-k cut, so students trained with different losses compare on the same footing.
"""

import argparse
import sys
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere: the repo's stages
from sft.on_policy import sample_completions


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = args.run_dir
    tokenizer = AutoTokenizer.from_pretrained(run / "checkpoints" / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "teacher").eval()
    rows = datasets.load_dataset("parquet", data_files=str(run / "curated" / "*.parquet"), split="train")
    prompts = [tokenizer.apply_chat_template(m[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
               for m in rows.select(range(min(args.prompts, len(rows))))["messages"]]
    for name in args.students:
        student = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / name).eval()
        completions = sample_completions(student, prompts, args.max_new_tokens, 1.0, tokenizer.eos_token_id,
                                         tokenizer.pad_token_id, args.seed)
        kl, tokens = reverse_kl(student, teacher, prompts, completions)
        print(f"{name}: reverse KL {kl / tokens:.4f} per token over {tokens} sampled tokens ({len(prompts)} prompts)")
    return 0


@torch.no_grad()
def reverse_kl(student, teacher, prompts: list[list[int]], completions: list[list[int]]) -> tuple[float, int]:
    """(sum over the completion tokens of KL(p_student || p_teacher) at each, number of tokens)."""
    total, tokens = 0.0, 0
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = torch.tensor([prompt + completion])
        positions = slice(len(prompt) - 1, ids.shape[1] - 1)  # position t-1 predicts the token at t
        log_s = student(ids).logits[0, positions].float().log_softmax(-1)
        log_t = teacher(ids).logits[0, positions].float().log_softmax(-1)
        total += (log_s.exp() * (log_s - log_t)).sum().item()
        tokens += len(completion)
    return total, tokens


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a quickstart run directory (checkpoints/, curated/)")
    parser.add_argument("students", nargs="+", help="checkpoint names under <run_dir>/checkpoints")
    parser.add_argument("--prompts", type=int, default=48, help="the first N curated prompts")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
