"""DistillTrainer normalizes by the completion tokens of the whole accumulated batch, counted by itself: 8x1 and 2x4
give one update, also for models transformers does not count for (model_accepts_loss_kwargs false)."""

import pytest
import torch
from transformers import AutoTokenizer

from sft.config import ConfigError, DistillArguments, check_with_training_args
from sft.trainer import DistillTrainer
from tests.sft.tiny import kd_rows, tiny_model, training_args

KD = DistillArguments(dataset="unused", kd="sparse", kd_alpha=0.3, kd_temperature=2.0, kd_chunk_size=7)


def one_sgd_step(tokenizer, out, batch_size: int, accumulation: int, accepts_loss_kwargs: bool = True):
    model = tiny_model(len(tokenizer), tokenizer.pad_token_id)
    model.accepts_loss_kwargs = accepts_loss_kwargs  # as Gemma3 / Qwen2.5-VL conditional generation models say
    trainer = DistillTrainer(model=model, args=training_args(out, per_device_train_batch_size=batch_size,
                                                             gradient_accumulation_steps=accumulation),
                             train_dataset=kd_rows(len(tokenizer)), processing_class=tokenizer, distill=KD)
    assert trainer.model_accepts_loss_kwargs is accepts_loss_kwargs
    trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_accumulation_splits_give_identical_updates(toyworld, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    whole = one_sgd_step(tokenizer, tmp_path / "8x1", 8, 1)
    initial = tiny_model(len(tokenizer), tokenizer.pad_token_id).state_dict()
    assert (whole["lm_head.weight"] - initial["lm_head.weight"]).abs().max() > 1e-3  # the step did something
    for accepts in (True, False):
        split = one_sgd_step(tokenizer, tmp_path / f"2x4-{accepts}", 2, 4, accepts_loss_kwargs=accepts)
        for name, weights in whole.items():
            torch.testing.assert_close(split[name], weights, rtol=0, atol=1e-6, msg=f"{name} ({accepts})")


def test_examples_truncated_after_preparation_are_an_error(toyworld, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    trainer = DistillTrainer(model=tiny_model(len(tokenizer), tokenizer.pad_token_id),
                             args=training_args(tmp_path, max_length=12), train_dataset=kd_rows(len(tokenizer)),
                             processing_class=tokenizer, distill=KD)
    with pytest.raises(ValueError, match="truncated after prepare_kd_dataset"):
        trainer.train()


def test_settings_kd_cannot_honour_are_refused_naming_them(tmp_path):
    for bad, field in (({"kd_alpha": 1.5}, "kd_alpha"), ({"kd_temperature": 0.0}, "kd_temperature"),
                       ({"kd_divergence": "reverse"}, "kd_divergence"), ({"kd_chunk_size": 0}, "kd_chunk_size"),
                       ({"kd_top_k": 0}, "kd_top_k"), ({"kd": "online"}, "teacher_model"),
                       ({"kd": "online", "teacher_model": "t", "kd_divergence": "jsd", "kd_jsd_beta": 1.0},
                        "kd_jsd_beta"), ({"chat_template_kwargs": "[1]"}, "chat_template_kwargs")):
        with pytest.raises(ConfigError, match=f"^{field}:"):
            DistillArguments(**{"dataset": "unused", "kd": "sparse", **bad})
    assert DistillArguments(dataset="unused", chat_template_kwargs='{"enable_thinking": false}'
                            ).chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ConfigError, match="^packing_strategy"):  # bfd is accepted (tests/sft/test_packing.py)
        check_with_training_args(KD, training_args(tmp_path, packing=True, packing_strategy="wrapped", max_length=64))
