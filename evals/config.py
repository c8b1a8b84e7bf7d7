"""EvalsConfig: the evals stage's own settings, read with tracegen's EngineConfig (the model to sample) from one
flat YAML and overridable by flags.

    python -m evals --config recipes/<x>/evals.yaml [--field value ...]

The model is set with tracegen's keys (`engine`, `base_url`, `serve_model`, `model`, `adapter`, `timeout_s`...:
tracegen/config.py EngineConfig, listed by `python -m evals --help`): evals generates by calling tracegen.
"""

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from data.config import ConfigError, at_least, documented, json_dict, save_config
from data.config import parse_config as parse
from tracegen.config import EngineConfig

log = logging.getLogger(__name__)

PUBLIC_BENCHMARKS = ("gsm8k", "math500", "aime24", "amc23", "humaneval", "humanevalplus", "mbppplus")
TOY_PATH = "cache/toyworld/problems/test.jsonl"  # `python -m data.toyworld build --out cache/toyworld`
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")  # benchmark and model names become file names
REMOVED = {"tracegen_args": "set tracegen's settings as keys of this config, e.g. timeout_s: 7200, max_retries: 1, "
                            "endpoint_id: x, return_token_ids: true, extra_body: {top_k: 20} (python -m evals --help)"}



@dataclass
class EvalsConfig:
    # --- what to evaluate ------------------------------------------------------------------------------
    benchmarks: list[str] | None = documented(
        f"Benchmark names: {', '.join(PUBLIC_BENCHMARKS)}, toy, or a custom_benchmarks name. Default: the seven "
        "public ones (grade-only mode: those in the completions file).", default=None)
    custom_benchmarks: dict | str | None = documented(
        "Extra benchmarks from Problem-record files (JSONL or Parquet, data/README.md), {name: path}; e.g. "
        "LiveCodeBench-style stdio problems. `toy` is one whose default path is " + TOY_PATH + ".", default=None)
    data_dir: str | None = documented(
        "Folder with local copies of the public benchmarks (<data_dir>/gsm8k/test.jsonl, "
        "<data_dir>/humaneval/HumanEval.jsonl.gz, ...). Default: the pinned Hugging Face hub datasets.",
        default=None)
    limit: int | None = documented("Only the first N problems of each benchmark (quick runs).", default=None)
    output_dir: str | None = documented(
        "Where samples/, scores.json, report.md and generations/ go, e.g. runs/<name>/evals. Several models can "
        "share one: scores.json and report.md keep them all.", default=None)
    model_name: str | None = documented(
        "Name of the evaluated model in scores.json, samples/ and report.md. Default: the last part of "
        "adapter/model/serve_model (grade-only: the completions file name).", default=None)
    completions: str | None = documented(
        "Grade-only mode: a JSONL of generations made elsewhere (benchmark, problem_id, completion, optional "
        "sample_index, finish_reason, completion_tokens); no model is called.", default=None)
    # --- protocol (recorded next to every number) ------------------------------------------------------
    n: int = documented("Samples per problem (pass@1 is their mean; pass@k and maj@k use k = n). Grade-only: the "
                   "completions file decides.", default=4)
    temperature: float = documented("Sampling temperature (DeepSeek-R1's protocol: 0.6).", default=0.6)
    top_p: float = documented("Nucleus sampling (DeepSeek-R1's protocol: 0.95).", default=0.95)
    max_tokens: int | None = documented(
        "Most completion tokens per sample, reasoning included. Default: per benchmark (32768 for the public "
        "ones, 512 for toy).", default=None)
    seed: int | None = documented("Sampling seed sent with every request.", default=None)
    math_prompt_template: str | None = documented(
        "Jinja file for math prompts ('none': the problem as written). Default: evals/templates/r1_math.jinja "
        "(R1's 'Please reason step by step, and put your final answer within \\boxed{}.'), except toy, "
        "whose models were trained on the problem as written.", default=None)
    code_prompt_template: str | None = documented(
        "Jinja file for code prompts ('none': as written). Default: evals/templates/r1_code.jinja.", default=None)
    chat_template_kwargs: dict | str | None = documented(
        "Passed to the server's chat template, e.g. {enable_thinking: true}.", default=None)
    extra_body: dict | str | None = documented(
        "Extra request fields the server understands, e.g. {top_k: 20} (recorded in the protocol).", default=None)
    # --- efficiency (evals/efficiency.py) ---------------------------------------------------------------
    efficiency: bool | None = documented(
        "Measure latency, throughput and memory on the engine that generated. Default: on for engine hf/vllm "
        "and serve_model, off for base_url (a remote API bills the tokens; its latency includes the network).",
        default=None)
    efficiency_prompts: int = documented("Prompts per benchmark timed at batch 1 (the benchmark's first ones).",
                                    default=4)
    efficiency_tokens: int = documented("Tokens each timed request generates (EOS ignored: every model does the "
                                   "same work).", default=32)
    # --- grading ----------------------------------------------------------------------------------------
    grader_workers: int | None = documented("Parallel grading processes. Default: the number of CPUs.", default=None)
    math_timeout_s: float = documented("Seconds one math-verify comparison may take (then it is wrong: timeout).",
                                  default=5.0)

    def __post_init__(self):
        for name in ("custom_benchmarks", "chat_template_kwargs", "extra_body"):
            setattr(self, name, json_dict(name, getattr(self, name)))
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
        at_least(self, 1, "n", "limit", "max_tokens", "grader_workers", "efficiency_prompts")
        if self.efficiency_tokens < 2:
            raise ConfigError(f"efficiency_tokens: must be >= 2 (per-token latency needs two), got "
                              f"{self.efficiency_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"temperature / top_p: need temperature >= 0 and 0 < top_p <= 1, got "
                              f"{self.temperature} / {self.top_p}")
        if self.math_timeout_s <= 0:
            raise ConfigError(f"math_timeout_s: must be > 0, got {self.math_timeout_s}")
        for name in ("math_prompt_template", "code_prompt_template"):
            path = getattr(self, name)
            if path and path != "none" and not Path(path).is_file():
                raise ConfigError(f"{name}: no such file: {path}")
        if self.completions and not Path(self.completions).is_file():
            raise ConfigError(f"completions: no such file: {self.completions}")

    @property
    def grade_only(self) -> bool:
        return bool(self.completions)


def measures_efficiency(cfg: EvalsConfig, engine: EngineConfig) -> bool:
    """`efficiency` when set; by default on for a model run here (hf, vllm, serve_model), off for a remote API."""
    if cfg.grade_only:
        return False
    return cfg.efficiency if cfg.efficiency is not None else engine.engine != "http" or bool(engine.serve_model)


def parse_config(argv: list[str] | None = None) -> tuple[EvalsConfig, EngineConfig]:
    """(EvalsConfig, EngineConfig) from --config file.yaml plus --field value overrides (data/config.py): unknown
    keys and abbreviations are errors, and so is the model missing when there are no completions to grade."""
    cfg, engine = parse([EvalsConfig, EngineConfig], argv, "python -m evals", removed=REMOVED)
    if not cfg.grade_only:
        engine.require_model()
    if not cfg.model_name:  # derived from the model here: EvalsConfig alone does not know it
        cfg.model_name = _derived_name(cfg, engine)
    if not NAME.fullmatch(cfg.model_name):
        raise ConfigError(f"model_name: {cfg.model_name!r} must be letters, digits and ._+=- (it names files)")
    return cfg, engine


def save(path: Path, cfg: EvalsConfig, engine: EngineConfig) -> None:
    """The resolved config, next to the results: the key's variable name, never the key or URL credentials."""
    save_config(path, {**asdict(cfg), **engine.public()})


def _derived_name(cfg: EvalsConfig, engine: EngineConfig) -> str:
    if cfg.completions:
        source = Path(cfg.completions).name.split(".")[0]
    else:
        parts = [Path(p.rstrip("/")).name for p in (engine.model or engine.serve_model, engine.adapter) if p]
        source = "+".join(parts)
    if not source:
        raise ConfigError("model_name: required (nothing to derive it from: set model or model_name)")
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", source).strip("-") or "model"
