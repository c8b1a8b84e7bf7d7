"""The distillation losses as tensor code: chunked CE + sparse KL to stored top-k logprobs, and the online divergence.

Both work from the student's final hidden states and its `OutputHead` (the LM head weight plus the model's own
logit transform), never from [tokens, vocabulary] logits beyond one chunk, and return SUMS over the completion
tokens (the trainer divides by the tokens of the whole accumulated batch).

sparse_kd_loss -- w_ce * CE + w_kd * KL(teacher || student) over K+1 outcomes per position: the teacher's stored
top-k ids plus one "rest" bucket holding the mass the top-k leaves out (stored per position by tracegen, computed
before rounding). The student is mapped to the same outcomes (its probabilities of those ids, and the rest as a
logsumexp over the other ids, so a near-empty bucket stays exact). Temperature T tempers the K+1-outcome
distributions of BOTH models (log_softmax(logp / T) over the outcomes): the teacher's mass inside the bucket is
unknown, and tempering both the same way keeps KL = 0 when the student equals the teacher, at every T. CE is at
T = 1. The gradient is taken in the forward pass while a chunk's logits exist (tests/bench/bench_kd.py measures
the memory), so the weights are inputs: w_kd usually carries the T^2 of Hinton et al.

online_divergence -- forward KL, reverse KL or generalized JSD(beta) between the full-vocabulary distributions of
the student and an in-process teacher, by TRL's chunked kernel (the one behind its DistillationTrainer).
"""

from dataclasses import dataclass

import torch
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction


@dataclass(frozen=True)
class OutputHead:
    """logits = softcap * tanh(scale * (h @ weight.T + bias) / softcap), the tanh only when softcap is set
    (Gemma2's final_logit_softcapping; Cohere's logit_scale and Granite's 1 / logits_scaling are scales)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None


def head_logits(h: torch.Tensor, head: OutputHead) -> torch.Tensor:
    """float32 logits of hidden states [n, H] through the head, transform included."""
    z = _projection(h, head.weight, head.bias)
    if head.scale != 1.0:
        z.mul_(head.scale)
    if head.softcap is not None:
        z.div_(head.softcap).tanh_().mul_(head.softcap)
    return z


def _projection(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16):  # fp32 logits from half inputs, no fp32 copy of W
        z = torch.mm(h, weight.t(), out_dtype=torch.float32)
    else:
        z = torch.mm(h.float(), weight.float().t())
    return z if bias is None else z.add_(bias.float())


# ---------------------------------------------------------------------------------------- sparse KD
def sparse_kd_loss(hidden, head: OutputHead, labels, top_ids=None, top_logprobs=None, rest_logprobs=None,
                   ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 1.0, chunk_size: int = 1024):
    """(w_ce * CE + w_kd * KL, CE, KL, tokens): sums over the completion positions; only the first carries a
    gradient.

    hidden [B, T, H] final hidden states; labels [B, T] (-100 off the completion); top_ids / top_logprobs [B, T, K]
    the teacher's top-k for the token AT each position (-1 / -inf pads) and rest_logprobs [B, T] the log of the
    mass outside them; no top_ids (K = 0): CE alone. Position t-1 predicts the token at t, hence the shift."""
    mask = labels[:, 1:] != -100
    h = hidden[:, :-1][mask]
    target = labels[:, 1:][mask]
    if top_ids is None:
        ids = target.new_empty((len(target), 0))
        logprobs = h.new_empty((len(target), 0), dtype=torch.float32)
        rest = h.new_empty((len(target),), dtype=torch.float32)
    else:
        ids, logprobs = top_ids[:, 1:][mask], top_logprobs[:, 1:][mask].float()
        rest = rest_logprobs[:, 1:][mask].float()
    loss, ce, kl = _SparseKD.apply(h, head.weight, head.bias, target, ids, logprobs, rest, head.scale, head.softcap,
                                   ce_weight, kd_weight, temperature, chunk_size)
    return loss, ce, kl, mask.sum()


class _SparseKD(torch.autograd.Function):
    """Chunked CE + sparse KL with the gradient taken in the forward pass (the chunk's logits are reused for it,
    then freed); backward only scales the stored gradients by the incoming one.

    Per position, with z the (transformed) logits, q = softmax(z), u the student's K+1 log-probs, p_s / p_t the
    tempered K+1 distributions and a = w_kd * dKL/du = w_kd / T * (p_s - p_t) (sum a = 0, which cancels the -q
    terms of du/dz):
        dLoss/dz_v = w_ce * (q_v - [v = label]) + (a_j if v is top-k entry j else a_rest * r_v)
    where r = softmax over the ids outside the top-k; then through the transform: * scale * (1 - tanh^2)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, top_ids, top_logprobs, rest_logprobs, scale, softcap, ce_weight,
                kd_weight, temperature, chunk_size):
        n = hidden.shape[0]
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        kl_sum = hidden.new_zeros((), dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                sl = slice(start, min(start + chunk_size, n))
                h = hidden[sl]
                z = _projection(h, weight, bias)
                slope = _transform_(z, scale, softcap)
                ce, kl, g = _chunk(z, target[sl], top_ids[sl], top_logprobs[sl], rest_logprobs[sl], ce_weight,
                                   kd_weight, temperature)
                ce_sum += ce.sum()
                kl_sum += kl.sum()
                if slope is not None:
                    g.mul_(slope)
                if scale != 1.0:
                    g.mul_(scale)
                g_in = g.to(weight.dtype)
                if grad_h is not None:
                    grad_h[sl] = g_in @ weight
                if grad_w is not None:
                    grad_w.addmm_(g.t(), h.float())
                if grad_b is not None:
                    grad_b += g.sum(0)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        loss = ce_weight * ce_sum + kd_weight * kl_sum
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return loss, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kl):
        grads = tuple(None if g is None else (g * grad_loss).to(dtype)
                      for g, dtype in zip(ctx.grads, ctx.dtypes, strict=True))
        ctx.grads = None
        return (*grads, *([None] * 10))


def _transform_(z: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor | None:
    """Apply the head's transform to raw logits in place; returns d(softcap)/d(input), or None without softcap."""
    if scale != 1.0:
        z.mul_(scale)
    if softcap is None:
        return None
    t = z.div_(softcap).tanh_()
    slope = 1 - t.square()
    t.mul_(softcap)
    return slope


def _chunk(z, target, top_ids, top_logprobs, rest_logprobs, ce_weight: float, kd_weight: float, temperature: float):
    """Per-position CE and KL of one chunk, and dLoss/dz [c, V] (written into z's memory)."""
    lse = torch.logsumexp(z, dim=-1)
    ce = lse - z.gather(1, target[:, None]).squeeze(1)
    if top_ids.shape[1] == 0:
        kl = torch.zeros_like(ce)
        g = z.sub_(lse[:, None]).exp_().mul_(ce_weight)
    else:
        valid = (top_ids >= 0) & torch.isfinite(top_logprobs)
        any_valid_id = top_ids.amax(dim=1, keepdim=True).clamp(min=0)  # pads point at a real entry of the row
        ids = torch.where(valid, top_ids, any_valid_id)
        z_top = z.gather(1, ids)
        z.scatter_(1, ids, -torch.inf)
        lse_rest = torch.logsumexp(z, dim=-1).clamp(min=torch.finfo(torch.float32).min)  # -inf: top-k = vocab
        student = torch.cat([(z_top - lse[:, None]).masked_fill(~valid, -torch.inf),
                             (lse_rest - lse).clamp(min=-1e4)[:, None]], dim=1)
        teacher = torch.cat([top_logprobs.masked_fill(~valid, -torch.inf), rest_logprobs[:, None]], dim=1)
        log_ps = torch.log_softmax(student / temperature, dim=-1)
        log_pt = torch.log_softmax(teacher / temperature, dim=-1)
        p_s, p_t = log_ps.exp(), log_pt.exp()
        kl = torch.where(p_t > 0, p_t * (log_pt - log_ps), 0.0).sum(-1)
        a = kd_weight / temperature * (p_s - p_t)
        rest_coef = ce_weight * torch.exp(lse_rest - lse) + a[:, -1]
        g = z.sub_(lse_rest[:, None]).exp_().mul_(rest_coef[:, None])  # the top-k ids are -inf -> 0 here
        top_grad = ce_weight * torch.exp(z_top - lse[:, None]) + a[:, :-1]
        g.scatter_add_(1, ids, top_grad.masked_fill(~valid, 0.0))
    g.scatter_add_(1, target[:, None], torch.full_like(ce[:, None], -ce_weight))
    return ce, kl, g


# ---------------------------------------------------------------------------------------- online KD
DIVERGENCE_BETA = {"forward": 0.0, "reverse": 1.0}  # TRL's generalized-JSD beta for the two KLs


def online_divergence(hidden, head: OutputHead, teacher_hidden, teacher_head: OutputHead, labels, beta: float,
                      temperature: float) -> torch.Tensor:
    """The divergence (beta: 0 forward KL, 1 reverse KL, else JSD(beta)) between the tempered full-vocabulary
    distributions of the student and the teacher, summed over the completion positions (labels as above)."""
    mask = labels[:, 1:] != -100
    divergence, _ = ChunkedDivergenceFunction.apply(
        hidden[:, :-1][mask], head.weight, head.bias, teacher_hidden[:, :-1][mask], teacher_head.weight,
        teacher_head.bias, beta, temperature, head.scale, head.softcap, teacher_head.scale, teacher_head.softcap)
    return divergence.sum()
