"""Packed and padding-free batches that never let one example attend to another (long traces on GPUs).

    packing: true              TRL's best-fit-decreasing packing (packing_strategy bfd): rows of up to max_length
                               tokens, several examples each
    padding_free: true         a micro-batch is one row of every example's tokens back to back, no pad tokens

Either way a batch carries `position_ids` that restart at 0 for every example and no attention mask; the attention
implementation reads the example boundaries from them (transformers 5: flash_attention_2/3/4 through varlen kernels
and the `cu_seq_lens_*` the collator adds, flex_attention and sdpa/eager through a block-diagonal mask built by
masking_utils.find_packed_sequence_indices: exact, but sdpa/eager hold a [tokens, tokens] mask, so use flash
attention for long rows). Any other implementation (paged attention, hub kernels) would let the examples see each
other and is refused. Tested on a CPU: eager and sdpa (flex_attention has no backward on a CPU, flash attention
needs a GPU; tests/gpu/check.py runs sdpa there, or flash_attention_2 where flash-attn is installed). The first
label of every example is -100, so no position predicts across a boundary: the loss of a packed batch is the sum
of its examples' own losses (tests/sft/test_packing.py).

kd: none and kd: online use TRL's own packing and collator. kd: sparse packs here, with the same TRL function over
the teacher's per-position columns too, so each position's stored top-k stays with its token (sft/kd_data.py's
KDCollator flattens the batch).
"""

import logging

from data.config import ConfigError

log = logging.getLogger(__name__)
# attention implementations that honour position-id boundaries in transformers 5 (see the docstring)
VARLEN = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
DENSE_MASK = ("sdpa", "eager")


def packed(training_args) -> bool:
    """Whether batches are packed or padding-free (TRL turns padding_free on for bfd packing)."""
    return bool(training_args.padding_free or training_args.packing)


def check_packing_settings(training_args, distill) -> None:
    """Refuse the settings that would cut examples, let them attend to each other, or need a mask."""
    if not packed(training_args):
        return
    if training_args.packing and training_args.packing_strategy != "bfd":
        raise ConfigError(f"packing_strategy: {training_args.packing_strategy!r} splits examples or lets them attend "
                          "to each other; use bfd (whole examples, position ids restarting per example)")
    if distill.kd == "on_policy":
        raise ConfigError("packing / padding_free: kd: on_policy builds each batch from the student's own samples "
                          "(sft/on_policy.py), one completion per row; set packing: false and padding_free: false")
    if distill.attention_weight > 0:
        raise ConfigError("attention_weight: attention transfer reads the attention mask, which packed rows do not "
                          "carry; set packing: false and padding_free: false")


def check_attention(training_args, model) -> None:
    """Refuse an attention implementation that ignores position-id boundaries; log what the others cost."""
    if not packed(training_args):
        return
    implementation = model.config._attn_implementation
    if implementation in DENSE_MASK:
        log.info("packing: attn_implementation %s keeps examples apart with a dense [tokens, tokens] mask per row; "
                 "on GPUs use flash_attention_2 or 3 for long rows", implementation)
    elif implementation not in VARLEN:
        raise ConfigError(f"attn_implementation: {implementation!r} ignores the example boundaries of packed rows; "
                          f"with packing / padding_free use one of {', '.join(VARLEN + DENSE_MASK)}")


def pack_kd(dataset, training_args, columns):
    """kd: sparse rows packed by TRL's bfd over `columns` (token-aligned lists), with `seq_lengths`."""
    from trl.data_utils import pack_dataset

    dataset = dataset.select_columns(list(columns))
    if training_args.shuffle_dataset:  # as TRL does before packing: neighbours in a row are a random draw
        dataset = dataset.shuffle(seed=training_args.seed)
    packed_rows = pack_dataset(dataset, training_args.max_length, "bfd")
    log.info("packing: %d examples in %d rows of up to %d tokens", len(dataset), len(packed_rows),
             training_args.max_length)
    return packed_rows
