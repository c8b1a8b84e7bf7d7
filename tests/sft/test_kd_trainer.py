"""DistillTrainer's loss and gradient against a full-logits float64 reference built from the models' own forward
(so the logit transform of soft-capped and logit-scaled families is the model's), for both KD modes, several
kd_alpha, and a model whose logits the losses cannot reproduce."""

import copy
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer

from sft.config import ConfigError, DistillArguments
from sft.trainer import DistillTrainer
from tests.sft.tiny import kd_rows, tiny_model, training_args

T = 2.0


def dense_loss(student, teacher, batch, distill: DistillArguments):
    """(alpha * CE + (1 - alpha) * T^2 * D) / completion tokens, position by position from full float64 logits."""
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"]
    mask = labels[:, 1:] != -100
    logq = logits[:, :-1][mask].log_softmax(-1)
    target = labels[:, 1:][mask]
    ce = -logq.gather(1, target[:, None]).sum()
    if teacher is not None:  # online: both full distributions, tempered
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        log_ps, log_pt = (logits[:, :-1][mask] / T).log_softmax(-1), (t_logits[:, :-1][mask] / T).log_softmax(-1)
        p_s, p_t = log_ps.exp(), log_pt.exp()
        if distill.kd_divergence == "forward":
            kd = (p_t * (log_pt - log_ps)).sum()
        elif distill.kd_divergence == "reverse":
            kd = (p_s * (log_ps - log_pt)).sum()
        else:
            beta = distill.kd_jsd_beta
            log_m = torch.logaddexp(log_ps + torch.log1p(torch.tensor(-beta)), log_pt + torch.log(torch.tensor(beta)))
            kd = (beta * p_t * (log_pt - log_m) + (1 - beta) * p_s * (log_ps - log_m)).sum()
    else:  # sparse: K+1 outcomes, the stored top-k and the rest
        ids, top = batch["teacher_top_ids"][:, 1:][mask], batch["teacher_top_logprobs"][:, 1:][mask].double()
        rest = batch["teacher_rest_logprobs"][:, 1:][mask].double()
        kd = 0.0
        for i in range(len(target)):
            keep = ids[i] >= 0
            outside = torch.ones(logq.shape[1], dtype=torch.bool)
            outside[ids[i][keep]] = False
            student_k1 = torch.cat([logq[i, ids[i][keep]], logq[i, outside].logsumexp(0, keepdim=True)])
            teacher_k1 = torch.cat([top[i][keep], rest[i:i + 1]])
            log_ps, log_pt = (student_k1 / T).log_softmax(0), (teacher_k1 / T).log_softmax(0)
            kd = kd + (log_pt.exp() * (log_pt - log_ps)).sum()
    alpha = distill.kd_alpha
    return (alpha * ce + (1 - alpha) * T**2 * kd) / mask.sum()


@pytest.fixture(scope="module")
def tokenizer(toyworld):
    return AutoTokenizer.from_pretrained(toyworld.tokenizer)


@pytest.mark.parametrize("kd", ["sparse", "online"])
@pytest.mark.parametrize("family", ["qwen2", "gemma2", "cohere"])
def test_loss_and_gradient_equal_the_full_logits_reference(tokenizer, tmp_path, family, kd):
    student = tiny_model(len(tokenizer), tokenizer.pad_token_id, family, seed=0, head_scale=8.0)
    teacher = tiny_model(len(tokenizer), tokenizer.pad_token_id, family, seed=1, head_scale=8.0) if kd == "online" \
        else None
    # copies first: the trainer wraps the model's forward (accelerate), and a deep copy would keep calling it
    student64 = copy.deepcopy(student).double().train()
    teacher64 = None if teacher is None else copy.deepcopy(teacher).double()
    rows = kd_rows(len(tokenizer), n=4)
    if kd == "online":
        rows = rows.select_columns(["input_ids", "labels"])
    distill = DistillArguments(dataset="unused", kd=kd, teacher_model="unused", kd_temperature=T, kd_chunk_size=5)
    trainer = DistillTrainer(model=student, args=training_args(tmp_path), train_dataset=rows,
                             processing_class=tokenizer, distill=distill, teacher_model=teacher)
    batch = trainer.data_collator([rows[i] for i in range(4)])
    tokens = (batch["labels"][:, 1:] != -100).sum()
    student.train()
    cases = [(alpha, "forward") for alpha in (0.0, 0.4, 1.0)]
    if kd == "online":
        cases += [(0.4, "reverse"), (0.4, "jsd")]
    for alpha, divergence in cases:
        trainer.distill = replace(distill, kd_alpha=alpha, kd_divergence=divergence, kd_jsd_beta=0.3)
        student.zero_grad()
        loss = trainer.compute_loss(student, batch, num_items_in_batch=tokens)
        loss.backward()
        student64.zero_grad()
        want = dense_loss(student64, teacher64, batch, trainer.distill)
        want.backward()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5), (alpha, divergence)
        for (name, p), p64 in zip(student.named_parameters(), student64.parameters(), strict=True):
            torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name, a=alpha, d=divergence: f"{n} at alpha {a} {d}: {m}")
        assert student.get_output_embeddings().weight.grad.abs().max() > 0  # every alpha trains the head


def test_a_model_whose_logits_the_losses_cannot_reproduce_is_refused(tokenizer, tmp_path):
    """A head the losses do not know (here a hook on the LM head's output) is caught at the first batch."""
    student = tiny_model(len(tokenizer), tokenizer.pad_token_id, "qwen2", head_scale=8.0)
    student.get_output_embeddings().register_forward_hook(lambda module, args, out: out * 0.5)
    rows = kd_rows(len(tokenizer), n=2)
    trainer = DistillTrainer(model=student, args=training_args(tmp_path), train_dataset=rows,
                             processing_class=tokenizer, distill=DistillArguments(dataset="unused", kd="sparse"))
    with pytest.raises(ConfigError, match="model_name_or_path: Qwen2ForCausalLM's logits are not its LM head's"):
        trainer.compute_loss(student, trainer.data_collator([rows[0], rows[1]]))
