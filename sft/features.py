"""Distillation beyond the output layer: feature alignment (FitNets) and attention transfer, as tensor code.

Both compare the student with an in-process teacher on the same batch, at the positions that predict a completion
token (the positions every other loss part sums over), and return SUMS over those positions (the trainer divides by
the accumulated batch's tokens, as for CE and KD).

feature_loss -- per mapped pair (student layer s -> teacher layer t; `uniform_layer_map` by default), the
student's decoder-layer output (the residual stream) through a learned linear projection when the widths differ,
against the teacher's: mse (mean over the teacher's width) or cosine (1 - cos); the mean over the pairs.
The projections (`feature_projection`) train with the student but are not part of it: the trainer keeps them
apart, saves them in checkpoint-*/ for resuming, and exports the student without them.

attention_loss -- KL(teacher || student) between the attention distributions (softmax(q k^T * scale) over the
keys each query may see) of the last N layers, paired from the end; head by head when the head counts match, else
between the head-averaged distributions; the mean over heads and pairs. The maps are recomputed from the queries
and keys the models used (after RoPE, q/k norms, GQA), captured by `recording`, whatever the attention
implementation: eager, sdpa and flash all receive q and k, while only eager could return weights (as a
[B, H, T, T] tensor per layer). Query positions go in chunks of `chunk_size`; each chunk runs under activation
checkpointing, so one chunk's scores (batch x heads x chunk x keys, per model) are held at a time, forward and
backward. Cost per step, for N layers: about four times the score computation of those layers' attention for the
student (forward, recomputation, two gradient products) and twice for the teacher (forward, recomputation);
tests/bench/bench_features.py measures it.
"""

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from data.config import ConfigError


# ---------------------------------------------------------------------------------------- recording
@dataclass
class AttentionInputs:
    """What one attention layer computed its weights from: query [B, H, T, d] and key [B, Hkv, T, d] as the
    implementation received them, its mask (None, [B, T] padding, or [B, 1, T, T] bool / additive), the scale,
    Gemma2's score soft-capping and a sliding window."""

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    softcap: float | None = None
    sliding_window: int | None = None


@dataclass
class Recorded:
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # 1-based layer -> its output [B, T, H]
    attention: dict[int, AttentionInputs] = field(default_factory=dict)


def decoder_layers(lm) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (Llama, Qwen, Mistral, Gemma... keep them at .layers)."""
    layers = getattr(lm.base_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"feature_weight / attention_weight: {type(lm).__name__} keeps no decoder layers at "
                          "base_model.layers; feature and attention alignment know Llama-style decoders")
    return layers


@contextmanager
def recording(lm, hidden_layers=(), attention_layers=()) -> Iterator[Recorded]:
    """Record, during a forward of `lm` in the block, the outputs of `hidden_layers` and the attention inputs of
    `attention_layers` (1-based). Attention is captured by standing in, for the block only, for the model's
    attention implementation in transformers' ALL_ATTENTION_FUNCTIONS: the stand-in records, then calls it."""
    layers = decoder_layers(lm)
    recorded = Recorded()
    handles = [layers[i - 1].register_forward_hook(_keep_output(recorded.hidden, i)) for i in hidden_layers]
    modules = {layers[i - 1].self_attn: i for i in attention_layers}
    name = lm.config._attn_implementation or "eager"
    overridden = name in ALL_ATTENTION_FUNCTIONS._local_mapping
    previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get(name)
    original = ALL_ATTENTION_FUNCTIONS.get(name) if name != "eager" else None

    def capture(module, query, key, value, attention_mask, **kwargs):
        layer = modules.get(module)
        if layer is not None:
            if kwargs.get("s_aux") is not None:
                raise ConfigError(f"attention_weight: {type(lm).__name__} has attention sinks; its attention "
                                  "distribution is not a softmax over the keys, so attention transfer refuses it")
            recorded.attention[layer] = AttentionInputs(
                query, key, attention_mask, kwargs.get("scaling") or query.shape[-1] ** -0.5,
                kwargs.get("softcap"), kwargs.get("sliding_window"))
        forward = original or sys.modules[type(module).__module__].eager_attention_forward
        return forward(module, query, key, value, attention_mask, **kwargs)

    if modules:
        ALL_ATTENTION_FUNCTIONS[name] = capture
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
        if modules and overridden:
            ALL_ATTENTION_FUNCTIONS[name] = previous
        elif modules:
            del ALL_ATTENTION_FUNCTIONS[name]
    missing = set(modules.values()) - set(recorded.attention)
    if missing:
        raise ConfigError(f"attention_weight: {type(lm).__name__} ({name} attention) did not pass layers "
                          f"{sorted(missing)} through transformers' attention functions; its maps cannot be captured")


def _keep_output(store: dict, layer: int):
    def hook(module, args, output):
        store[layer] = output[0] if isinstance(output, tuple) else output
    return hook


# ---------------------------------------------------------------------------------------- features
def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student layer i -> teacher layer round(i * teacher / student): the last to the last, evenly in between."""
    return {i: max(1, math.floor(i * teacher_layers / student_layers + 0.5)) for i in range(1, student_layers + 1)}


def check_layer_map(layer_map: dict[int, int], student_layers: int, teacher_layers: int) -> None:
    bad = {s: t for s, t in layer_map.items() if not (1 <= s <= student_layers and 1 <= t <= teacher_layers)}
    if bad:
        raise ConfigError(f"feature_layers: {bad} is outside the student's {student_layers} and the teacher's "
                          f"{teacher_layers} layers (1-based)")


def feature_projection(layer_map: dict[int, int], student_width: int, teacher_width: int) -> torch.nn.ModuleDict | None:
    """One bias-free Linear(student_width -> teacher_width) per mapped student layer, or None when the widths match
    (the states are compared as they are)."""
    if student_width == teacher_width:
        return None
    return torch.nn.ModuleDict({str(s): torch.nn.Linear(student_width, teacher_width, bias=False) for s in layer_map})


def feature_loss(student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor], layer_map: dict[int, int],
                 rows: torch.Tensor, projection: torch.nn.ModuleDict | None = None, kind: str = "mse") -> torch.Tensor:
    """Sum over the positions in `rows` [B, T] (bool) of the per-position loss, averaged over the mapped pairs."""
    total = None
    for s, t in layer_map.items():
        h = student[s][rows]
        if projection is not None:
            h = projection[str(s)](h.to(projection[str(s)].weight.dtype))
        h, target = h.float(), teacher[t][rows].float()
        if kind == "mse":
            per_position = (h - target).square().mean(-1)
        else:
            per_position = 1 - F.cosine_similarity(h, target, dim=-1, eps=1e-6)
        total = per_position.sum() if total is None else total + per_position.sum()
    return total / len(layer_map)


# ---------------------------------------------------------------------------------------- attention
def attention_pairs(student_layers: int, teacher_layers: int, n: int) -> dict[int, int]:
    """The last n layers of each model, paired from the end."""
    if n > min(student_layers, teacher_layers):
        raise ConfigError(f"attention_layers: {n} is more than the student's {student_layers} or the teacher's "
                          f"{teacher_layers} layers")
    return {student_layers - n + k: teacher_layers - n + k for k in range(1, n + 1)}


def attention_loss(student: dict[int, AttentionInputs], teacher: dict[int, AttentionInputs], pairs: dict[int, int],
                   rows: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """Sum over the query positions in `rows` [B, T] (bool) of KL(teacher || student) between attention
    distributions, averaged over heads and pairs (see the module docstring)."""
    total = None
    weights = rows.float()
    length = rows.shape[1]
    for s, t in pairs.items():
        for start in range(0, length, chunk_size):
            end = min(start + chunk_size, length)
            if not rows[:, start:end].any():
                continue
            part = checkpoint(_chunk_kl, student[s], teacher[t], weights, start, end, use_reentrant=False)
            total = part if total is None else total + part
    if total is None:  # no completion position in the batch
        return student[next(iter(pairs))].query.sum() * 0.0
    return total / len(pairs)


def _chunk_kl(student: AttentionInputs, teacher: AttentionInputs, weights, start: int, end: int) -> torch.Tensor:
    log_ps = _log_attention(student, start, end)
    with torch.no_grad():
        log_pt = _log_attention(teacher, start, end)
    if log_ps.shape[1] != log_pt.shape[1]:  # different head counts: compare the heads' mean distributions
        log_ps = log_ps.logsumexp(1, keepdim=True) - math.log(log_ps.shape[1])
        log_pt = log_pt.logsumexp(1, keepdim=True) - math.log(log_pt.shape[1])
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean(1)  # [B, chunk]
    return (kl * weights[:, start:end]).sum()


def _log_attention(a: AttentionInputs, start: int, end: int) -> torch.Tensor:
    """log softmax over keys [0, end) of the scores of queries [start, end): [B, H, end - start, end], float32.
    Masked keys get the lowest float, not -inf, so that no row (a padding query) produces NaN."""
    batch, heads, _, dim = a.query.shape
    kv_heads = a.key.shape[1]
    q = a.query[:, :, start:end].float().reshape(batch, kv_heads, heads // kv_heads, end - start, dim)
    k = a.key[:, :, :end].float()[:, :, None]
    scores = (q @ k.transpose(-1, -2)).reshape(batch, heads, end - start, end) * a.scaling
    if a.softcap is not None:
        scores = torch.tanh(scores / a.softcap) * a.softcap
    scores = scores.masked_fill(~_allowed(a, start, end, scores.device), torch.finfo(scores.dtype).min)
    return scores.log_softmax(-1)


def _allowed(a: AttentionInputs, start: int, end: int, device) -> torch.Tensor:
    """Which keys each query of the chunk may see: [B or 1, 1, end - start, end] bool."""
    mask = a.mask
    if mask is not None and mask.dim() == 4:  # built by transformers: causal, padding and any window included
        mask = mask[:, :, start:end, :end]
        return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    queries = torch.arange(start, end, device=device)[:, None]
    keys = torch.arange(end, device=device)[None, :]
    allowed = keys <= queries
    if a.sliding_window is not None:
        allowed = allowed & (queries - keys < a.sliding_window)
    allowed = allowed[None, None]
    if mask is not None:  # [B, T] padding (flash attention's form)
        allowed = allowed & mask[:, None, None, :end].bool()
    return allowed
