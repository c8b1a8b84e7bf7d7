"""The sft stage's config: TRL's own SFTConfig and ModelConfig, plus DistillArguments (ours), from one YAML.

    python -m sft --config recipes/<x>/sft.yaml [--field value ...]

Every SFTConfig / ModelConfig field works as in TRL (learning_rate, num_train_epochs, use_peft, lora_r...).
Derived here instead of TRL's defaults (each logged when it applies): max_length from the data (TRL's
1024 would cut long traces silently), bf16 only on a GPU, no gradient checkpointing on a CPU.
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data.config import ConfigError, config_file
from data.config import parse_config as parse

log = logging.getLogger(__name__)
KD_MODES = ("none", "sparse", "online")
DIVERGENCES = ("forward", "reverse", "jsd")


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class DistillArguments:
    dataset: str | None = _help(
        "The curated set: a folder of parquet files (runs/<x>/curated), a parquet file or glob, or a hub dataset "
        "name; rows need `messages` (data/README.md, Curated dataset).", default=None)
    dataset_split: str = _help("Split of a hub dataset.", default="train")
    chat_template: str | None = _help(
        "Jinja training template with {% generation %} markers. Default: the tokenizer's own when it has them, "
        "else TRL's training template for the model family.", default=None)
    drop_long: bool = _help("Drop (and count) examples longer than max_length instead of stopping.", default=False)
    merge: bool = _help("LoRA: also save the merged model to <output_dir>/merged (vLLM serves it).", default=False)
    kd: str = _help("Logit distillation: none, sparse (the teacher's stored top-k logprobs) or online (a local "
                    "teacher model's full logits).", default="none")
    kd_alpha: float = _help("Weight of cross-entropy; 1 - kd_alpha weighs the KD term.", default=0.5)
    kd_temperature: float = _help("KD temperature T (the KD term is scaled by T^2).", default=1.0)
    kd_chunk_size: int = _help("Positions per chunk of the KD loss (full-vocabulary logits stay this small).",
                               default=1024)
    teacher_model: str | None = _help(
        "online: the teacher model; sparse: the teacher tokenizer the student's must equal (default: the dataset's "
        "teacher_model column).", default=None)
    kd_divergence: str = _help("online: forward, reverse or jsd.", default="forward")
    kd_jsd_beta: float = _help("online jsd: the mixture weight beta.", default=0.5)

    def __post_init__(self):
        if not self.dataset:
            raise ConfigError("dataset: required (e.g. runs/<name>/curated)")
        if self.kd not in KD_MODES:
            raise ConfigError(f"kd: {self.kd!r} is not one of: {', '.join(KD_MODES)}")
        if self.kd_divergence not in DIVERGENCES:
            raise ConfigError(f"kd_divergence: {self.kd_divergence!r} is not one of: {', '.join(DIVERGENCES)}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ConfigError(f"kd_alpha: must be in [0, 1], got {self.kd_alpha}")
        if self.kd_temperature <= 0:
            raise ConfigError(f"kd_temperature: must be > 0, got {self.kd_temperature}")
        if self.kd_chunk_size < 1:
            raise ConfigError(f"kd_chunk_size: must be >= 1, got {self.kd_chunk_size}")
        if self.kd == "online" and not self.teacher_model:
            raise ConfigError("teacher_model: required with kd: online (the local teacher model)")


def parse_config(argv: list[str] | None = None):
    """(DistillArguments, SFTConfig, ModelConfig, set_by_user) from --config file.yaml plus --field overrides,
    read by the stages' one parser (data/config.py)."""
    import torch
    from trl import ModelConfig, SFTConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    # TRL defaults to bf16, which SFTConfig refuses on a CPU: derive it from the device (a set value still wins)
    args, training_args, model_args = parse([DistillArguments, SFTConfig, ModelConfig], argv, "python -m sft",
                                            defaults={"bf16": torch.cuda.is_available()})
    if not model_args.model_name_or_path:
        raise ConfigError("model_name_or_path: required (the student: a model directory or hub name)")
    return args, training_args, model_args, _set_by_user(argv, config_file(argv))


def _set_by_user(argv: list[str], config_path: str | None) -> set[str]:
    """Fields the YAML or the command line set: derived defaults apply only to the others."""
    names = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    if config_path:
        names |= set(yaml.safe_load(Path(config_path).read_text()) or {})
    return names
