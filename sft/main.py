"""python -m sft --config recipes/<x>/sft.yaml [--field value ...]
accelerate launch --config_file recipes/accelerate/fsdp.yaml -m sft --config recipes/<x>/sft.yaml

Fine-tunes a student on a curated set with TRL's SFTTrainer: full fine-tuning, or LoRA with `use_peft: true`
(PEFT); the loss covers exactly the assistant's tokens (the chat template's {% generation %} markers), with
the reasoning inside <think>, or with `assistant_only_loss: false` set every token of the conversation, prompt
included (TRL's own default for conversations; it teaches a model trained from scratch to read the prompt).
With `kd: sparse` the loss adds KL to the teacher's stored top-k logprobs, with `kd: online` to a local teacher's
full logits (sft/trainer.py; its `ce` and `kd` parts are logged apart); `feature_weight` / `attention_weight` add
hidden-state and attention alignment with an in-process teacher (sft/features.py), and `kd_temperature_schedule`
moves the KD temperature over training (sft/schedule.py). With `kd: on_policy` the student samples completions
of the curated prompts and a served (vLLM) or in-process teacher scores those tokens (sft/on_policy.py). With
`qat: int8|int4|w8a8` the student trains through torchao's fake quantization and <output_dir>/quantized/ gets the
converted model (sft/qat.py). `python -m sft.prune` makes a student by pruning a teacher (sft/prune.py). Writes
<output_dir>/ (model or adapter, tokenizer, checkpoints; merged/ with `merge: true`) and sft_metrics.json.
Rerunning resumes from the last checkpoint. Exit codes: 0 done, 2 a config or data error (named), 130 interrupted
(rerun to resume).
"""

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from data.config import ConfigError
from sft.config import check_with_training_args, parse_config
from sft.data import fit_lengths, load_curated, tokenize, training_template
from sft.packing import check_attention

log = logging.getLogger("sft")


def main(argv: list[str] | None = None) -> int:
    try:
        args, training_args, model_args, set_by_user = parse_config(argv)
        derive_defaults(training_args, set_by_user)
        check_with_training_args(args, training_args)
        log.info("resolved config:\n%s", yaml.safe_dump({"sft": asdict(args), "model": asdict(model_args)},
                                                         sort_keys=False).rstrip())
        # --- load and tokenize: every length is known before training -------------------------------------
        tokenizer = load_tokenizer(model_args)
        template = training_template(tokenizer, args.chat_template)
        dataset = load_curated(args.dataset, args.dataset_split)
        dataset = prepare(dataset, tokenizer, template, args, whole_conversation(args, training_args, set_by_user))
        max_length = None if "max_length" not in set_by_user else training_args.max_length
        dataset, max_length, dropped = fit_lengths(dataset, max_length, args.drop_long)
        dataset = dataset.remove_columns("length")
        # the lengths are checked: padding-free rows without packing are as long as their examples (TRL wants None)
        training_args.max_length = None if training_args.padding_free and not training_args.packing else max_length
        # --- train (resuming from the last checkpoint) -----------------------------------------------------
        trainer = build_trainer(args, training_args, model_args, tokenizer, dataset)
        last = last_checkpoint(training_args.output_dir)
        start = time.monotonic()
        result = trainer.train(resume_from_checkpoint=last)  # kd: on_policy's teacher server can fail mid-run
    except ConfigError as e:  # a setting or the data, named; anything else is a bug and keeps its traceback
        log.error("%s", e)
        return 2
    # --- save and report ------------------------------------------------------------------------------------
    out = Path(training_args.output_dir)
    if args.qat != "none":
        from sft.qat import strip_fake_quantization

        strip_fake_quantization(trainer.model)  # the float weights are saved as a plain model
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    if args.qat != "none":
        from sft.qat import save_converted

        save_converted(out, args.qat)
    if args.merge:
        save_merged(trainer.model, tokenizer, out / "merged")
    metrics = write_metrics(out, trainer, result, len(dataset), dropped, max_length,
                            time.monotonic() - start, resumed_from=last)
    log.info("done: %d examples, last logged loss %s (mean over the run %.4f), %.0f tokens/s -> %s",
             metrics["examples"], _fmt(metrics["last_logged_loss"]), metrics["train_loss"], metrics["tokens_per_s"], out)
    return 0


def _fmt(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4f}"


def derive_defaults(training_args, set_by_user: set[str]) -> None:
    """TRL's defaults assume a GPU; on a CPU, bf16 autocast and gradient checkpointing only slow a step down."""
    gpu = torch.cuda.is_available()
    if "gradient_checkpointing" not in set_by_user and not gpu:
        training_args.gradient_checkpointing = False
    if "report_to" not in set_by_user:
        training_args.report_to = []
    for name in ("bf16", "gradient_checkpointing"):
        if name in set_by_user:
            log.info("%s: %s (set; derived default: %s)", name, getattr(training_args, name), gpu)
    derive_liger(training_args, set_by_user, gpu)


def derive_liger(training_args, set_by_user: set[str], gpu: bool) -> None:
    """The CE path never builds [tokens, vocabulary] logits either way (TRL's fused, chunked LM head; the KD
    losses' own chunks); on a GPU, Liger's layer kernels (RMSNorm, RoPE, SwiGLU) come on where liger-kernel is
    installed (TRL keeps Liger's fused cross-entropy off: its own fused head does that part)."""
    from transformers.utils import is_liger_kernel_available

    if "use_liger_kernel" in set_by_user:
        return
    installed = is_liger_kernel_available()
    training_args.use_liger_kernel = gpu and installed
    if training_args.use_liger_kernel and training_args.liger_kernel_config is None:
        # transformers applies Liger before TRL turns its fused CE off; the losses never call that forward anyway
        training_args.liger_kernel_config = {"fused_linear_cross_entropy": False}
    why = "no GPU" if not gpu else f"liger-kernel is {'' if installed else 'not '}installed"
    log.info("use_liger_kernel: %s (derived: %s); CE runs through TRL's fused, chunked LM head either way",
             training_args.use_liger_kernel, why)


def whole_conversation(args, training_args, set_by_user: set[str]) -> bool:
    """Loss on every token when `assistant_only_loss: false` is set; else (and by default) the assistant's only.
    The labels are built here either way, so TRL itself is told not to mask."""
    whole = "assistant_only_loss" in set_by_user and not training_args.assistant_only_loss
    training_args.assistant_only_loss = False
    if whole and args.kd != "none":
        raise ConfigError("assistant_only_loss: false cannot be combined with kd (the teacher's logits cover the "
                          "completion only)")
    log.info("loss on %s", "every token of the conversation (assistant_only_loss: false)" if whole else
             "the assistant's tokens only (set assistant_only_loss: false for every token)")
    return whole


def load_tokenizer(model_args):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    except OSError as e:
        raise ConfigError(f"model_name_or_path: cannot load a tokenizer from {model_args.model_name_or_path}: {e}"
                          ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare(dataset, tokenizer, template: str, args, whole: bool = False):
    """input_ids + labels (-100 outside the assistant's tokens unless `whole`) + length; KD adds the teacher's
    top-k."""
    if args.kd == "on_policy":
        from sft.on_policy import prepare_on_policy

        return prepare_on_policy(dataset, tokenizer, template, args.chat_template_kwargs)
    if args.kd == "sparse":
        from sft.kd_data import prepare_kd_dataset
        from sft.teacher import check_same_tokenizer

        for teacher in [args.teacher_model] if args.teacher_model else _teachers_of(dataset):
            check_same_tokenizer(tokenizer, teacher)
        curated_dir = Path(args.dataset) if Path(args.dataset).is_dir() else Path(args.dataset).parent
        dataset = prepare_kd_dataset(dataset, tokenizer, curated_dir, template, args.kd_top_k,
                                     args.chat_template_kwargs)
        return dataset.map(lambda ids: {"length": len(ids)}, input_columns="input_ids")
    tokenized = tokenize(dataset, tokenizer, template, args.chat_template_kwargs)
    if whole:
        return tokenized.map(lambda ids: {"labels": list(ids)}, input_columns="input_ids",
                             remove_columns=["assistant_masks"])
    return tokenized.map(lambda ids, mask: {"labels": [t if m else -100 for t, m in zip(ids, mask, strict=True)]},
                         input_columns=["input_ids", "assistant_masks"], remove_columns=["assistant_masks"])


def _teachers_of(dataset) -> list[str | None]:
    """The distinct teacher_model values of a curated set (traces of several teachers are curated together)."""
    if "teacher_model" not in dataset.column_names:
        return [None]
    return sorted(set(dataset["teacher_model"]), key=str)


def build_trainer(args, training_args, model_args, tokenizer, dataset):
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer, get_peft_config

    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else (
        torch.bfloat16 if training_args.bf16 else torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                                     dtype=dtype, attn_implementation=model_args.attn_implementation)
    except OSError as e:
        raise ConfigError(f"model_name_or_path: cannot load {model_args.model_name_or_path!r}: {e}") from None
    check_attention(training_args, model)
    peft_config = get_peft_config(model_args)
    if args.qat != "none":
        if peft_config is not None:
            raise ConfigError("qat: needs full fine-tuning (use_peft: false); quantize a merged LoRA student with "
                              "python -m sft.quantize instead")
        from sft.qat import prepare_qat

        prepare_qat(model, args.qat)
    common = dict(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                  peft_config=peft_config)
    if args.kd == "on_policy":
        from sft.on_policy import build_on_policy_trainer

        return build_on_policy_trainer(args, common, tokenizer, dtype, training_args.output_dir)
    in_process = args.kd == "online" or args.feature_weight > 0 or args.attention_weight > 0
    if args.kd == "none" and not in_process:
        return SFTTrainer(**common)
    from sft.teacher import load_teacher
    from sft.trainer import DistillTrainer

    setting = "teacher_models" if args.teacher_models else "teacher_model"
    teachers = [load_teacher(name, tokenizer, dtype, setting) for name in args.teacher_models or [args.teacher_model]] \
        if in_process else None
    return DistillTrainer(**common, distill=args, teacher_model=teachers)


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint-<step> folder. The Trainer writes trainer_state.json last, so a folder without
    it was being saved when the run was stopped: it is passed over (and overwritten when that step comes again)."""
    found = {}
    for path in Path(output_dir).glob("checkpoint-*"):  # nothing when output_dir does not exist yet
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and path.is_dir():
            found[int(step)] = path
    for step in sorted(found, reverse=True):
        if (found[step] / "trainer_state.json").exists():
            log.info("resuming from %s", found[step])
            return str(found[step])
        log.warning("%s is incomplete (no trainer_state.json: stopped while saving); not resuming from it", found[step])
    return None


def save_merged(model, tokenizer, path: Path) -> None:
    if not hasattr(model, "merge_and_unload"):
        raise ConfigError("merge: true needs use_peft: true (a full fine-tune is already a whole model)")
    merged = model.merge_and_unload()
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)
    log.info("merged model: %s", path)


def write_metrics(out: Path, trainer, result, examples: int, dropped: int, max_length: int, wall_s: float,
                  resumed_from: str | None) -> dict:
    history = trainer.state.log_history
    tokens = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), None)
    losses = [h["loss"] for h in history if "loss" in h]
    last = next((h for h in reversed(history) if "loss" in h), {})
    parts = {name: last[name] for name in ("ce", "kd", "kd_on_policy", "feature", "attention", "kd_temperature") if name in last}
    metrics = {
        "examples": examples, "dropped_long": dropped, "max_length": max_length,
        "global_step": trainer.state.global_step, "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None, "last_logged_loss": losses[-1] if losses else None,
        "last_logged_parts": parts,  # the loss's named parts (token means) and KD temperature at the last log
        "tokens": tokens, "wall_s": round(wall_s, 1),
        "tokens_per_s": round(tokens / wall_s, 1) if tokens and wall_s else 0.0,
        "resumed_from": resumed_from, "log_history": history,
    }
    (out / "sft_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
