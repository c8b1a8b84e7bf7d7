"""Sparse KD on real teacher logprobs (a tracegen run of the toy teacher) and online KD, through real TRL training.

The teacher run is a real `python -m tracegen --engine hf ... --top_logprobs 5` subprocess; the curated set is
built from its traces and logprobs the way the filter stage exports it (data/README.md).
"""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from sft.kd import KDCollator, SparseKDTrainer, build_online_kd_trainer, prepare_kd_dataset
from tracegen.records import LOGPROB_SCHEMA

ROOT = Path(__file__).resolve().parents[2]
K = 5


@pytest.fixture(scope="module")
def teacher_run(toyworld, tmp_path_factory):
    """8 sampled traces of the toy teacher with top-5 logprobs, and a curated parquet over them."""
    run = tmp_path_factory.mktemp("kd-run")
    subprocess.run([sys.executable, "-m", "tracegen", "--engine", "hf", "--model", str(toyworld.teacher),
                    "--problems", str(toyworld.train), "--output_dir", str(run), "--limit", "4", "--n", "2",
                    "--max_tokens", "32", "--top_logprobs", str(K), "--temperature", "1.0", "--seed", "0"],
                   cwd=ROOT, check=True, capture_output=True)
    traces = pq.read_table(run / "traces").to_pylist()
    (logprobs_part,) = (run / "logprobs").glob("part-*.parquet")
    logprobs = {r["trace_id"]: r for r in pq.read_table(logprobs_part).to_pylist()}
    rows = [{"messages": [*json.loads(t["messages"]),
                          {"role": "assistant", "content": t["content"], "reasoning_content": t["reasoning"]}],
             "trace_id": t["trace_id"], "problem_id": t["problem_id"],
             "completion_token_ids": logprobs[t["trace_id"]]["token_ids"],
             "logprobs_file": f"../logprobs/{logprobs_part.name}", "teacher_model": str(toyworld.teacher)}
            for t in traces]
    (run / "curated").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), run / "curated" / "train.parquet")
    return run, logprobs


def curated(run) -> datasets.Dataset:
    return datasets.Dataset.from_parquet(str(run / "curated" / "train.parquet"))


def args(tmp_path, **kw) -> SFTConfig:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=4, learning_rate=3e-3,
                lr_scheduler_type="constant", report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                max_length=None, seed=0, assistant_only_loss=True, disable_tqdm=True)
    return SFTConfig(**{**base, **kw})


def test_prepare_kd_dataset_puts_the_teachers_exact_tokens_after_the_prompt(toyworld, teacher_run):
    run, logprobs = teacher_run
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    ds = prepare_kd_dataset(curated(run), tokenizer, run / "curated", chat_template=None)
    assert len(ds) == 8
    for row in ds:
        stored = logprobs[row["trace_id"]]
        n = len(stored["token_ids"])
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_dict=False)
        assert row["input_ids"] == prompt + stored["token_ids"] and row["input_ids"][-n:] == stored["token_ids"]
        assert row["completion_mask"] == [0] * len(prompt) + [1] * n
        assert row["labels"] == [-100] * len(prompt) + stored["token_ids"]
        top_ids, top_logprobs = np.array(row["teacher_top_ids"]), np.array(row["teacher_top_logprobs"])
        assert top_ids.shape == top_logprobs.shape == (len(prompt) + n, K)
        assert (top_ids[: len(prompt)] == -1).all() and np.isneginf(top_logprobs[: len(prompt)]).all()
        assert top_ids[len(prompt):].tolist() == stored["top_ids"]
        np.testing.assert_array_equal(top_logprobs[len(prompt):], np.array(stored["top_logprobs"]))
    batch = KDCollator(pad_token_id=tokenizer.pad_token_id)([ds[i] for i in range(3)])
    assert batch["teacher_top_ids"].shape == (3, batch["input_ids"].shape[1], K)
    assert ((batch["labels"] != -100) == (batch["teacher_top_ids"][..., 0] >= 0)).all()


def test_a_row_without_matching_logprobs_is_an_error_naming_it(toyworld, teacher_run, tmp_path):
    run, _ = teacher_run
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    rows = curated(run).to_list()
    cases = [
        ({"trace_id": "no-such-trace"}, "no logprobs for 1 trace.*no-such-trace"),
        ({"completion_token_ids": rows[0]["completion_token_ids"][:-1]}, "completion_token_ids differ"),
        ({"logprobs_file": None}, "logprobs_file is null"),
        ({"logprobs_file": "../logprobs/missing.parquet"}, "missing.parquet.*does not exist"),
    ]
    for change, message in cases:
        broken = datasets.Dataset.from_list([{**rows[0], **change}, rows[1]])
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            prepare_kd_dataset(broken, tokenizer, run / "curated", None)
    with pytest.raises(ValueError, match="no column logprobs_file"):
        prepare_kd_dataset(curated(run).remove_columns("logprobs_file"), tokenizer, run / "curated", None)


def test_vllm_style_top_k_with_the_sampled_token_added_is_deduplicated(toyworld, tmp_path):
    """vLLM lists the top-k plus the sampled token (unsorted), so positions have k or k+1 entries, maybe twice."""
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    (tmp_path / "curated").mkdir()
    lp = {"trace_id": "t0", "token_ids": [40, 41], "logprobs": [-0.5, -1.0],
          "top_ids": [[7, 40, 9], [41, 8, 41, 9]], "top_logprobs": [[-1.5, -0.5, -2.0], [-1.0, -1.2, -1.0, -3.0]]}
    pq.write_table(pa.Table.from_pylist([lp], schema=LOGPROB_SCHEMA), tmp_path / "lp.parquet")
    row = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}],
           "trace_id": "t0", "completion_token_ids": [40, 41], "logprobs_file": "../lp.parquet"}
    (out,) = prepare_kd_dataset(datasets.Dataset.from_list([row]), tokenizer, tmp_path / "curated", None)
    assert out["teacher_top_ids"][-2:] == [[7, 40, 9, -1], [41, 8, -1, 9]]
    assert out["teacher_top_logprobs"][-1] == [-1.0, pytest.approx(-1.2, abs=1e-3), -np.inf, -3.0]


def test_sparse_kd_trains_a_student_on_the_teachers_logprobs(toyworld, teacher_run, tmp_path):
    run, _ = teacher_run
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    ds = prepare_kd_dataset(curated(run), tokenizer, run / "curated", None)
    model = AutoModelForCausalLM.from_pretrained(toyworld.student)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SparseKDTrainer(model=model, args=args(tmp_path), train_dataset=ds, processing_class=tokenizer,
                              kd_alpha=0.5, kd_temperature=1.0, kd_chunk_size=16)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and all(np.isfinite(e["loss"]) and e["kd"] > 0 for e in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]  # (kd starts near 0: random teacher vs random student)
    assert logs[0]["loss"] == pytest.approx(0.5 * logs[0]["ce"] + 0.5 * logs[0]["kd"], rel=1e-4)
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sparse_kd_with_lora_trains_only_the_adapter(toyworld, teacher_run, tmp_path):
    from peft import LoraConfig

    run, _ = teacher_run
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    ds = prepare_kd_dataset(curated(run), tokenizer, run / "curated", None)
    trainer = SparseKDTrainer(model=str(toyworld.student), args=args(tmp_path, max_steps=2, learning_rate=1e-2),
                              train_dataset=ds, processing_class=tokenizer, kd_alpha=0.2, kd_temperature=2.0,
                              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    changed = {k for k, v in trainer.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all("lora_B" in k or "lora_A" in k for k in changed)
    assert any("lora_B" in k for k in changed)


def kd_eval_loss(model_dir, toyworld, ds, tmp_path) -> float:
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    trainer = SparseKDTrainer(model=str(model_dir), args=args(tmp_path, per_device_eval_batch_size=8),
                              train_dataset=ds, eval_dataset=ds, processing_class=tokenizer, kd_alpha=0.0)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_kd"], rel=1e-4)  # alpha 0: the loss is the KD
    return metrics["eval_loss"]


def test_the_teacher_agrees_with_its_own_logprobs(toyworld, teacher_run, tmp_path):
    run, _ = teacher_run
    ds = prepare_kd_dataset(curated(run), AutoTokenizer.from_pretrained(toyworld.tokenizer), run / "curated", None)
    teacher, student = kd_eval_loss(toyworld.teacher, toyworld, ds, tmp_path), kd_eval_loss(toyworld.student,
                                                                                           toyworld, ds, tmp_path)
    # the teacher's only gap to itself is float16 rounding of its logprobs; the random student is near uniform, as is
    # the random teacher, so its KL is small too, yet far above
    assert teacher < 5e-4 and student > 10 * teacher


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_online_kd_from_a_local_teacher(toyworld, tmp_path, divergence):
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    gold = datasets.Dataset.from_parquet(str(toyworld.gold)).select(range(8)).select_columns(["messages"])
    model = AutoModelForCausalLM.from_pretrained(toyworld.student)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = build_online_kd_trainer(model, str(toyworld.teacher), args(tmp_path, max_steps=2), gold, tokenizer,
                                      kd_alpha=0.5, kd_temperature=1.5, kd_divergence=divergence, kd_jsd_beta=0.3)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(np.isfinite(e["loss"]) and e["kd"] > 0 for e in logs)
    assert logs[0]["loss"] == pytest.approx(0.5 * logs[0]["ce"] + 0.5 * 1.5**2 * logs[0]["kd"], rel=1e-4)
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_online_kd_from_the_student_itself_has_zero_divergence(toyworld, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    gold = datasets.Dataset.from_parquet(str(toyworld.gold)).select(range(8)).select_columns(["messages"])
    trainer = build_online_kd_trainer(str(toyworld.student), str(toyworld.student), args(tmp_path), gold, tokenizer,
                                      eval_dataset=gold, kd_alpha=0.0)
    assert abs(trainer.evaluate()["eval_kd"]) < 1e-5
