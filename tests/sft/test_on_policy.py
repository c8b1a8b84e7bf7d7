"""kd: on_policy with an in-process teacher: the loss and its gradient against a float64 reference built from the
models' own logits, zero when the student is the teacher, the teacher's scores, GKD's mix, config errors that name
the setting, and a killed run that resumes."""

import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.config import DistillArguments
from sft.losses import OutputHead
from sft.main import main
from sft.on_policy import TEACHER_FLOOR, LocalTeacher, OnPolicyTrainer, reverse_kl, sampled_reverse_kl
from tests.sft.tiny import tiny_model, training_args

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer(toyworld):
    return AutoTokenizer.from_pretrained(toyworld.tokenizer)


def prompt_rows(vocab_size: int, n: int = 4, seed: int = 0) -> datasets.Dataset:
    """Rows as prepare_on_policy makes them: prompts of 3..5 tokens, curated completions of 4..13."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p, c = 3 + i % 3, 4 + 3 * i
        ids = rng.integers(3, vocab_size, p + c).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:], "prompt_length": p})
    return datasets.Dataset.from_list(rows)


def make_trainer(tokenizer, tmp_path, student, teacher, **distill):
    args = DistillArguments(dataset="unused", kd="on_policy", teacher_model="unused", on_policy_top_k=3,
                            on_policy_max_new_tokens=6, kd_chunk_size=5, **distill)
    trainer = OnPolicyTrainer(model=student, args=training_args(tmp_path), train_dataset=prompt_rows(len(tokenizer)),
                              processing_class=tokenizer, distill=args, teacher=LocalTeacher(teacher, k=3))
    return trainer


def dense_loss(student, batch, distill: DistillArguments, on_policy: bool):
    """The loss from the student's full float64 logits, position by position, and the teacher's listed scores from
    the batch, on the student's samples: reverse, KL(p_s || p_t) over the K+1 outcomes; sampled_reverse,
    d_t * log p_s(y_t) with d_t detached, plus the value correction that makes it the estimate; forward (and every
    curated batch): alpha * CE (curated only) + (1 - alpha) * T^2 * KL(p_t || p_s) over the K+1 outcomes."""
    t = distill.kd_temperature
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"]
    mask = labels[:, 1:] != -100
    logq = logits[:, :-1][mask].log_softmax(-1)
    target = labels[:, 1:][mask]
    ids, top = batch["teacher_top_ids"][:, 1:][mask], batch["teacher_top_logprobs"][:, 1:][mask].double()
    rest = batch["teacher_rest_logprobs"][:, 1:][mask].double()
    ce, kd = -logq.gather(1, target[:, None]).sum(), 0.0
    for i in range(len(target)):
        keep = ids[i] >= 0
        outside = torch.ones(logq.shape[1], dtype=torch.bool)
        outside[ids[i][keep]] = False
        log_ps = (torch.cat([logq[i, ids[i][keep]], logq[i, outside].logsumexp(0, keepdim=True)]) / t).log_softmax(0)
        log_pt = (torch.cat([top[i][keep], rest[i:i + 1]]) / t).log_softmax(0)
        if on_policy and distill.on_policy_loss == "reverse":
            kd = kd + (log_ps.exp() * (log_ps - log_pt)).sum()
        elif on_policy and distill.on_policy_loss == "sampled_reverse":
            slot = int((ids[i][keep] == target[i]).nonzero())
            d = (log_ps[slot] - log_pt[slot]).detach()
            kd = kd + d * log_ps[slot] + (d - d * log_ps[slot]).detach()
        else:
            kd = kd + (log_pt.exp() * (log_pt - log_ps)).sum()
    alpha = 0.0 if on_policy else distill.kd_alpha
    return (alpha * ce + (1 - distill.kd_alpha) * t**2 * kd) / mask.sum()


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "cohere"])
def test_loss_and_gradient_equal_the_full_logits_reference(tokenizer, tmp_path, family):
    student = tiny_model(len(tokenizer), tokenizer.pad_token_id, family, seed=0, head_scale=4.0)
    teacher = tiny_model(len(tokenizer), tokenizer.pad_token_id, family, seed=1, head_scale=4.0)
    student64 = copy.deepcopy(student).double().train()
    trainer = make_trainer(tokenizer, tmp_path, student, teacher, kd_temperature=2.0, kd_alpha=0.3)
    rows = [trainer.train_dataset[i] for i in range(4)]
    for loss_name in ("reverse", "sampled_reverse", "forward"):
        for on_policy in (True, False):
            trainer.distill = replace(trainer.distill, on_policy_loss=loss_name,
                                      on_policy_lambda=1.0 if on_policy else 0.0)
            batch = trainer.on_policy_batch(rows, step=0, index=0)
            assert bool(batch["on_policy"]) == on_policy
            if on_policy:  # the student wrote these: not the curated completions
                assert batch["labels"].shape != torch.as_tensor(rows[-1]["labels"]).shape or \
                    not torch.equal(batch["labels"][-1], torch.as_tensor(rows[-1]["labels"]))
            tokens = (batch["labels"][:, 1:] != -100).sum()
            student.train()
            student.zero_grad()
            loss = trainer.compute_loss(student, batch, num_items_in_batch=tokens)
            loss.backward()
            student64.zero_grad()
            want = dense_loss(student64, batch, trainer.distill, on_policy)
            want.backward()
            case = f"{family} {loss_name} on_policy={on_policy}"
            assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7), case
            for (name, p), p64 in zip(student.named_parameters(), student64.parameters(), strict=True):
                torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-6,
                                           msg=lambda m, n=name, c=case: f"{n} ({c}): {m}")


def test_reverse_kl_is_zero_when_the_student_is_the_teacher(tokenizer, tmp_path):
    student = tiny_model(len(tokenizer), tokenizer.pad_token_id, "qwen2", seed=0, head_scale=4.0)
    trainer = make_trainer(tokenizer, tmp_path, student, copy.deepcopy(student), on_policy_lambda=1.0,
                           kd_temperature=1.0)
    for temperature in (1.0, 2.0):
        trainer.distill = replace(trainer.distill, kd_temperature=temperature)
        batch = trainer.on_policy_batch([trainer.train_dataset[i] for i in range(4)], step=0, index=0)
        student.zero_grad()
        loss = trainer.compute_loss(student, batch, num_items_in_batch=(batch["labels"] != -100).sum())
        loss.backward()
        assert abs(loss.item()) < 1e-6
        assert max(p.grad.abs().max().item() for p in student.parameters()) < 1e-6


def test_a_teacher_whose_listed_tokens_hold_all_the_mass_gives_a_finite_reverse_kl():
    """vLLM's rounding can leave no mass outside the listed tokens (rest = -inf): the rest counts as e^TEACHER_FLOOR
    and the reverse KL and its gradient stay finite, equal to the dense KL with that floor."""
    torch.manual_seed(0)
    weight = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(1, 2, 4, dtype=torch.float64)
    ids = torch.tensor([[[-1, -1], [3, 7]]])
    listed = torch.tensor([[[-torch.inf, -torch.inf], [0.1, 0.9]]], dtype=torch.float64).log()
    rest = torch.tensor([[-torch.inf, -torch.inf]], dtype=torch.float64)
    kl, tokens = reverse_kl(h, OutputHead(weight), torch.tensor([[-100, 7]]), ids, listed, rest, 1.0)
    kl.backward()
    assert tokens == 1 and torch.isfinite(kl) and torch.isfinite(weight.grad).all()
    log_q = (h[0, 0] @ weight.detach().t()).log_softmax(-1)
    outside = torch.ones(12, dtype=torch.bool)
    outside[[3, 7]] = False
    log_ps = torch.stack([log_q[3], log_q[7], log_q[outside].logsumexp(0)])
    log_pt = torch.tensor([0.1, 0.9, math.exp(TEACHER_FLOOR)], dtype=torch.float64).log().log_softmax(0)
    assert kl.item() == pytest.approx((log_ps.exp() * (log_ps - log_pt)).sum().item(), rel=1e-5)


def test_the_local_teacher_lists_its_top_k_the_sampled_token_and_the_rest(tokenizer):
    teacher = tiny_model(len(tokenizer), tokenizer.pad_token_id, "qwen2", seed=1, head_scale=4.0)
    sequence, prompt = list(range(5, 17)), 4
    (scores,) = LocalTeacher(teacher, k=3).score([sequence], [prompt])
    logp = teacher(input_ids=torch.tensor([sequence])).logits[0].double().log_softmax(-1)
    for row, position in enumerate(range(prompt, len(sequence))):
        want = logp[position - 1]
        listed = {int(t): float(x) for t, x in zip(scores.ids[row], scores.logprobs[row], strict=True) if t >= 0}
        assert set(want.topk(3).indices.tolist()) | {sequence[position]} == set(listed)
        assert all(abs(want[t].item() - x) < 1e-5 for t, x in listed.items())
        rest = want[[t for t in range(len(want)) if t not in listed]].logsumexp(0).item()
        assert abs(scores.rest[row] - rest) < 1e-4


def test_gkd_lambda_mixes_on_policy_and_curated_batches_and_logs_it(tokenizer, tmp_path):
    student = tiny_model(len(tokenizer), tokenizer.pad_token_id, "qwen2", seed=0)
    trainer = make_trainer(tokenizer, tmp_path, student, tiny_model(len(tokenizer), tokenizer.pad_token_id, "qwen2"),
                           on_policy_lambda=0.5)
    flips = [bool(trainer.on_policy_batch([trainer.train_dataset[0]], step, 0)["on_policy"]) for step in range(40)]
    assert 8 < sum(flips) < 32  # about half, and the same coin for the same (seed, step, micro-batch)
    assert flips == [bool(trainer.on_policy_batch([trainer.train_dataset[0]], s, 0)["on_policy"]) for s in range(40)]


def run(toyworld, curated, out, *flags):
    return main(["--dataset", str(curated), "--model_name_or_path", str(toyworld.student), "--output_dir", str(out),
                 "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--logging_steps", "1",
                 "--seed", "0", "--kd", "on_policy", "--on_policy_top_k", "4", "--on_policy_max_new_tokens", "12",
                 *flags])


def test_a_run_trains_and_logs_the_named_parts(toyworld, curated, tmp_path):
    out = tmp_path / "run"
    assert run(toyworld, curated, out, "--teacher_model", str(toyworld.teacher), "--max_steps", "4",
               "--on_policy_lambda", "0.5", "--save_strategy", "no") == 0
    metrics = json.loads((out / "sft_metrics.json").read_text())
    logged = [h for h in metrics["log_history"] if "loss" in h]
    # the reverse KL is estimated on the sampled tokens: a window's estimate may fall below 0, never its mean
    assert len(logged) == 4 and all(np.isfinite(h["loss"]) for h in logged)
    assert {h["on_policy_fraction"] for h in logged} == {0.0, 1.0}  # seed 0: both kinds of batch
    for h in logged:  # one step per window here: its parts are the loss's own, each a mean over its tokens
        parts = {"ce": 0.5, "kd": 0.5} if h["on_policy_fraction"] == 0.0 else {"kd_on_policy": 0.5}
        assert set(parts) <= set(h) and h["loss"] == pytest.approx(sum(w * h[p] for p, w in parts.items()), rel=1e-3)
    assert all("sample_s" in h and "score_s" in h for h in logged)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_config_errors_name_the_setting(toyworld, curated, tmp_path, caplog):
    other = tmp_path / "other-tokenizer"
    tok = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    tok.save_pretrained(other)
    template = AutoTokenizer.from_pretrained(toyworld.student).chat_template
    header = "{{- '<|im_start|>assistant\\n' -}}\n{%- generation -%}"
    assert header in template
    early = tmp_path / "early.jinja"  # the assistant turn marked from its header on, before the prompt's end
    early.write_text(template.replace(header, "{%- generation -%}\n{{- '<|im_start|>assistant\\n' -}}"))
    down = f"http://127.0.0.1:{free_port()}/v1"
    cases = [
        ([], "teacher_model: kd: on_policy needs a teacher"),
        (["--teacher_base_url", down], "teacher_model: required with teacher_base_url"),
        (["--teacher_model", "t", "--on_policy_lambda", "1.5"], "on_policy_lambda: must be in [0, 1]"),
        (["--teacher_model", "t", "--on_policy_loss", "jsd"], "on_policy_loss: 'jsd' is not one of"),
        (["--teacher_model", "t", "--eval_strategy", "steps"], "eval_strategy: kd: on_policy trains without"),
        (["--teacher_model", "t", "--feature_weight", "1"], "feature_weight / attention_weight: not with kd"),
        (["--teacher_model", str(other)], "teacher_model: the student's tokenizer is not the teacher's"),
        (["--teacher_base_url", down, "--teacher_model", str(toyworld.teacher)],
         "teacher_base_url: the teacher server at"),
        (["--teacher_model", str(toyworld.teacher), "--chat_template", str(early)],
         "chat_template / chat_template_kwargs: the generation prompt"),
    ]
    for flags, message in cases:
        caplog.clear()
        assert run(toyworld, curated, tmp_path / "x", "--max_steps", "1", *flags) == 2, flags
        assert message in caplog.text, (flags, caplog.text[-500:])
    assert main(["--dataset", str(curated), "--model_name_or_path", str(toyworld.student), "--output_dir",
                 str(tmp_path / "y"), "--kd", "sparse", "--teacher_base_url", down]) == 2
    assert "teacher_base_url: a served teacher is for kd: on_policy" in caplog.text


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(toyworld, curated, tmp_path):
    out = tmp_path / "resume"
    cmd = [sys.executable, "-m", "sft", "--dataset", str(curated), "--model_name_or_path", str(toyworld.student),
           "--output_dir", str(out), "--per_device_train_batch_size", "4", "--logging_steps", "1", "--seed", "0",
           "--kd", "on_policy", "--teacher_model", str(toyworld.teacher), "--on_policy_top_k", "4",
           "--on_policy_max_new_tokens", "12", "--max_steps", "8", "--save_steps", "2", "--on_policy_lambda", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(120) == 130
    assert not (out / "sft_metrics.json").exists()
    assert main(cmd[3:]) == 0  # the rerun in this process: the kill needed a subprocess, the resume does not
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert metrics["resumed_from"] is not None and metrics["global_step"] == 8
    assert [h["step"] for h in metrics["log_history"] if "loss" in h][-1] == 8
    resumed = AutoModelForCausalLM.from_pretrained(out)
    assert resumed.num_parameters() > 0


def test_the_sampled_reverse_kl_gradient_is_the_reverse_kls_on_average():
    """Averaged over many tokens sampled from the student, the surrogate's gradient is the gradient of the exact
    reverse KL(student || teacher) at that position (the score-function identity), and its value the KL."""
    torch.manual_seed(0)
    vocab, hidden_size, n, k = 50, 8, 40000, 3
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    h = torch.randn(hidden_size, dtype=torch.float64)
    teacher_logp = (torch.randn(vocab, dtype=torch.float64) * 2).log_softmax(-1)
    with torch.no_grad():
        sampled = torch.multinomial((weight @ h).softmax(-1), n, replacement=True)
    top = teacher_logp.topk(k).indices.repeat(n, 1)
    ids = torch.cat([top, torch.where((top == sampled[:, None]).any(1), -1, sampled)[:, None]], 1)
    logprobs = torch.where(ids >= 0, teacher_logp[ids.clamp(min=0)], -torch.inf)
    rest = torch.log1p(-logprobs.exp().sum(1))  # the teacher's mass outside the listed tokens
    pad = torch.full_like(ids, -1)
    labels = torch.stack([torch.full_like(sampled, -100), sampled], 1)
    surrogate, kl, tokens = sampled_reverse_kl(
        h.expand(n, 2, hidden_size), OutputHead(weight), labels, torch.stack([pad, ids], 1),
        torch.stack([torch.full_like(logprobs, -torch.inf), logprobs], 1), torch.stack([rest, rest], 1), 1.0)
    (surrogate / tokens).backward()
    estimate = weight.grad.clone()
    weight.grad = None
    log_ps = (weight @ h).log_softmax(-1)
    exact = (log_ps.exp() * (log_ps - teacher_logp)).sum()
    exact.backward()
    assert (kl / tokens).item() == pytest.approx(exact.item(), rel=0.05)
    cosine = torch.nn.functional.cosine_similarity(estimate.flatten(), weight.grad.flatten(), dim=0)
    assert cosine > 0.95 and estimate.norm() == pytest.approx(weight.grad.norm().item(), rel=0.1)
