"""The curated set in, token ids out: loading, the training chat template, and the length check.

Examples are tokenized here, before training, with the chat template's {% generation %} markers giving the
assistant mask (the loss covers exactly what the model writes). Knowing every length up front is what lets
the stage refuse silent truncation: an example longer than max_length is an error, or dropped and counted.
"""

import glob
import logging
from pathlib import Path

import datasets

from data.config import ConfigError

log = logging.getLogger(__name__)


def load_curated(path: str, split: str = "train") -> datasets.Dataset:
    """A curated folder (its *.parquet), a parquet file or glob, or a hub dataset name."""
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.glob("*.parquet"))
        if not files:
            raise ConfigError(f"dataset: {path} has no .parquet files (run filter first?)")
    elif path.endswith(".parquet") or glob.has_magic(path):
        files = sorted(glob.glob(path))
        if not files:
            raise ConfigError(f"dataset: no such file: {path}")
    else:
        try:  # a hub name: real users have the hub
            return datasets.load_dataset(path, split=split)
        except Exception as e:  # datasets raises many types; all mean "cannot load this"
            raise ConfigError(f"dataset: cannot load {path!r} [{split}]: {e}") from None
    dataset = datasets.load_dataset("parquet", data_files=files, split="train") if _rows(files) else None
    if dataset is None:
        raise ConfigError(f"dataset: {path} has no rows (did filter reject every trace? see its funnel.json)")
    if "messages" not in dataset.column_names:
        raise ConfigError(f"dataset: {path} has no `messages` column (columns: {dataset.column_names})")
    return dataset


def _rows(files: list[str]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def training_template(tokenizer, path: str | None) -> str:
    """The chat template to train with: the configured file, the tokenizer's own if it marks the assistant's
    tokens with {% generation %}, else TRL's training template for the model family."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if path:
        if not Path(path).is_file():
            raise ConfigError(f"chat_template: no such file: {path}")
        template = Path(path).read_text()
        if not has_generation_markers(template):
            raise ConfigError(f"chat_template: {path} has no {{% generation %}} markers (the loss mask needs them)")
        return template
    if tokenizer.chat_template and has_generation_markers(tokenizer.chat_template):
        return tokenizer.chat_template
    try:
        patched = get_training_chat_template(tokenizer)
    except Exception:  # TRL raises for templates it does not know
        patched = None
    if not patched:
        raise ConfigError("chat_template: the tokenizer's template has no {% generation %} markers and TRL has no "
                          "training template for it; give a .jinja file with them")
    log.info("chat template: TRL's training template for this model family")
    return patched


def tokenize(dataset: datasets.Dataset, tokenizer, template: str, template_kwargs: dict | None = None
             ) -> datasets.Dataset:
    """input_ids, assistant_masks and length per example (other columns are dropped)."""
    def encode(batch):
        out = {"input_ids": [], "assistant_masks": [], "length": []}
        for messages in batch["messages"]:
            messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
            enc = tokenizer.apply_chat_template(messages, chat_template=template, return_dict=True,
                                                return_assistant_tokens_mask=True, **(template_kwargs or {}))
            out["input_ids"].append(enc["input_ids"])
            out["assistant_masks"].append(enc["assistant_masks"])
            out["length"].append(len(enc["input_ids"]))
        return out

    tokenized = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing")
    empty = sum(1 for m in tokenized["assistant_masks"] if not any(m))
    if empty:
        raise ConfigError(f"dataset: {empty} examples have no assistant tokens to train on (is the last turn the "
                          "assistant's, and does chat_template mark it with {% generation %}?)")
    return tokenized


def fit_lengths(dataset: datasets.Dataset, max_length: int | None, drop_long: bool) -> tuple[datasets.Dataset,
                                                                                             int, int]:
    """(dataset, max_length, dropped): max_length derived from the longest example when None; longer examples
    stop the run unless drop_long."""
    lengths = dataset["length"]
    longest = max(lengths)
    if max_length is None:
        log.info("max_length: %d (derived: the longest example)", longest)
        return dataset, longest, 0
    too_long = sum(1 for n in lengths if n > max_length)
    if too_long and not drop_long:
        raise ConfigError(f"max_length: {too_long} of {len(lengths)} examples are longer than {max_length} tokens "
                          f"(the longest has {longest}); raise max_length, unset it to fit the longest, or set "
                          "drop_long: true to drop them")
    if too_long:
        log.warning("drop_long: dropped %d of %d examples longer than max_length %d (the longest had %d)",
                    too_long, len(lengths), max_length, longest)
        dataset = dataset.filter(lambda n: n <= max_length, input_columns="length")
    return dataset, max_length, too_long
