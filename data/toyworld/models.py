"""Randomly initialised Qwen2 teacher and student, saved like a hub model (weights + tokenizer + config).

head_dim is 64 because vLLM's CPU attention accepts only some head sizes (32, 64, 80, ...; not 16).
The teacher is sized to learn difficulty 1-3 from gold solutions in minutes on a 2-core CPU; the student has
half its depth and less than half its parameters, so that distillation has a gap to close.
"""

from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

# Measured on 2 idle CPU cores with a plain loop over gold conversations (assistant-only loss, batches of 16 from
# one difficulty, AdamW lr 3e-3, cosine): the teacher trains at ~10k tokens/s and after 3000 steps (~9 min)
# greedily solves 20/19/20/12/5 of 20 held-out problems at difficulty 1..5.
SIZES = {
    "teacher": {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
    },
    "student": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    },
}
HEAD_DIM = 64


def model_config(tokenizer: PreTrainedTokenizerBase, size: str) -> Qwen2Config:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    shape = SIZES[size]
    return Qwen2Config(
        vocab_size=len(tokenizer),
        head_dim=HEAD_DIM,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,
        bos_token_id=None,  # the chat template starts with <|im_start|>; there is no BOS token
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **shape,
    )


def build_model(tokenizer: PreTrainedTokenizerBase, size: str, seed: int = 0) -> Qwen2ForCausalLM:
    """A fresh model with weights drawn from `seed` (the same seed gives the same weights)."""
    config = model_config(tokenizer, size)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (the tied input and output embedding counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_model(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Weights (safetensors), config.json, generation_config.json and the tokenizer, in one directory."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
