"""Packed and padding-free batches (sft/packing.py): each example's loss and gradient are those it has alone, for CE
and sparse KD, under eager and sdpa attention; one optimizer step on packed rows (with and without gradient
checkpointing) and on padding-free rows is the step on padded rows, for kd: none (TRL's packing), sparse (ours) and
online (the teacher on the same row); what cannot keep examples apart is refused by name."""

import copy
import json

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from trl import SFTTrainer

from data.config import ConfigError
from sft.config import DistillArguments, check_with_training_args
from sft.heads import output_head
from sft.kd_data import KD_COLUMNS, KDCollator
from sft.losses import sparse_kd_loss
from sft.main import main
from sft.packing import check_attention, pack_kd
from sft.trainer import DistillTrainer, model_inputs
from tests.sft.test_kd import teacher_run  # noqa: F401 (a fixture)
from tests.sft.test_sft import run
from tests.sft.tiny import kd_rows, tiny_model, training_args

VOCAB, PAD = 64, 0
ROW = 48  # tokens per packed row: kd_rows' 8 examples (6..29 tokens) go into several rows of a few examples


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                   pad_token="t0", eos_token="t2", unk_token="t1")


def losses(model, batch, kd: bool, segments):
    """Per segment (start, end) of the batch's one row: (CE + KL) of the tokens it predicts, and their sum."""
    hidden = model.base_model(**model_inputs(batch), use_cache=False).last_hidden_state
    head = output_head(model)
    each = []
    for start, end in segments:
        teacher = [batch[c][:, start:end] for c in KD_COLUMNS] if kd else []
        loss, *_ = sparse_kd_loss(hidden[:, start:end], head, batch["labels"][:, start:end], *teacher,
                                  ce_weight=1.0, kd_weight=1.0 if kd else 0.0, chunk_size=7)
        each.append(loss)
    return each, sum(each)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kd", [False, True], ids=["ce", "sparse_kd"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_each_example_keeps_its_own_loss_and_gradient_in_a_packed_row(tmp_path, attention, kd):
    rows = kd_rows(VOCAB, n=8, k=4)
    model = tiny_model(VOCAB, PAD).train()
    model.set_attn_implementation(attention)
    alone = {}
    for row in rows:  # one example per batch, no padding: the reference
        batch = KDCollator(PAD)([row])
        (loss,), _ = losses(model, batch, kd, [(0, len(row["input_ids"]))])
        alone[tuple(row["input_ids"])] = loss
    model.zero_grad()
    sum(alone.values()).backward()
    want = gradients(model)

    packed_rows = pack_kd(rows, training_args(tmp_path, max_length=ROW), ("input_ids", "labels", *KD_COLUMNS))
    assert len(packed_rows) < len(rows) and max(len(r) for r in packed_rows["seq_lengths"]) > 1
    batch = KDCollator(PAD, padding_free=True)(list(packed_rows))
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(len(r) for r in rows["input_ids"]))
    bounds = batch["cu_seq_lens_q"].tolist()
    segments = list(zip(bounds[:-1], bounds[1:], strict=True))
    model.zero_grad()
    each, total = losses(model, batch, kd, segments)
    total.backward()
    for (start, end), loss in zip(segments, each, strict=True):
        key = tuple(batch["input_ids"][0, start:end].tolist())
        assert loss.item() == pytest.approx(alone[key].item(), rel=1e-5)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    # the test can fail: the same row read as one sequence lets examples attend to the ones before them
    joined = {k: v for k, v in batch.items() if k not in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k")}
    mixed, _ = losses(model, joined, kd, segments)
    assert any(abs(a.item() - b.item()) > 1e-4 for a, b in zip(mixed, each, strict=True))


def one_step(tmp_path, name, kd: str, **packing):
    """The student's weights after one SGD step on kd_rows' 8 examples (all in the step)."""
    tokenizer, student = tiny_tokenizer(), tiny_model(VOCAB, PAD)
    rows = kd_rows(VOCAB, n=8, k=4)
    args = training_args(tmp_path / name, max_length=ROW if packing.get("packing") else None, **packing)
    if kd == "none":
        trainer = SFTTrainer(model=student, args=args, train_dataset=rows.select_columns(["input_ids", "labels"]),
                             processing_class=tokenizer)
    else:
        teacher = tiny_model(VOCAB, PAD, seed=1) if kd == "online" else None
        if kd == "online":
            rows = rows.select_columns(["input_ids", "labels"])
        distill = DistillArguments(dataset="unused", kd=kd, teacher_model="unused", kd_temperature=2.0)
        trainer = DistillTrainer(model=student, args=args, train_dataset=rows, processing_class=tokenizer,
                                 distill=distill, teacher_model=teacher)
    batch = next(iter(trainer.get_train_dataloader()))
    if packing:  # one padding-free row of all 8 examples, positions restarting per example
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        assert (batch["position_ids"] == 0).sum() == 8
    trainer.train()
    assert trainer.state.global_step == 1
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


@pytest.mark.parametrize("kd", ["none", "sparse", "online"])
def test_a_step_on_packed_rows_is_the_step_on_padded_rows(tmp_path, kd):
    start = {k: v.clone() for k, v in tiny_model(VOCAB, PAD).state_dict().items()}
    padded = one_step(tmp_path, "padded", kd)
    packed = one_step(tmp_path, "packed", kd, packing=True)
    padding_free = one_step(tmp_path, "free", kd, padding_free=True, per_device_train_batch_size=8)
    checkpointed = one_step(tmp_path, "checkpointed", kd, packing=True, gradient_checkpointing=True)
    for name, value in padded.items():
        assert not torch.equal(value, start[name]) or "embed" in name  # the step moved the weights
        for other in (packed, padding_free, checkpointed):
            torch.testing.assert_close(other[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_what_cannot_keep_examples_apart_is_refused_by_name(tmp_path):
    distill = DistillArguments(dataset="unused", kd="sparse")
    check_with_training_args(distill, training_args(tmp_path, packing=True, max_length=64))  # bfd: accepted
    with pytest.raises(ConfigError, match="^packing_strategy: 'wrapped'"):
        check_with_training_args(distill, training_args(tmp_path, packing=True, packing_strategy="wrapped",
                                                        max_length=64))
    on_policy = DistillArguments(dataset="unused", kd="on_policy", teacher_model="t")
    with pytest.raises(ConfigError, match="^packing / padding_free: kd: on_policy"):
        check_with_training_args(on_policy, training_args(tmp_path, packing=True, max_length=64))
    aligned = DistillArguments(dataset="unused", kd="online", teacher_model="t", attention_weight=1.0)
    with pytest.raises(ConfigError, match="^attention_weight:"):
        check_with_training_args(aligned, training_args(tmp_path, padding_free=True))
    model = copy.deepcopy(tiny_model(VOCAB, PAD))
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        check_attention(training_args(tmp_path, packing=True, max_length=64), model)
    model.config._attn_implementation = "paged|sdpa"
    check_attention(training_args(tmp_path), model)  # unpacked: any implementation
    with pytest.raises(ConfigError, match="^attn_implementation: 'paged|sdpa' ignores the example boundaries"):
        check_attention(training_args(tmp_path, padding_free=True), model)


@pytest.mark.parametrize("flag", ["--packing", "--padding_free"])
def test_python_m_sft_trains_on_packed_rows(toyworld, curated, tmp_path, flag, caplog):
    caplog.set_level("INFO")
    assert run(toyworld, curated, tmp_path / "out", "--max_steps", "2", flag, "true") == 0
    metrics = json.loads((tmp_path / "out" / "sft_metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["max_length"] > 0 and metrics["tokens"] > 0
    assert "keeps examples apart with a dense [tokens, tokens] mask" in caplog.text  # sdpa on a CPU


def test_python_m_sft_packs_sparse_kd_rows_from_a_real_teacher_run(toyworld, teacher_run, tmp_path, caplog):  # noqa: F811
    caplog.set_level("INFO")
    traces, _ = teacher_run
    out = tmp_path / "out"
    assert main(["--dataset", str(traces / "curated"), "--model_name_or_path", str(toyworld.student),
                 "--output_dir", str(out), "--kd", "sparse", "--packing", "true", "--max_length", "256",
                 "--per_device_train_batch_size", "2", "--max_steps", "2", "--logging_steps", "1",
                 "--learning_rate", "3e-3", "--save_strategy", "no", "--seed", "0"]) == 0
    assert "packing: 8 examples in" in caplog.text
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["last_logged_parts"]["kd"] > 0
