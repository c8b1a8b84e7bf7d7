"""A causal LM's output head as the KD losses use it: the LM head weight plus the model's own logit transform, and
a check that they reproduce the model's logits.

The losses never build [tokens, vocabulary] logits through the model's forward, so whatever a family does after
the LM head must be repeated here: Gemma2's final_logit_softcapping, Cohere's logit_scale, Granite's and MiniCPM3's
1 / logits_scaling, Falcon-H1's lm_head_multiplier (the same list as TRL's DistillationTrainer). A family that
does something else is caught by `check_output_head` on the first batch, before a step is taken.
"""

import torch

from data.config import ConfigError
from sft.losses import OutputHead, head_logits


def output_head(lm) -> OutputHead:
    """The head of a transformers causal LM (not a PEFT wrapper: its base model)."""
    config = lm.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    head = lm.get_output_embeddings()
    return OutputHead(head.weight, head.bias, 1.0 if scale is None else float(scale),
                      getattr(config, "final_logit_softcapping", None))


@torch.no_grad()
def check_output_head(lm, head: OutputHead, inputs: dict, name: str, positions: int = 64) -> None:
    """Refuse a model whose logits the head does not reproduce: compares the log-softmax of the model's own
    logits with the head applied to its final hidden states, on the first `positions` tokens of the batch's first
    row, in eval mode (no dropout). The tolerance, 3% of the largest logit, is far above bf16 / tf32 rounding and
    far below what a missed transform does (Gemma2's cap at 30 moves a logit of 30 by 24%, Cohere's scale by 94%)."""
    ids = inputs["input_ids"][:1, :positions]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask[:1, :positions]
    keep = mask[0].bool()
    training = lm.training
    lm.eval()
    try:
        model_logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[0].float()[keep]
        hidden = lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        lm.train(training)
    ours = head_logits(hidden[0][keep], head)
    gap = (ours.log_softmax(-1) - model_logits.log_softmax(-1)).abs().max().item()
    tolerance = 1e-3 + 0.03 * model_logits.abs().max().item()
    if not gap <= tolerance:
        raise ConfigError(
            f"{name}: {type(lm).__name__}'s logits are not its LM head's output (log-probabilities differ by up to "
            f"{gap:.3g}; the transform known for it: scale {head.scale}, softcap {head.softcap}); the KD losses "
            "cannot reproduce this model family's logits (sft/heads.py lists the transforms they apply)")
