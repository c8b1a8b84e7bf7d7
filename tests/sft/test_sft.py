"""python -m sft on tiny toy-world models: full and LoRA runs learn and touch the right weights, the loss mask is
exactly the assistant turn, lengths are checked before training, runs resume, config errors name the field."""

import json
import logging
import shutil

import datasets
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.data import load_curated, tokenize, training_template
from sft.main import main


def run(toyworld, curated, out, *flags):
    return main(["--dataset", str(curated), "--model_name_or_path", str(toyworld.student), "--output_dir", str(out),
                 "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--logging_steps", "1",
                 "--save_steps", "4", "--seed", "0", *flags])


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_full_fine_tuning_lowers_the_loss_and_changes_the_weights(toyworld, curated, tmp_path):
    assert run(toyworld, curated, tmp_path / "full", "--max_steps", "12") == 0
    metrics = json.loads((tmp_path / "full" / "sft_metrics.json").read_text())
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"]
    assert metrics["examples"] == 48 and metrics["dropped_long"] == 0 and metrics["global_step"] == 12
    assert metrics["tokens"] > 0 and metrics["tokens_per_s"] > 0
    before, after = weights(toyworld.student), weights(tmp_path / "full")
    assert all(not torch.equal(before[k], after[k]) for k in before if "layers.0.self_attn.q_proj" in k)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")  # loads and generates like any checkpoint
    tok = AutoTokenizer.from_pretrained(tmp_path / "full")
    ids = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] > ids["input_ids"].shape[1]


def test_lora_trains_only_the_adapter_and_merges(toyworld, curated, tmp_path):
    out = tmp_path / "lora"
    assert run(toyworld, curated, out, "--max_steps", "8", "--use_peft", "true", "--lora_r", "4",
               "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj", "--merge", "true") == 0
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    base, merged = weights(toyworld.student), weights(out / "merged")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)  # the base itself stayed frozen


def test_the_loss_mask_is_exactly_the_assistant_turn(toyworld, curated):
    tokenizer = AutoTokenizer.from_pretrained(toyworld.student)
    rows = load_curated(str(curated)).select(range(3))
    enc = tokenize(rows, tokenizer, training_template(tokenizer, None))
    for row, ids, mask in zip(rows, enc["input_ids"], enc["assistant_masks"], strict=True):
        trained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
        assert trained == row["messages"][-1]["content"] + "<|im_end|>"
        prompt = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
        assert prompt == f"<|im_start|>user\n{row['messages'][0]['content']}<|im_end|>\n<|im_start|>assistant\n\n"


def test_assistant_only_loss_false_trains_on_every_token(toyworld, curated, tmp_path, caplog):
    from sft.config import DistillArguments
    from sft.main import prepare

    tokenizer = AutoTokenizer.from_pretrained(toyworld.student)
    rows = load_curated(str(curated)).select(range(2))
    template = training_template(tokenizer, None)
    args = DistillArguments(dataset=str(curated))
    masked, whole = prepare(rows, tokenizer, template, args), prepare(rows, tokenizer, template, args, True)
    for m, w in zip(masked, whole, strict=True):
        assert w["labels"] == w["input_ids"] == m["input_ids"]
        assert -100 in m["labels"] and m["labels"][-5:-1] == m["input_ids"][-5:-1]  # the answer, then "\n"
    caplog.set_level(logging.INFO)
    assert run(toyworld, curated, tmp_path / "whole", "--max_steps", "2", "--assistant_only_loss", "false") == 0
    assert "loss on every token of the conversation" in caplog.text
    assert run(toyworld, curated, tmp_path / "kd", "--assistant_only_loss", "false", "--kd", "online",
               "--teacher_model", str(toyworld.student)) == 2
    assert "assistant_only_loss: false cannot be combined with kd" in caplog.text


def test_online_kd_at_kd_alpha_1_trains_on_cross_entropy(toyworld, curated, tmp_path):
    """kd_alpha 1 makes the loss cross-entropy alone: the step must move every weight, and both parts are logged."""
    out = tmp_path / "online"
    assert run(toyworld, curated, out, "--max_steps", "1", "--kd", "online", "--teacher_model", str(toyworld.teacher),
               "--kd_alpha", "1.0") == 0
    before, after = weights(toyworld.student), weights(out)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    (logged,) = [h for h in json.loads((out / "sft_metrics.json").read_text())["log_history"] if "loss" in h]
    assert logged["kd"] > 0 and logged["loss"] == pytest.approx(logged["ce"], rel=1e-4)


def test_max_length_is_derived_checked_and_never_truncates(toyworld, curated, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert run(toyworld, curated, tmp_path / "derived", "--max_steps", "1") == 0
    longest = json.loads((tmp_path / "derived" / "sft_metrics.json").read_text())["max_length"]
    assert f"max_length: {longest} (derived" in caplog.text
    assert run(toyworld, curated, tmp_path / "short", "--max_steps", "1", "--max_length", str(longest - 1)) == 2
    assert f"longer than {longest - 1} tokens (the longest has {longest})" in caplog.text
    assert "drop_long" in caplog.text and not (tmp_path / "short").exists()
    assert run(toyworld, curated, tmp_path / "dropped", "--max_steps", "1", "--max_length", str(longest - 1),
               "--drop_long", "true") == 0
    metrics = json.loads((tmp_path / "dropped" / "sft_metrics.json").read_text())
    assert metrics["dropped_long"] >= 1 and metrics["examples"] == 48 - metrics["dropped_long"]


def test_a_rerun_resumes_from_the_last_checkpoint(toyworld, curated, tmp_path):
    out = tmp_path / "resume"
    assert run(toyworld, curated, out, "--max_steps", "4") == 0  # an "interrupted" job: checkpoint-4 on disk
    first = [h for h in json.loads((out / "sft_metrics.json").read_text())["log_history"] if "loss" in h]
    # a run stopped while saving leaves a checkpoint without trainer_state.json (the Trainer writes it last)
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-6", ignore=shutil.ignore_patterns("trainer_state.json"))
    assert run(toyworld, curated, out, "--max_steps", "8") == 0
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-4") and metrics["global_step"] == 8
    logged = [h for h in metrics["log_history"] if "loss" in h]
    assert [h["step"] for h in logged] == list(range(1, 9))  # steps 1-4 once (restored), then 5-8: continued
    assert logged[:4] == first


def test_config_errors_name_the_field(toyworld, curated, tmp_path, caplog):
    assert run(toyworld, curated, tmp_path / "x", "--kd", "dense") == 2
    assert "kd: 'dense' is not one of" in caplog.text
    assert main(["--model_name_or_path", str(toyworld.student), "--output_dir", str(tmp_path / "y")]) == 2
    assert "dataset: required" in caplog.text
    assert run(toyworld, tmp_path / "nothing-here", tmp_path / "z") == 2
    assert "nothing-here" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pq.read_table(next(curated.glob("*.parquet"))).slice(0, 0), empty / "train-00000.parquet")
    assert run(toyworld, empty, tmp_path / "v") == 2
    assert "has no rows (did filter reject every trace?" in caplog.text
    for flags, message in ((["--kd", "sparse", "--kd_divergence", "reverse"], "kd_divergence: reverse needs"),
                           (["--kd", "online", "--teacher_model", "t", "--kd_top_k", "5"], "kd_top_k: "),
                           (["--packing", "true", "--packing_strategy", "wrapped"], "packing_strategy: 'wrapped'"),
                           (["--chat_template", "no-such.jinja"], "chat_template: no such file: no-such.jinja")):
        assert run(toyworld, curated, tmp_path / "u", *flags) == 2
        assert message in caplog.text
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"dataset: {curated}\nmodel_name_or_path: {toyworld.student}\nlerning_rate: 0.1\n")
    assert main(["--config", str(bad), "--output_dir", str(tmp_path / "w")]) == 2
    assert "lerning_rate" in caplog.text


def test_curated_sets_load_from_a_folder_a_file_or_a_glob(curated):
    file = next(curated.glob("*.parquet"))
    for source in (str(curated), str(file), str(curated / "*.parquet")):
        assert len(load_curated(source)) == 48
    assert isinstance(load_curated(str(curated)), datasets.Dataset)


def test_a_bug_keeps_its_traceback(toyworld, curated, tmp_path, monkeypatch):
    """Only the errors the stage raises on purpose become "exit 2"; anything else is a bug and propagates."""
    def broken(*args):
        raise ValueError("a bug")

    monkeypatch.setattr("sft.main.load_curated", broken)
    with pytest.raises(ValueError, match="a bug"):
        run(toyworld, curated, tmp_path / "bug")
