"""Sparse KD on real teacher logprobs (tracegen runs of toy teachers), through the data path and real TRL training.

Each teacher run is a real `tracegen --engine hf ... --top_logprobs k` run; the curated set is built from its traces
and logprobs the way the filter stage exports them (data/README.md).
"""

import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.config import ConfigError, DistillArguments
from sft.heads import output_head
from sft.kd_data import KDCollator, prepare_kd_dataset
from sft.losses import sparse_kd_loss
from sft.trainer import DistillTrainer
from tests.sft.tiny import tiny_model, training_args
from tracegen.main import main as tracegen
from tracegen.records import LOGPROB_SCHEMA

K = 5


def run_teacher(model: Path, problems: Path, run: Path, *flags: str) -> tuple[Path, dict]:
    """A tracegen hf run, and a curated parquet over its traces as filter exports them; (run, logprobs by id)."""
    assert tracegen(["--engine", "hf", "--model", str(model), "--problems", str(problems), "--output_dir", str(run),
                     "--temperature", "1.0", "--seed", "0", *flags]) == 0
    traces = pq.read_table(run / "traces").to_pylist()
    (logprobs_part,) = (run / "logprobs").glob("part-*.parquet")
    logprobs = {r["trace_id"]: r for r in pq.read_table(logprobs_part).to_pylist()}
    rows = [{"messages": [*json.loads(t["messages"]),
                          {"role": "assistant", "content": t["content"], "reasoning_content": t["reasoning"]}],
             "trace_id": t["trace_id"], "problem_id": t["problem_id"], "prompt_tokens": t["prompt_tokens"],
             "completion_token_ids": logprobs[t["trace_id"]]["token_ids"],
             "logprobs_file": f"../logprobs/{logprobs_part.name}", "teacher_model": str(model)}
            for t in traces]
    (run / "curated").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), run / "curated" / "train.parquet")
    return run, logprobs


@pytest.fixture(scope="module")
def teacher_run(toyworld, tmp_path_factory):
    """8 sampled traces of the toy teacher with top-5 logprobs."""
    return run_teacher(toyworld.teacher, toyworld.train, tmp_path_factory.mktemp("kd-run"), "--limit", "4", "--n", "2",
                       "--max_tokens", "32", "--top_logprobs", str(K))


THINKING_OFF = """{%- if add_generation_prompt and enable_thinking is defined and not enable_thinking -%}
{{- '<think>\n\n</think>\n\n' -}}
{%- endif -%}"""


@pytest.fixture(scope="module")
def peaked_run(toyworld, tmp_path_factory):
    """A peaked teacher (most positions leave < 1e-7 outside the top-20) whose chat template, like Qwen3's, closes
    an empty think block in the prompt with enable_thinking false; sampled that way, with top-20 logprobs."""
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    tokenizer.chat_template += THINKING_OFF
    model_dir = tmp_path_factory.mktemp("peaked-teacher")
    tiny_model(len(tokenizer), tokenizer.pad_token_id, head_scale=200.0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return run_teacher(model_dir, toyworld.train, tmp_path_factory.mktemp("peaked-run"), "--limit", "3", "--n", "2",
                       "--max_tokens", "24", "--top_logprobs", "20", "--chat_template_kwargs",
                       '{"enable_thinking": false}')


def curated(run) -> datasets.Dataset:
    return datasets.Dataset.from_parquet(str(run / "curated" / "train.parquet"))


def args(tmp_path, **kw):
    return training_args(tmp_path / "out", **{"max_steps": 4, "learning_rate": 3e-3, "optim": "adamw_torch", **kw})


def test_prepare_kd_dataset_puts_the_teachers_exact_tokens_after_the_prompt(toyworld, teacher_run):
    run, logprobs = teacher_run
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    ds = prepare_kd_dataset(curated(run), tokenizer, run / "curated", chat_template=None)
    assert len(ds) == 8
    for row in ds:
        stored = logprobs[row["trace_id"]]
        n = len(stored["token_ids"])
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_dict=False)
        assert prompt == stored["prompt_token_ids"]  # what the teacher saw
        assert row["input_ids"] == prompt + stored["token_ids"] and row["input_ids"][-n:] == stored["token_ids"]
        assert row["completion_mask"] == [0] * len(prompt) + [1] * n
        assert row["labels"] == [-100] * len(prompt) + stored["token_ids"]
        top_ids, top_logprobs = np.array(row["teacher_top_ids"]), np.array(row["teacher_top_logprobs"])
        assert top_ids.shape == top_logprobs.shape == (len(prompt) + n, K)
        assert (top_ids[: len(prompt)] == -1).all() and np.isneginf(top_logprobs[: len(prompt)]).all()
        assert top_ids[len(prompt):].tolist() == stored["top_ids"]
        np.testing.assert_array_equal(top_logprobs[len(prompt):], np.array(stored["top_logprobs"]))
        rest = np.array(row["teacher_rest_logprobs"], dtype=np.float64)
        np.testing.assert_array_equal(rest[len(prompt):], np.array(stored["rest_logprobs"]))
        # top-k and rest make one distribution (to float16 rounding)
        total = np.exp(top_logprobs[len(prompt):].astype(np.float64)).sum(1) + np.exp(rest[len(prompt):])
        np.testing.assert_allclose(total, 1.0, atol=5e-3)
    batch = KDCollator(pad_token_id=tokenizer.pad_token_id)([ds[i] for i in range(3)])
    assert batch["teacher_top_ids"].shape == (3, batch["input_ids"].shape[1], K)
    assert batch["teacher_rest_logprobs"].shape == batch["input_ids"].shape
    assert ((batch["labels"] != -100) == (batch["teacher_top_ids"][..., 0] >= 0)).all()


def test_kd_top_k_keeps_the_most_likely_entries_and_moves_the_others_to_the_rest(toyworld, teacher_run):
    run, logprobs = teacher_run
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    full = prepare_kd_dataset(curated(run), tokenizer, run / "curated")
    for k in (1, 2):
        ds = prepare_kd_dataset(curated(run), tokenizer, run / "curated", top_k=k)
        for row, whole in zip(ds, full, strict=True):
            c = len(logprobs[row["trace_id"]]["token_ids"])
            ids, lps = np.array(row["teacher_top_ids"])[-c:], np.array(row["teacher_top_logprobs"])[-c:]
            all_ids, all_lps = np.array(whole["teacher_top_ids"])[-c:], np.array(whole["teacher_top_logprobs"])[-c:]
            order = np.argsort(-all_lps, axis=1, kind="stable")
            assert ids.shape == (c, k)
            assert (ids == np.take_along_axis(all_ids, order, 1)[:, :k]).all()
            rest, all_rest = np.array(row["teacher_rest_logprobs"])[-c:], np.array(whole["teacher_rest_logprobs"])[-c:]
            dropped = np.exp(np.take_along_axis(all_lps, order, 1)[:, k:].astype(np.float64)).sum(1)
            np.testing.assert_allclose(np.exp(rest), np.exp(all_rest) + dropped, rtol=1e-5)
            np.testing.assert_allclose(np.exp(lps.astype(np.float64)).sum(1) + np.exp(rest), np.exp(
                all_lps.astype(np.float64)).sum(1) + np.exp(all_rest), rtol=1e-5)  # the same total mass


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
        with pytest.raises(ConfigError, match=f"^dataset: .*{message}"):
            prepare_kd_dataset(broken, tokenizer, run / "curated", None)
    with pytest.raises(ConfigError, match="no column logprobs_file"):
        prepare_kd_dataset(curated(run).remove_columns("logprobs_file"), tokenizer, run / "curated", None)


def test_vllm_style_top_k_with_the_sampled_token_added_is_deduplicated(toyworld, tmp_path, caplog):
    """vLLM lists the top-k plus the sampled token (unsorted), so positions have k or k+1 entries, maybe twice. A side
    table from before rest_logprobs gets the rest rebuilt from the listed entries, with a warning."""
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    (tmp_path / "curated").mkdir()
    lp = {"trace_id": "t0", "token_ids": [40, 41], "logprobs": [-0.5, -1.0],
          "top_ids": [[7, 40, 9], [41, 8, 41, 9]], "top_logprobs": [[-1.5, -0.5, -2.0], [-1.0, -1.2, -1.0, -3.0]]}
    old_schema = pa.schema([f for f in LOGPROB_SCHEMA if f.name not in ("rest_logprobs", "prompt_token_ids")])
    pq.write_table(pa.Table.from_pylist([lp], schema=old_schema), tmp_path / "lp.parquet")
    row = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}],
           "trace_id": "t0", "completion_token_ids": [40, 41], "logprobs_file": "../lp.parquet"}
    caplog.set_level(logging.WARNING)
    (out,) = prepare_kd_dataset(datasets.Dataset.from_list([row]), tokenizer, tmp_path / "curated", None)
    assert out["teacher_top_ids"][-2:] == [[7, 40, 9, -1], [41, 8, -1, 9]]
    assert out["teacher_top_logprobs"][-1] == [-1.0, pytest.approx(-1.2, abs=1e-3), -np.inf, -3.0]
    listed = np.exp([-1.0, np.float16(-1.2), -3.0]).sum()  # each id once
    assert out["teacher_rest_logprobs"][-1] == pytest.approx(np.log1p(-listed), rel=1e-5)
    assert "no rest_logprobs" in caplog.text and "cannot be checked" in caplog.text


def test_sparse_kd_trains_a_student_on_the_teachers_logprobs(toyworld, teacher_run, tmp_path):
    run, _ = teacher_run
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    ds = prepare_kd_dataset(curated(run), tokenizer, run / "curated", None)
    model = AutoModelForCausalLM.from_pretrained(toyworld.student)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = DistillTrainer(model=model, args=args(tmp_path), train_dataset=ds, processing_class=tokenizer,
                             distill=DistillArguments(dataset="unused", kd="sparse", kd_chunk_size=16))
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
    trainer = DistillTrainer(model=str(toyworld.student), args=args(tmp_path, max_steps=2, learning_rate=1e-2),
                             train_dataset=ds, processing_class=tokenizer,
                             distill=DistillArguments(dataset="unused", kd="sparse", kd_alpha=0.2, kd_temperature=2.0),
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    changed = {k for k, v in trainer.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all("lora_B" in k or "lora_A" in k for k in changed)
    assert any("lora_B" in k for k in changed)


def kd_per_token(model, dataset, tokenizer, temperature: float) -> float:
    """T^2 * KL / completion token of `model` against the dataset's teacher top-k and rest."""
    batch = KDCollator(pad_token_id=tokenizer.pad_token_id)(list(dataset))
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    _, _, kl, tokens = sparse_kd_loss(hidden, output_head(model), batch["labels"], batch["teacher_top_ids"],
                                      batch["teacher_top_logprobs"], batch["teacher_rest_logprobs"], 0.0, 1.0,
                                      temperature)
    return temperature**2 * kl.item() / tokens.item()


def test_float16_storage_of_a_peaked_teacher_leaves_no_kd_floor(peaked_run, tmp_path):
    """Student = teacher at T = 2: the stored rest (computed before rounding) gives ~0; rebuilt from the float16
    top-k, as before tracegen stored it, it leaves a floor (the issue measured 5e-3 per token)."""
    run, logprobs = peaked_run
    teacher = Path(curated(run)[0]["teacher_model"])
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    rests = np.concatenate([r["rest_logprobs"] for r in logprobs.values()])
    assert np.median(rests) < np.log(1e-7)  # peaked: most positions leave less than 1e-7 outside the top-20
    kwargs = {"enable_thinking": False}
    exact = prepare_kd_dataset(curated(run), tokenizer, run / "curated", chat_template_kwargs=kwargs)
    assert kd_per_token(model, exact, tokenizer, 2.0) < 1e-4
    # the same traces with the side table as it was before rest_logprobs
    (old := tmp_path / "logprobs").mkdir()
    for part in (run / "logprobs").glob("*.parquet"):
        pq.write_table(pq.read_table(part).drop_columns(["rest_logprobs"]), old / part.name)
    (tmp_path / "curated").mkdir()
    pq.write_table(pq.read_table(run / "curated" / "train.parquet"), tmp_path / "curated" / "train.parquet")
    rebuilt = prepare_kd_dataset(curated(tmp_path), tokenizer, tmp_path / "curated", chat_template_kwargs=kwargs)
    assert kd_per_token(model, rebuilt, tokenizer, 2.0) > 1e-3


def test_a_prompt_rendered_otherwise_than_the_teachers_is_refused(peaked_run, tmp_path):
    """The teacher was sampled with enable_thinking false; rendered without it, the KD prompt lacks the empty think
    block the teacher's logprobs follow. Caught from the stored prompt ids, and from the prompt_tokens count alone."""
    run, _ = peaked_run
    tokenizer = AutoTokenizer.from_pretrained(curated(run)[0]["teacher_model"])
    with pytest.raises(ConfigError, match=r"^chat_template_kwargs.*trace \w+: the prompt rendered for KD is not the "
                                          r"one the teacher saw.*first difference at token \d+: '' vs '<think>"):
        prepare_kd_dataset(curated(run), tokenizer, run / "curated")
    (old := tmp_path / "logprobs").mkdir()
    for part in (run / "logprobs").glob("*.parquet"):
        pq.write_table(pq.read_table(part).drop_columns(["prompt_token_ids"]), old / part.name)
    (tmp_path / "curated").mkdir()
    pq.write_table(pq.read_table(run / "curated" / "train.parquet"), tmp_path / "curated" / "train.parquet")
    with pytest.raises(ConfigError, match=r"the teacher's server counted \d+"):
        prepare_kd_dataset(curated(tmp_path), tokenizer, tmp_path / "curated")
