"""The toy world: arithmetic word problems, a tokenizer and tiny random Qwen2 models, built offline.

    python -m data.toyworld build --out cache/toyworld [--seed 0] [--n-train 10000] [--n-test 500]

From Python (e.g. a pytest session fixture): `build(out_dir, seed=0, n_train=..., n_test=...)` returns a
`ToyWorld` of paths (train, test, tokenizer, teacher, student, manifest). Rebuilding is a cheap no-op.

A gold training example renders through data/chat_template.jinja as

    <|im_start|>user
    Ada has 47 apples. Ada buys 38 more apples. How many apples does Ada have now?<|im_end|>
    <|im_start|>assistant
    <think>
    47+38
    ones: 7+8=15, write 5 carry 1
    tens: 4+3+1=8
    47+38=85
    </think>

    The answer is \\boxed{85}.<|im_end|>

and the generation prompt ends with "<|im_start|>assistant\\n": the model writes "<think>" itself.
"""

from data.toyworld.build import ToyWorld, build
from data.toyworld.models import SIZES, build_model, count_parameters
from data.toyworld.problems import (
    generate_problems,
    gold_conversation,
    gold_message,
    read_jsonl,
)
from data.toyworld.tokenizer import CHAT_TEMPLATE_PATH, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE_PATH",
    "SIZES",
    "ToyWorld",
    "build",
    "build_model",
    "count_parameters",
    "generate_problems",
    "gold_conversation",
    "gold_message",
    "read_jsonl",
    "train_tokenizer",
]
