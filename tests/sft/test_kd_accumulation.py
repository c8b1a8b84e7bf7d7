"""SparseKDTrainer normalizes by the completion tokens of the whole accumulated batch: 8x1 and 2x4 give one update."""

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from trl import SFTConfig

from sft.kd import SparseKDTrainer


def tiny_model(vocab_size: int, pad_token_id: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, pad_token_id=pad_token_id))


def kd_rows(vocab_size: int, n: int = 8, k: int = 4) -> datasets.Dataset:
    """Pre-tokenized KD examples with prompts and completions of different lengths (3..24 completion tokens), and
    top-k lists of the teacher: k of them + one "rest" outcome from a Dirichlet draw."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        p, c = 3 + i % 3, 3 + 3 * i
        ids = rng.integers(3, vocab_size, p + c).tolist()
        top = np.full((p + c, k), -1, np.int32)
        logprobs = np.full((p + c, k), -np.inf, np.float16)
        for t in range(p, p + c):
            top[t] = rng.choice(vocab_size, k, replace=False)
            logprobs[t] = np.log(rng.dirichlet(np.ones(k + 1))[:k])
        rows.append({"input_ids": ids, "completion_mask": [0] * p + [1] * c, "labels": [-100] * p + ids[p:],
                     "teacher_top_ids": top, "teacher_top_logprobs": logprobs})
    return datasets.Dataset.from_list(rows)


def one_sgd_step(toyworld, tmp_path, batch_size: int, accumulation: int, **kd) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    model = tiny_model(len(tokenizer), tokenizer.pad_token_id)
    args = SFTConfig(output_dir=str(tmp_path / f"{batch_size}x{accumulation}"), per_device_train_batch_size=batch_size,
                     gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
                     lr_scheduler_type="constant", report_to="none", save_strategy="no", use_cpu=True,
                     max_length=None, seed=0, disable_tqdm=True)
    trainer = SparseKDTrainer(model=model, args=args, train_dataset=kd_rows(len(tokenizer)),
                              processing_class=tokenizer, **kd)
    trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_accumulation_splits_give_identical_updates(toyworld, tmp_path):
    kd = {"kd_alpha": 0.3, "kd_temperature": 2.0, "kd_chunk_size": 7}
    whole = one_sgd_step(toyworld, tmp_path, 8, 1, **kd)
    split = one_sgd_step(toyworld, tmp_path, 2, 4, **kd)
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    initial = tiny_model(len(tokenizer), tokenizer.pad_token_id).state_dict()
    assert (whole["lm_head.weight"] - initial["lm_head.weight"]).abs().max() > 1e-3  # the step did something
    for name, weights in whole.items():
        torch.testing.assert_close(split[name], weights, rtol=0, atol=1e-6, msg=name)


def test_examples_truncated_after_preparation_are_an_error(toyworld, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    args = SFTConfig(output_dir=str(tmp_path), max_length=12, report_to="none", use_cpu=True, max_steps=1)
    trainer = SparseKDTrainer(model=tiny_model(len(tokenizer), tokenizer.pad_token_id), args=args,
                              train_dataset=kd_rows(len(tokenizer)), processing_class=tokenizer)
    with pytest.raises(ValueError, match="truncated after prepare_kd_dataset"):
        trainer.train()


def test_packing_and_settings_out_of_range_are_refused(toyworld, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    model = tiny_model(len(tokenizer), tokenizer.pad_token_id)
    ds = kd_rows(len(tokenizer))
    packed = SFTConfig(output_dir=str(tmp_path), packing=True, max_length=64, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="packing"):
        SparseKDTrainer(model=model, args=packed, train_dataset=ds, processing_class=tokenizer)
    plain = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    for bad, field in (({"kd_alpha": 1.5}, "kd_alpha"), ({"kd_temperature": 0.0}, "kd_temperature"),
                       ({"kd_divergence": "reverse"}, "kd_divergence"), ({"kd_chunk_size": 0}, "kd_chunk_size")):
        with pytest.raises(ValueError, match=field):
            SparseKDTrainer(model=model, args=plain, train_dataset=ds, processing_class=tokenizer, **bad)
