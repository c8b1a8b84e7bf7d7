"""EvalsConfig: the one flat config of the evals stage, read from YAML and overridable by flags.

    python -m evals --config recipes/<x>/evals.yaml [--field value ...]

The model-source fields mirror tracegen's (`engine`, `base_url`, `serve_model`, `model`, ...): evals
generates through tracegen, which validates them; `tracegen_args` passes any other tracegen flag through.
"""

import json
import logging
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from tracegen.config import ConfigError  # one "a setting is wrong" error across the stages

log = logging.getLogger(__name__)

PUBLIC_BENCHMARKS = ("gsm8k", "math500", "aime24", "amc23", "humaneval", "humanevalplus", "mbppplus")
TOY_PATH = "cache/toyworld/problems/test.jsonl"  # `python -m data.toyworld build --out cache/toyworld`
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")  # benchmark and model names become file names
# tracegen flags that evals sets itself (from the fields above): tracegen_args must not change them behind
# the protocol's back.
TRACEGEN_OWN = ("problems", "output_dir", "prompt_template", "n", "temperature", "top_p", "max_tokens", "seed",
                "engine", "base_url", "serve_model", "serve_args", "model", "adapter", "engine_kwargs",
                "api_key_env", "concurrency", "batch_size", "samples_per_request", "chat_template_kwargs",
                "limit", "shard", "system_prompt")


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class EvalsConfig:
    # --- what to evaluate ------------------------------------------------------------------------------
    benchmarks: list[str] | None = _help(
        f"Benchmark names: {', '.join(PUBLIC_BENCHMARKS)}, toy, or a custom_benchmarks name. Default: the seven "
        "public ones (grade-only mode: those in the completions file).", default=None)
    custom_benchmarks: dict | str | None = _help(
        "Extra benchmarks from Problem-record files (JSONL or Parquet, data/README.md), {name: path}; e.g. "
        "LiveCodeBench-style stdio problems. `toy` is one whose default path is " + TOY_PATH + ".", default=None)
    data_dir: str | None = _help(
        "Folder with local copies of the public benchmarks (<data_dir>/gsm8k/test.jsonl, "
        "<data_dir>/humaneval/HumanEval.jsonl.gz, ...). Default: the pinned Hugging Face hub datasets.",
        default=None)
    limit: int | None = _help("Only the first N problems of each benchmark (quick runs).", default=None)
    output_dir: str | None = _help(
        "Where samples/, scores.json, report.md and generations/ go, e.g. runs/<name>/evals. Several models can "
        "share one: scores.json and report.md keep them all.", default=None)
    model_name: str | None = _help(
        "Name of the evaluated model in scores.json, samples/ and report.md. Default: the last part of "
        "adapter/model/serve_model (grade-only: the completions file name).", default=None)
    completions: str | None = _help(
        "Grade-only mode: a JSONL of generations made elsewhere (benchmark, problem_id, completion, optional "
        "sample_index, finish_reason, completion_tokens); no model is called.", default=None)
    # --- protocol (recorded next to every number) ------------------------------------------------------
    n: int = _help("Samples per problem (pass@1 is their mean; pass@k and maj@k use k = n). Grade-only: the "
                   "completions file decides.", default=4)
    temperature: float = _help("Sampling temperature (DeepSeek-R1's protocol: 0.6).", default=0.6)
    top_p: float = _help("Nucleus sampling (DeepSeek-R1's protocol: 0.95).", default=0.95)
    max_tokens: int | None = _help(
        "Most completion tokens per sample, reasoning included. Default: per benchmark (32768 for the public "
        "ones, 512 for toy).", default=None)
    seed: int | None = _help("Sampling seed sent with every request.", default=None)
    math_prompt_template: str | None = _help(
        "Jinja file for math prompts ('none': the problem as written). Default: evals/templates/r1_math.jinja "
        "(R1's 'Please reason step by step, and put your final answer within \\boxed{}.'), except toy, "
        "whose models were trained on the problem as written.", default=None)
    code_prompt_template: str | None = _help(
        "Jinja file for code prompts ('none': as written). Default: evals/templates/r1_code.jinja.", default=None)
    chat_template_kwargs: dict | str | None = _help(
        "Passed to the server's chat template, e.g. {enable_thinking: true}.", default=None)
    # --- the model (mirrors tracegen; tracegen validates these) ----------------------------------------
    engine: str = _help("tracegen engine: http (base_url or serve_model), vllm or hf (in process).", default="http")
    base_url: list[str] | None = _help("OpenAI-compatible server(s), e.g. http://host:8000/v1.", default=None)
    serve_model: str | None = _help(
        "A model directory served with vLLM, started once for all benchmarks and stopped at the end.", default=None)
    serve_args: list[str] | str | None = _help("Extra arguments of the managed vLLM server.", default=None)
    model: str | None = _help("http: the served model name; vllm/hf: the model directory or hub name.", default=None)
    adapter: str | None = _help("vllm/hf: a LoRA adapter directory applied to `model`.", default=None)
    engine_kwargs: dict | str | None = _help("vllm/hf: arguments of vllm.LLM / from_pretrained.", default=None)
    api_key_env: str | None = _help("Environment variable holding the API key (never stored).", default=None)
    concurrency: int = _help("Requests in flight at once.", default=64)
    batch_size: int = _help("vllm/hf: prompts per in-process batch.", default=64)
    samples_per_request: int | None = _help("At most this many samples per request (1 for APIs refusing n>1).",
                                            default=None)
    tracegen_args: str | None = _help(
        'Any other tracegen flags, e.g. "--timeout_s 7200 --extra_body {\\"top_k\\":20}" (recorded in the '
        "protocol).", default=None)
    # --- efficiency (evals/efficiency.py) ---------------------------------------------------------------
    efficiency: bool | None = _help(
        "Measure latency, throughput and memory on the engine that generated. Default: on for engine hf/vllm "
        "and serve_model, off for base_url (a remote API bills the tokens; its latency includes the network).",
        default=None)
    efficiency_prompts: int = _help("Prompts per benchmark timed at batch 1 (the benchmark's first ones).",
                                    default=4)
    efficiency_tokens: int = _help("Tokens each timed request generates (EOS ignored: every model does the "
                                   "same work).", default=32)
    # --- grading ----------------------------------------------------------------------------------------
    grader_workers: int | None = _help("Parallel grading processes. Default: the number of CPUs.", default=None)
    math_timeout_s: float = _help("Seconds one math-verify comparison may take (then it is wrong: timeout).",
                                  default=5.0)

    def __post_init__(self):
        for name in ("custom_benchmarks", "chat_template_kwargs", "engine_kwargs"):
            setattr(self, name, _json_dict(name, getattr(self, name)))
        if isinstance(self.base_url, str):
            self.base_url = [self.base_url]
        if isinstance(self.serve_args, str):
            self.serve_args = shlex.split(self.serve_args)
        if not self.output_dir:
            raise ConfigError("output_dir: required (e.g. runs/<name>/evals)")
        self.custom_benchmarks = {"toy": TOY_PATH, **(self.custom_benchmarks or {})}
        for name, path in self.custom_benchmarks.items():
            if name in PUBLIC_BENCHMARKS or not NAME.fullmatch(name) or not isinstance(path, str):
                raise ConfigError(f"custom_benchmarks: {name!r}: {path!r} must map a new name (letters, digits, "
                                  f"._+=-; not one of {', '.join(PUBLIC_BENCHMARKS)}) to a file path")
        known = (*PUBLIC_BENCHMARKS, *self.custom_benchmarks)
        for name in self.benchmarks or []:
            if name not in known:
                raise ConfigError(f"benchmarks: unknown benchmark {name!r}; known: {', '.join(known)}")
        if self.benchmarks is not None and len(set(self.benchmarks)) != len(self.benchmarks):
            raise ConfigError(f"benchmarks: listed twice in {self.benchmarks}")
        _positive(self, "n", "concurrency", "batch_size", "efficiency_prompts")
        if self.efficiency_tokens < 2:
            raise ConfigError(f"efficiency_tokens: must be >= 2 (per-token latency needs two), got "
                              f"{self.efficiency_tokens}")
        for name in ("limit", "max_tokens", "grader_workers", "samples_per_request"):
            if getattr(self, name) is not None:
                _positive(self, name)
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"temperature / top_p: need temperature >= 0 and 0 < top_p <= 1, got "
                              f"{self.temperature} / {self.top_p}")
        if self.math_timeout_s <= 0:
            raise ConfigError(f"math_timeout_s: must be > 0, got {self.math_timeout_s}")
        for name in ("math_prompt_template", "code_prompt_template"):
            path = getattr(self, name)
            if path and path != "none" and not Path(path).is_file():
                raise ConfigError(f"{name}: no such file: {path}")
        for flag in shlex.split(self.tracegen_args or ""):
            if flag.startswith("--") and flag[2:].split("=")[0] in TRACEGEN_OWN:
                raise ConfigError(f"tracegen_args: {flag.split('=')[0]} is set by evals; use the evals field instead")
        if self.completions and not Path(self.completions).is_file():
            raise ConfigError(f"completions: no such file: {self.completions}")
        if not self.completions and not (self.base_url or self.serve_model or self.model):
            raise ConfigError("base_url / serve_model / model: set the model to evaluate (or completions, to "
                              "grade generations made elsewhere)")
        self.model_name = self.model_name or _derived_name(self)
        if not NAME.fullmatch(self.model_name):
            raise ConfigError(f"model_name: {self.model_name!r} must be letters, digits and ._+=- (it names files)")

    @property
    def grade_only(self) -> bool:
        return bool(self.completions)

    @property
    def measures_efficiency(self) -> bool:
        if self.grade_only:
            return False
        return self.efficiency if self.efficiency is not None else self.engine != "http" or bool(self.serve_model)

    def save(self, path: Path) -> None:
        """The resolved config, next to the results. Holds the key's variable name, never the key."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(asdict(self), sort_keys=False))
        tmp.replace(path)


def _derived_name(cfg: EvalsConfig) -> str:
    if cfg.completions:
        source = Path(cfg.completions).name.split(".")[0]
    else:
        parts = [Path(p.rstrip("/")).name for p in (cfg.model or cfg.serve_model, cfg.adapter) if p]
        source = "+".join(parts)
    if not source:
        raise ConfigError("model_name: required (nothing to derive it from: set model or model_name)")
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", source).strip("-") or "model"


def _json_dict(name: str, value):
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{name}: not a JSON object: {e}") from None
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a mapping, got {type(value).__name__}")
    return value


def _positive(cfg, *names):
    for name in names:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}: must be >= 1, got {getattr(cfg, name)}")


def _check_keys(config_path: str) -> None:
    # TrlParser builds the config (running __post_init__) before it reports unknown keys, so a typo
    # would hide behind whatever validation error it causes: check the keys first.
    try:
        values = yaml.safe_load(Path(config_path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{config_path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{config_path}: must be a YAML mapping of field: value")
    unknown = sorted(set(values) - set(EvalsConfig.__dataclass_fields__) - {"env"})
    if unknown:
        raise ConfigError(f"{config_path}: unknown keys {unknown} (fields: python -m evals --help)")


def parse_config(argv: list[str] | None = None) -> EvalsConfig:
    """--config file.yaml plus --field value overrides; unknown keys and abbreviations are errors."""
    from trl import TrlParser  # light: only the parser, not the trainers

    parser = TrlParser([EvalsConfig], allow_abbrev=False, prog="python -m evals")
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    if config_path and not Path(config_path).is_file():
        raise ConfigError(f"--config: no such file: {config_path}")
    if config_path:
        _check_keys(config_path)
    try:
        (cfg,) = parser.parse_args_and_config(argv)
    except ConfigError:
        raise
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{config_path or 'command line'}: {e}") from None
    return cfg
