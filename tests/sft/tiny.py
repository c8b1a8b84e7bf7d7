"""Tiny models of three families (plain, soft-capped, logit-scaled) and synthetic KD rows, for the sft tests."""

import datasets
import numpy as np
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from trl import SFTConfig

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)


def tiny_model(vocab_size: int, pad_token_id: int, family: str = "qwen2", seed: int = 0, head_scale: float = 1.0):
    """A 1-layer model; `head_scale` multiplies the LM head (peaked distributions, logits where soft-capping bites).
    gemma2: final_logit_softcapping 3 (Gemma2 itself: 30, with logits to match); cohere: logit_scale 0.25."""
    torch.manual_seed(seed)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, head_dim=16, tie_word_embeddings=False,
                                             pad_token_id=pad_token_id, **SHAPE))
    elif family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab_size, head_dim=16, final_logit_softcapping=3.0,
                                               pad_token_id=pad_token_id, attn_implementation="eager", **SHAPE))
    else:
        model = CohereForCausalLM(CohereConfig(vocab_size=vocab_size, logit_scale=0.25, pad_token_id=pad_token_id,
                                               bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
                                               **SHAPE))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    return model


def kd_rows(vocab_size: int, n: int = 8, k: int = 4, seed: int = 0) -> datasets.Dataset:
    """Pre-tokenized KD examples with prompts and completions of different lengths (3..24 completion tokens), and
    the teacher's top-k + rest per completion position from a Dirichlet draw over k+1 outcomes."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p, c = 3 + i % 3, 3 + 3 * i
        ids = rng.integers(3, vocab_size, p + c).tolist()
        top = np.full((p + c, k), -1, np.int32)
        logprobs = np.full((p + c, k), -np.inf, np.float16)
        rest = np.full(p + c, -np.inf, np.float32)
        for t in range(p, p + c):
            top[t] = rng.choice(vocab_size, k, replace=False)
            probs = np.log(rng.dirichlet(np.ones(k + 1)))
            logprobs[t], rest[t] = probs[:k], probs[k]
        rows.append({"input_ids": ids, "completion_mask": [0] * p + [1] * c, "labels": [-100] * p + ids[p:],
                     "teacher_top_ids": top, "teacher_top_logprobs": logprobs, "teacher_rest_logprobs": rest})
    return datasets.Dataset.from_list(rows)


def training_args(out, **kw) -> SFTConfig:
    base = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=1, learning_rate=1.0, optim="sgd",
                lr_scheduler_type="constant", report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                max_length=None, seed=0, disable_tqdm=True, bf16=False)
    return SFTConfig(**{**base, **kw})
