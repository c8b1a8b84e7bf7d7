"""The chunked sparse-KD loss (sft/losses.py) against a dense reference written out by hand, and the tokenizer check."""

import json

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sft.config import ConfigError
from sft.losses import OutputHead, head_logits, sparse_kd_loss
from sft.teacher import check_same_tokenizer

V, H = 40, 12


def batch(seed=0, k=4):
    """3 sequences of different lengths (prompt -100, right padding -100), top-k lists with pads and k+1 rows, the
    exact rest mass of each teacher distribution."""
    g = torch.Generator().manual_seed(seed)
    lengths, prompts, T = [9, 6, 8], [3, 2, 4], 9
    labels = torch.full((3, T), -100)
    top_ids = torch.full((3, T, k + 1), -1)
    top_logprobs = torch.full((3, T, k + 1), -torch.inf)
    rest = torch.full((3, T), -torch.inf)
    for b, (n, p) in enumerate(zip(lengths, prompts, strict=True)):
        labels[b, p:n] = torch.randint(0, V, (n - p,), generator=g)
        for t in range(p, n):
            width = k + 1 if (b + t) % 3 == 0 else k - (t % 2)  # k+1 (vLLM adds the sampled token), k, k-1
            ids = torch.randperm(V, generator=g)[:width]
            teacher = torch.log_softmax(3 * torch.randn(V, generator=g), 0)
            top_ids[b, t, :width] = ids
            top_logprobs[b, t, :width] = teacher[ids]
            rest[b, t] = teacher.scatter(0, ids, -torch.inf).logsumexp(0)
    hidden = torch.randn(3, T, H, generator=g, requires_grad=True)
    weight = (0.5 * torch.randn(V, H, generator=g)).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=g)).requires_grad_()
    return hidden, weight, bias, labels, top_ids, top_logprobs, rest


def dense_reference(hidden, head: OutputHead, labels, top_ids, top_logprobs, rest, alpha, temperature):
    """Explicit float64 softmax over the whole vocabulary, position by position."""
    logits = hidden.double() @ head.weight.double().T + head.bias.double()
    logits = logits * head.scale
    if head.softcap is not None:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    logits = logits.log_softmax(-1)
    loss = ce_total = kl_total = 0.0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] == -100:
                continue
            logq = logits[b, t - 1]  # position t-1 predicts the token at t
            ce = -logq[labels[b, t]]
            keep = top_ids[b, t] >= 0
            ids, teacher_top = top_ids[b, t][keep], top_logprobs[b, t][keep].double()
            outside = torch.ones(V, dtype=torch.bool)
            outside[ids] = False
            student = torch.cat([logq[ids], logq[outside].logsumexp(0, keepdim=True)])
            teacher = torch.cat([teacher_top, rest[b, t].double().reshape(1)])
            log_ps = torch.log_softmax(student / temperature, 0)
            log_pt = torch.log_softmax(teacher / temperature, 0)
            kl = (log_pt.exp() * (log_pt - log_ps)).sum()
            loss = loss + alpha * ce + (1 - alpha) * temperature**2 * kl
            ce_total, kl_total = ce_total + ce, kl_total + kl
    return loss, ce_total, kl_total


HEADS = {"plain": {}, "logit_scale": {"scale": 0.25}, "softcap": {"softcap": 2.0}, "both": {"scale": 3.0,
                                                                                         "softcap": 2.0}}


@pytest.mark.parametrize("temperature, alpha, transform", [
    *((t, a, "plain") for t in (1.0, 2.0, 0.7) for a in (0.0, 0.5, 1.0)), *((2.0, 0.4, h) for h in HEADS)])
def test_sparse_loss_and_gradients_equal_the_dense_reference(temperature, alpha, transform):
    hidden, weight, bias, labels, top_ids, top_logprobs, rest = batch()
    head = OutputHead(weight, bias, **HEADS[transform])
    ref, ref_ce, ref_kl = dense_reference(hidden, head, labels, top_ids, top_logprobs, rest, alpha, temperature)
    ref_grads = torch.autograd.grad(ref, (hidden, weight, bias))
    n_tokens = int((labels[:, 1:] != -100).sum())
    for chunk in (1, 3, n_tokens):  # 3 does not divide the 14 completion tokens
        loss, ce, kl, n = sparse_kd_loss(hidden, head, labels, top_ids, top_logprobs, rest, alpha,
                                         (1 - alpha) * temperature**2, temperature, chunk)
        assert n == n_tokens == 14
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ce.double(), ref_ce.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kl.double(), ref_kl.detach(), rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(loss, (hidden, weight, bias))
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)


def test_kl_is_zero_when_the_student_is_the_teacher_at_any_temperature():
    hidden, weight, bias, labels, top_ids, _, _ = batch(seed=1)
    head = OutputHead(weight, bias, softcap=2.0)
    student = torch.log_softmax(head_logits(hidden.reshape(-1, H), head).reshape(3, 9, V), -1).detach()
    # the teacher's top-k logprobs and rest are the student's own, at the next position's prediction
    own = torch.full(top_ids.shape, -torch.inf)
    own[:, 1:] = student[:, :-1].gather(-1, top_ids[:, 1:].clamp(min=0)).masked_fill(top_ids[:, 1:] < 0, -torch.inf)
    rest = torch.full(labels.shape, -torch.inf)
    listed = torch.where(top_ids >= 0, top_ids, top_ids[..., :1])[:, 1:].clamp(min=0)  # pads repeat a listed id
    outside = student[:, :-1].scatter(-1, listed, -torch.inf)
    rest[:, 1:] = outside.logsumexp(-1)
    for temperature in (1.0, 3.0):
        _, _, kl, _ = sparse_kd_loss(hidden, head, labels, top_ids, own, rest, 0.0, 1.0, temperature, 4)
        assert abs(kl.item()) < 1e-5
    _, _, kl, _ = sparse_kd_loss(hidden, head, labels, top_ids, own + 0.3 * torch.randn(own.shape), rest, 0.0, 1.0,
                                 1.0, 4)
    assert kl.item() > 1e-2


def test_top_k_over_the_whole_vocabulary_is_the_dense_tempered_kl():
    """k = V in float16, as stored: the sparse KL is the full-vocabulary KL of the tempered distributions."""
    hidden, weight, bias, labels, _, _, _ = batch(seed=3)
    g = torch.Generator().manual_seed(4)
    teacher = torch.log_softmax(3 * torch.randn(3, 9, V, generator=g), -1).half().float()  # float16, as stored
    top_ids = torch.arange(V).expand(3, 9, V).clone()
    rest = torch.full(labels.shape, -torch.inf)  # nothing outside
    for temperature in (1.0, 2.0):
        _, _, kl, n = sparse_kd_loss(hidden, OutputHead(weight, bias), labels, top_ids, teacher, rest, 0.0, 1.0,
                                     temperature, 5)
        mask = labels[:, 1:] != -100
        log_ps = ((hidden.double() @ weight.double().T + bias.double())[:, :-1][mask] / temperature).log_softmax(-1)
        log_pt = (teacher.double()[:, 1:][mask] / temperature).log_softmax(-1)
        dense = (log_pt.exp() * (log_pt - log_ps)).sum()
        assert kl.item() == pytest.approx(dense.item(), rel=1e-5)


def test_no_top_k_is_plain_cross_entropy():
    hidden, weight, bias, labels, _, _, _ = batch(seed=2)
    loss, ce, kl, n = sparse_kd_loss(hidden, OutputHead(weight, bias), labels, chunk_size=5)
    want = torch.nn.functional.cross_entropy((hidden @ weight.T + bias)[:, :-1].reshape(-1, V),
                                             labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(loss, want)
    assert kl == 0 and n == 14


# ---------------------------------------------------------------------------------------- tokenizer check
def permuted_tokenizer(toyworld, tmp_path, swap=("plums", "apples")):
    """The toy tokenizer with two tokens' ids swapped: same size, different vocabulary."""
    spec = json.loads((toyworld.tokenizer / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (next(t for t in vocab if word in t) for word in swap)
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    original = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    return PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token=original.eos_token,
                                   pad_token=original.pad_token), (a, b)


def test_a_student_with_another_vocabulary_is_refused(toyworld, tmp_path):
    teacher = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    check_same_tokenizer(AutoTokenizer.from_pretrained(toyworld.tokenizer), toyworld.tokenizer)  # same: accepted
    check_same_tokenizer(teacher, teacher)
    student, (a, b) = permuted_tokenizer(toyworld, tmp_path)
    assert len(student) == len(teacher)
    with pytest.raises(ConfigError, match="teacher_model") as refused:
        check_same_tokenizer(student, toyworld.tokenizer)
    assert "2 tokens have other ids" in str(refused.value) and repr(a) in str(refused.value)
    assert str(toyworld.tokenizer) in str(refused.value)


def test_a_student_with_other_special_tokens_is_refused(toyworld):
    teacher = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    student = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    student.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    with pytest.raises(ConfigError, match=r"teacher_model.*only in the student.*<\|tool\|>.*special tokens differ"):
        check_same_tokenizer(student, teacher)
