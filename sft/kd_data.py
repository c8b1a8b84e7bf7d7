"""The sparse-KD dataset: curated rows joined with the teacher's stored top-k logprobs, and its collator.

`prepare_kd_dataset` turns each curated row (data/README.md: `messages`, `trace_id`, `completion_token_ids`,
`logprobs_file`) into a pre-tokenized training example that TRL's SFTTrainer passes through untouched:

    input_ids              the chat template's prompt ids (messages[:-1] + generation prompt) followed by the
                           teacher's EXACT completion token ids (never re-tokenized text: the teacher's logprobs
                           refer to its own ids, and text -> ids is not one-to-one)
    completion_mask        1 on the completion tokens
    labels                 the completion ids, -100 on the prompt
    teacher_top_ids        [T][K] per input position, the teacher's top-k ids for the token AT that position;
                           -1 pads (every prompt position, duplicates, rows with fewer entries)
    teacher_top_logprobs   [T][K] float16, their logprobs (the raw model distribution at temperature 1, vLLM's
                           default, whatever the trace was sampled at); -inf pads
    teacher_rest_logprobs  [T] float32, the log of the mass outside the kept entries (-inf on the prompt)

The logprobs side table (`logprobs/part-*.parquet`: trace_id, token_ids, logprobs, top_ids, top_logprobs,
rest_logprobs, prompt_token_ids) is read with pyarrow, one filtered read per file and map batch. vLLM's top-k list
holds the k most likely tokens plus the sampled one when it is not among them, unsorted, so a position has k or
k+1 entries; an id listed twice is kept once. With `top_k`, only the k most likely are kept and the others' mass
joins the rest. Side tables written before tracegen stored `rest_logprobs` get it rebuilt from the float16 top-k
(a warning: that floors the KD loss for a peaked teacher).

The prompt rendered here must be the one the teacher saw, or its logprobs describe another context: it is checked
against the side table's `prompt_token_ids` (else the curated `prompt_tokens` count); a mismatch (e.g. tracegen
ran with chat_template_kwargs {enable_thinking: false}) is an error naming the trace and the first difference.
A row without logprobs, or whose logprob `token_ids` differ from `completion_token_ids`, is an error that names the
trace and the file: silently training on CE only would hide a broken export.
"""

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from datasets import Dataset

from data.config import ConfigError

log = logging.getLogger(__name__)
KD_COLUMNS = ("teacher_top_ids", "teacher_top_logprobs", "teacher_rest_logprobs")
REQUIRED_COLUMNS = ("messages", "trace_id", "completion_token_ids", "logprobs_file")


def prepare_kd_dataset(dataset: Dataset, tokenizer, curated_dir: Path, chat_template: str | None = None,
                       top_k: int | None = None, chat_template_kwargs: dict | None = None,
                       batch_size: int = 256) -> Dataset:
    """Pre-tokenized KD examples (columns above) for every curated row; the curated columns are kept."""
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ConfigError(
            f"dataset: {curated_dir}: the curated set has no column {', '.join(missing)}; kd: sparse needs a curated "
            "export that carries the teacher's token ids and logprobs (tracegen with top_logprobs > 0)")
    _warn_about_old_side_tables(dataset, Path(curated_dir))
    return dataset.map(
        _kd_batch, batched=True, batch_size=batch_size, desc="Joining teacher logprobs",
        fn_kwargs={"tokenizer": tokenizer, "curated_dir": Path(curated_dir), "chat_template": chat_template,
                   "top_k": top_k, "template_kwargs": chat_template_kwargs or {}})


def _kd_batch(batch: dict, tokenizer, curated_dir: Path, chat_template: str | None, top_k: int | None,
              template_kwargs: dict) -> dict:
    logprobs = read_logprobs(curated_dir, batch["logprobs_file"], batch["trace_id"])
    out = {name: [] for name in ("input_ids", "completion_mask", "labels", *KD_COLUMNS)}
    counts = batch.get("prompt_tokens", [None] * len(batch["trace_id"]))
    for messages, trace_id, completion, file, count in zip(
            batch["messages"], batch["trace_id"], batch["completion_token_ids"], batch["logprobs_file"], counts,
            strict=True):
        row = logprobs[trace_id]
        if list(row["token_ids"]) != list(completion):
            raise ConfigError(f"dataset: trace {trace_id}: completion_token_ids differ from the token_ids in {file}; "
                              "the curated export and the logprobs side table disagree")
        if not messages or messages[-1]["role"] != "assistant":
            raise ConfigError(f"dataset: trace {trace_id}: the last message is not the assistant turn")
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=False, chat_template=chat_template, **template_kwargs)
        check_prompt(list(prompt), row["prompt_token_ids"], count, trace_id, tokenizer)
        top_ids, top_logprobs, rest = row["top_ids"], row["top_logprobs"], row["rest_logprobs"]
        if top_k is not None:
            top_ids, top_logprobs, rest = keep_top_k(top_ids, top_logprobs, rest, top_k)
        pad_ids = np.full((len(prompt), top_ids.shape[1]), -1, dtype=np.int32)
        pad_logprobs = np.full(pad_ids.shape, -np.inf, dtype=np.float16)
        out["input_ids"].append(list(prompt) + list(completion))
        out["completion_mask"].append([0] * len(prompt) + [1] * len(completion))
        out["labels"].append([-100] * len(prompt) + list(completion))
        out["teacher_top_ids"].append(np.concatenate([pad_ids, top_ids]))
        out["teacher_top_logprobs"].append(np.concatenate([pad_logprobs, top_logprobs]))
        out["teacher_rest_logprobs"].append(np.concatenate([np.full(len(prompt), -np.inf, np.float32), rest]))
    return out


def check_prompt(prompt: list[int], teacher_prompt: list[int] | None, teacher_count: int | None, trace_id: str,
                 tokenizer) -> None:
    """Refuse a KD prompt that is not the one the teacher's logprobs were computed after (its ids when stored,
    else the server's token count)."""
    if teacher_prompt is not None:
        if prompt == teacher_prompt:
            return
        i = next((i for i, (a, b) in enumerate(zip(prompt, teacher_prompt, strict=False)) if a != b),
                 min(len(prompt), len(teacher_prompt)))
        what = (f"{len(prompt)} vs the teacher's {len(teacher_prompt)} tokens, first difference at token {i}: "
                f"{tokenizer.decode(prompt[i:i + 8])!r} vs {tokenizer.decode(teacher_prompt[i:i + 8])!r}")
    elif teacher_count is None or len(prompt) == teacher_count:
        return
    else:
        what = f"{len(prompt)} tokens, the teacher's server counted {teacher_count}"
    raise ConfigError(f"chat_template_kwargs / chat_template: trace {trace_id}: the prompt rendered for KD is not the "
                      f"one the teacher saw ({what}); its logprobs describe another context. Render it as tracegen "
                      "did: the same chat_template_kwargs (see the traces' `sampling`) and template")


def keep_top_k(ids: np.ndarray, logprobs: np.ndarray, rest: np.ndarray, k: int):
    """The k most likely entries per position ([C, K] arrays, pads last); the mass of the others joins `rest`."""
    order = np.argsort(-logprobs.astype(np.float32), axis=1, kind="stable")
    ids, logprobs = np.take_along_axis(ids, order, axis=1), np.take_along_axis(logprobs, order, axis=1)
    with np.errstate(divide="ignore"):
        dropped = np.log(np.exp(logprobs[:, k:].astype(np.float64)).sum(axis=1))
    rest = np.logaddexp(rest.astype(np.float64), dropped).astype(np.float32)
    return ids[:, :k], logprobs[:, :k], rest


def _warn_about_old_side_tables(dataset: Dataset, curated_dir: Path) -> None:
    """One warning for what a side table from before rest_logprobs / prompt_token_ids cannot give."""
    first = next((f for f in dataset["logprobs_file"] if f), None)
    if first is None or not (curated_dir / first).exists():
        return  # the per-row errors name it
    names = pq.read_schema(curated_dir / first).names
    if "rest_logprobs" not in names:
        log.warning("%s has no rest_logprobs (written before tracegen stored them): the rest bucket is rebuilt as "
                    "1 - sum(float16 top-k), which floors the KD loss for a peaked teacher (about 5e-3 per token at "
                    "kd_temperature 2); rerun tracegen for exact targets", first)
    if "prompt_token_ids" not in names and "prompt_tokens" not in dataset.column_names:
        log.warning("%s has no prompt_token_ids and the curated set no prompt_tokens: the KD prompt cannot be "
                    "checked against the one the teacher saw", first)


def read_logprobs(curated_dir: Path, files: list[str | None], trace_ids: list[str]) -> dict[str, dict]:
    """trace_id -> {token_ids, top_ids [C, K] int32 (-1 pads), top_logprobs [C, K] float16 (-inf pads),
    rest_logprobs [C] float32, prompt_token_ids (None when the side table has none)}."""
    by_file = defaultdict(list)
    for file, trace_id in zip(files, trace_ids, strict=True):
        if file is None:
            raise ConfigError(f"dataset: trace {trace_id}: logprobs_file is null, the teacher's logprobs were not "
                              "recorded; kd: sparse needs them for every row (drop such rows in filter, or use kd: "
                              "none)")
        by_file[file].append(trace_id)
    found = {}
    for file, ids in by_file.items():
        path = Path(curated_dir) / file
        if not path.exists():
            raise ConfigError(f"dataset: {path}: the logprobs_file of trace {ids[0]} does not exist")
        dataset = pads.dataset(path, format="parquet")
        columns = ["trace_id", "token_ids", "top_ids", "top_logprobs"]
        columns += [c for c in ("rest_logprobs", "prompt_token_ids") if c in dataset.schema.names]
        table = dataset.to_table(columns=columns, filter=pads.field("trace_id").isin(ids))
        for i, trace_id in enumerate(table.column("trace_id").to_pylist()):
            if trace_id not in found:  # a rerun may have written a trace twice; both rows are the same sample
                found[trace_id] = _logprob_row(table, i)
        lost = [t for t in ids if t not in found]
        if lost:
            raise ConfigError(f"dataset: {path}: no logprobs for {len(lost)} trace(s) that name this file, e.g. "
                              f"{lost[:3]}")
    return found


def _logprob_row(table: pa.Table, i: int) -> dict:
    token_ids = table.column("token_ids")[i].values.to_numpy(zero_copy_only=False)
    top_ids = _padded(table.column("top_ids")[i].values, -1, np.int32)
    top_logprobs = _padded(table.column("top_logprobs")[i].values, -np.inf, np.float16)
    if len(top_ids) != len(token_ids):
        raise ConfigError(f"dataset: trace {table.column('trace_id')[i]}: {len(token_ids)} token_ids but "
                          f"{len(top_ids)} top-k lists")
    top_ids, top_logprobs = _dedupe(top_ids, top_logprobs)
    names = table.column_names
    rest = table.column("rest_logprobs")[i].values if "rest_logprobs" in names else None
    if rest is None or rest.null_count or len(rest) != len(token_ids):
        rest = _rest_from_top_k(top_logprobs)
    else:
        rest = rest.to_numpy(zero_copy_only=False).astype(np.float32)
    prompt = table.column("prompt_token_ids")[i].as_py() if "prompt_token_ids" in names else None
    return {"token_ids": token_ids, "top_ids": top_ids, "top_logprobs": top_logprobs, "rest_logprobs": rest,
            "prompt_token_ids": prompt}


def _rest_from_top_k(top_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum exp(top-k)): the rest rebuilt from the listed entries, for side tables without rest_logprobs."""
    total = np.exp(top_logprobs.astype(np.float64)).sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.log1p(-np.minimum(total, 1.0)).astype(np.float32)


def _padded(lists: pa.ListArray, fill, dtype) -> np.ndarray:
    """A list<list<x>> cell as a [C, K] array (K the longest inner list), short lists padded with `fill`."""
    offsets = lists.offsets.to_numpy()
    values = lists.flatten().to_numpy(zero_copy_only=False).astype(dtype)
    lengths = np.diff(offsets)
    out = np.full((len(lengths), int(lengths.max(initial=0))), fill, dtype=dtype)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(values)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    out[rows, cols] = values
    return out


def _dedupe(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pad out every repeat of an id within a position (vLLM may list the sampled token twice)."""
    order = np.argsort(ids, axis=1, kind="stable")  # stable: the first listing of an id is the one kept
    ranked = np.take_along_axis(ids, order, axis=1)
    repeat_ranked = np.zeros(ranked.shape, dtype=bool)
    repeat_ranked[:, 1:] = (ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] >= 0)
    repeat = np.empty_like(repeat_ranked)
    np.put_along_axis(repeat, order, repeat_ranked, axis=1)
    ids, logprobs = ids.copy(), logprobs.copy()
    ids[repeat], logprobs[repeat] = -1, -np.inf
    return ids, logprobs


@dataclass
class KDCollator:
    """Pads a batch of prepare_kd_dataset examples: input_ids/attention_mask/labels [B, T], the teacher's top-k
    [B, T, K] (ids -1, logprobs -inf where there is none; logprobs as float32) and rest [B, T] (-inf pads).
    padding_free: one row [1, N] of every example's tokens (packed rows' `seq_lengths` name the examples inside
    them), no attention mask, position_ids restarting per example and the varlen kwargs of TRL's collator."""

    pad_token_id: int
    padding_free: bool = False

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self._padded(examples)
        return _flattened(batch, examples) if self.padding_free else batch

    def _padded(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        width = max(max((len(r) for r in e["teacher_top_ids"]), default=0) for e in examples)
        batch = {
            "input_ids": torch.full((len(examples), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
            "labels": torch.full((len(examples), length), -100, dtype=torch.long),
            "teacher_top_ids": torch.full((len(examples), length, width), -1, dtype=torch.long),
            "teacher_top_logprobs": torch.full((len(examples), length, width), -torch.inf, dtype=torch.float32),
            "teacher_rest_logprobs": torch.full((len(examples), length), -torch.inf, dtype=torch.float32),
        }
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            if len(e["teacher_top_ids"]) != n:
                raise ValueError(
                    f"an example has {n} input_ids but teacher logprobs for {len(e['teacher_top_ids'])} positions: "
                    "it was truncated after prepare_kd_dataset (max_length shorter than the example?)")
            batch["input_ids"][i, :n] = torch.as_tensor(e["input_ids"])
            batch["attention_mask"][i, :n] = 1
            labels = e.get("labels")
            if labels is None:
                labels = [t if m else -100 for t, m in zip(e["input_ids"], e["completion_mask"], strict=True)]
            batch["labels"][i, :n] = torch.as_tensor(labels)
            ids = np.asarray(e["teacher_top_ids"], dtype=np.int64).reshape(n, -1)
            batch["teacher_top_ids"][i, :n, : ids.shape[1]] = torch.from_numpy(ids)
            logprobs = np.asarray(e["teacher_top_logprobs"], dtype=np.float32).reshape(n, -1)
            batch["teacher_top_logprobs"][i, :n, : logprobs.shape[1]] = torch.from_numpy(logprobs)
            batch["teacher_rest_logprobs"][i, :n] = torch.as_tensor(np.asarray(e["teacher_rest_logprobs"],
                                                                               dtype=np.float32))
        return batch


def _flattened(batch: dict[str, torch.Tensor], examples: list[dict]) -> dict[str, torch.Tensor]:
    """The padded batch as one padding-free row, with TRL's position ids and sequence boundaries."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    keep = batch.pop("attention_mask").bool()
    flat = {name: value[keep][None] for name, value in batch.items()}
    lengths = [e.get("seq_lengths") or [len(e["input_ids"])] for e in examples]
    positions = torch.cat(DataCollatorForLanguageModeling.get_position_ids_from_packed_seq_lengths(lengths))[None]
    flat["labels"][positions == 0] = -100  # no position predicts the first token of the next example
    starts = (positions[0] == 0).nonzero().flatten()
    cu_seq_lens = torch.cat([starts, torch.tensor([positions.shape[1]])]).to(torch.int32)
    flat["position_ids"] = positions
    flat["cu_seq_lens_q"] = flat["cu_seq_lens_k"] = cu_seq_lens
    flat["max_length_q"] = flat["max_length_k"] = int(cu_seq_lens.diff().max())
    flat["seq_idx"] = torch.repeat_interleave(torch.arange(len(starts), dtype=torch.int32), cu_seq_lens.diff())[None]
    return flat
