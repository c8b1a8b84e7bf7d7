"""The tracegen stage's config: EngineConfig (which model generates, and how its requests travel) and
TracegenConfig (EngineConfig plus the problems, the prompt, the sampling and the output), one flat YAML.

    python -m tracegen --config recipes/<x>/tracegen.yaml [--field value ...]

evals parses EngineConfig beside its own config (as TRL's scripts parse ModelConfig beside theirs), so the
model an evals run samples is set with the same keys as tracegen's teacher.
"""

import os
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from data.config import ConfigError, at_least, documented, json_dict, save_config
from data.config import parse_config as parse
from tracegen.secrets import public_url, url_secrets

ENGINES = ("http", "vllm", "hf")
ANSWER_FORMATS = ("plain", "gsm8k", "boxed")
PROBLEM_SOURCE = ("problems", "problems_split", "problems_config", "problems_revision", "column_map",
                  "problem_defaults", "answer_format", "id_prefix")  # load_problems' arguments



@dataclass
class EngineConfig:
    # --- the model ------------------------------------------------------------------------------------
    engine: str = documented(
        "http: any OpenAI-compatible /v1/chat/completions server (base_url or serve_model); vllm: vLLM's offline "
        "LLM in this process; hf: transformers generate in this process (CPUs, LoRA adapters).", default="http")
    base_url: list[str] | None = documented(
        "One base URL or a list (balanced), e.g. http://host:8000/v1. Credentials in it (user:pass@, ?api_key=) "
        "are sent, and shown as ***.", default=None)
    serve_model: str | None = documented(
        "Instead of base_url: a model path that is served with vLLM on a free loopback port (and stopped at "
        "the end).", default=None)
    serve_args: list[str] | str | None = documented(
        'Extra arguments for the managed vLLM server: a YAML list or one string, e.g. '
        '"--max-model-len 4096 --reasoning-parser deepseek_r1".', default=None)
    serve_timeout_s: float = documented("Seconds to wait for the managed server to become healthy.", default=900.0)
    model: str | None = documented(
        "http: the model name sent to the server (default: the only model it lists). vllm/hf: the model "
        "directory or hub name to load.", default=None)
    adapter: str | None = documented("vllm/hf: a LoRA adapter directory applied to `model`.", default=None)
    engine_kwargs: dict | str | None = documented(
        "vllm: arguments of vllm.LLM (e.g. {max_model_len: 4096, gpu_memory_utilization: 0.9}); hf: of "
        "from_pretrained (e.g. {dtype: bfloat16}).", default=None)
    batch_size: int = documented("vllm/hf: prompts per in-process batch (a shard part is written after each).",
                            default=64)
    api_key_env: str | None = documented(
        "Name of the environment variable holding the API key (the key itself is never stored or shown).",
        default=None)
    endpoint_id: str | None = documented(
        "Identity of the endpoint in request keys. Default: the host of the first base_url (loopback and "
        "managed servers: 'local'). Set it to keep resuming when servers move.", default=None)
    # --- transport ------------------------------------------------------------------------------------
    samples_per_request: int | None = documented(
        "At most this many samples per request (1 for APIs that refuse n>1). Default: all n at once.",
        default=None)
    return_token_ids: bool | None = documented(
        "Ask the server for completion token ids (a vLLM extension) for exact per-sample token counts. "
        "Default: on for managed servers and with top_logprobs.", default=None)
    concurrency: int = documented("Requests in flight at once (over all base URLs).", default=64)
    timeout_s: float = documented("Seconds one request may take (long reasoning is slow).", default=3600.0)
    max_retries: int = documented("Retries of a request on 429, 5xx, dropped connections, timeouts.", default=8)
    retry_backoff_s: float = documented("First retry delay; doubles each retry, with jitter.", default=1.0)
    retry_max_backoff_s: float = documented("Longest retry delay.", default=120.0)

    def __post_init__(self):
        self.engine_kwargs = json_dict("engine_kwargs", self.engine_kwargs)
        if isinstance(self.serve_args, str):
            self.serve_args = shlex.split(self.serve_args)
        if isinstance(self.base_url, str):
            self.base_url = [self.base_url]
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: {self.engine!r} is not one of: {', '.join(ENGINES)}")
        for url in self.base_url or []:
            if not re.match(r"https?://[^/]", url):
                raise ConfigError(f"base_url: {public_url(url)!r} is not an http(s):// URL")
        if self.base_url and self.serve_model:
            raise ConfigError("base_url / serve_model: set exactly one (a server to use, or a model to serve)")
        if self.engine != "http" and (self.base_url or self.serve_model):
            raise ConfigError(f"engine: {self.engine} loads `model` in this process: set model, not base_url or "
                              "serve_model")
        if self.adapter and self.engine == "http":
            raise ConfigError("adapter: only for engine vllm or hf (serve a merged model or use vLLM's --lora-modules)")
        at_least(self, 1, "concurrency", "batch_size", "samples_per_request")
        at_least(self, 0, "max_retries")
        if self.api_key_env and self.api_key_env not in os.environ:
            raise ConfigError(f"api_key_env: environment variable {self.api_key_env} is not set")

    @property
    def has_model(self) -> bool:
        return bool(self.base_url or self.serve_model) if self.engine == "http" else bool(self.model)

    def require_model(self) -> None:
        if not self.has_model:
            raise ConfigError("base_url / serve_model / model: nothing generates: set base_url (a server), "
                              "serve_model (a model to serve) or, with engine vllm or hf, model")

    def api_key(self) -> str:
        # vLLM and most self-hosted servers accept any key when they were started without one.
        return os.environ[self.api_key_env] if self.api_key_env else "EMPTY"

    def secrets(self) -> list[str]:
        """What must never be written or logged: the API key, credentials in base_url, vLLM's --api-key."""
        found = [os.environ[self.api_key_env]] if self.api_key_env else []
        for url in self.base_url or []:
            found += url_secrets(url)
        args = self.serve_args or []
        found += [value for flag, value in zip(args, args[1:], strict=False) if flag == "--api-key"]
        found += [a.split("=", 1)[1] for a in args if a.startswith("--api-key=")]
        return found

    def public(self) -> dict:
        """The fields as they may be logged and saved: base_url credentials shown as ***."""
        values = asdict(self)
        if self.base_url:
            values["base_url"] = [public_url(u) for u in self.base_url]
        if self.serve_args:
            values["serve_args"] = [a if a not in self.secrets() else "***" for a in self.serve_args]
        return values


@dataclass
class TracegenConfig(EngineConfig):
    # --- problems -------------------------------------------------------------------------------------
    problems: str | None = documented("JSONL or Parquet file, a dataset folder, or a Hugging Face dataset name.", default=None)
    output_dir: str | None = documented("Run directory; traces go to <output_dir>/traces/.", default=None)
    problems_split: str = documented("Split of a Hugging Face dataset.", default="train")
    problems_config: str | None = documented("Config (subset) of a Hugging Face dataset.", default=None)
    problems_revision: str | None = documented("Pinned revision of a Hugging Face dataset.", default=None)
    column_map: dict | str | None = documented(
        'Problem field -> source column, e.g. {prompt: question, answer: final}. "@row" as a column means '
        "the 0-based row number (for data without ids).", default=None)
    problem_defaults: dict | str | None = documented(
        "Values for Problem fields the source lacks, e.g. {domain: math, source: gsm8k}.", default=None)
    id_prefix: str = documented(
        'Prepended to every problem id, e.g. "math/": several sources can then share one run directory.',
        default="")
    answer_format: str = documented(
        "How the mapped `answer` column holds the gold final answer: plain (as is), gsm8k (a solution ending in "
        '"#### <answer>") or boxed (a solution whose last \\boxed{} is the answer, e.g. MATH). The full '
        "solution is kept in meta.solution.", default="plain")
    limit: int | None = documented("Use only the first N problems (after validation).", default=None)
    shard: str = documented("i/N: this process does the i-th of N deterministic parts of the job.", default="0/1")
    # --- prompt ---------------------------------------------------------------------------------------
    prompt_template: str | None = documented(
        "Jinja file rendering the user turn from a problem ({{ prompt }}, {{ id }}, {{ meta }}...). "
        "Default: the problem's prompt as is.", default=None)
    system_prompt: str | None = documented("Text or Jinja file with a system turn. Default: none.", default=None)
    chat_template_kwargs: dict | str | None = documented(
        "Passed to the server's chat template, e.g. {enable_thinking: true}.", default=None)
    # --- sampling -------------------------------------------------------------------------------------
    n: int = documented("Samples per problem.", default=1)
    temperature: float = documented("Sampling temperature.", default=0.6)
    top_p: float = documented("Nucleus sampling.", default=0.95)
    max_tokens: int = documented("Most completion tokens per sample (reasoning included).", default=32768)
    seed: int | None = documented("Sampling seed sent with every request.", default=None)
    top_logprobs: int = documented(
        "k > 0: store token ids and top-k logprobs of every completion token in logprobs/ (k <= 20), with the "
        "mass outside them and the prompt's ids: the model's raw distribution at temperature 1 (vLLM's default), "
        "not the sampled one at temperature / top_p (data/README.md, Teacher logprobs).",
        default=0)
    extra_body: dict | str | None = documented(
        "Extra request fields the server understands, e.g. {top_k: 20, repetition_detection: {...}}.",
        default=None)
    # --- output ---------------------------------------------------------------------------------------
    shard_rows: int = documented("Traces per finished Parquet file.", default=2000)
    price_input_per_mtok: float | None = documented("Price per million prompt tokens, for the cost line.", default=None)
    price_output_per_mtok: float | None = documented("Price per million completion tokens.", default=None)
    log_every_s: float = documented("Status line interval when stderr is not a terminal.", default=60.0)

    def __post_init__(self):
        super().__post_init__()
        for name in ("column_map", "problem_defaults", "chat_template_kwargs", "extra_body"):
            setattr(self, name, json_dict(name, getattr(self, name)))
        if not self.problems:
            raise ConfigError("problems: required (a JSONL/Parquet file or a dataset name)")
        if not self.output_dir:
            raise ConfigError("output_dir: required (e.g. runs/<name>)")
        self.require_model()
        if self.answer_format not in ANSWER_FORMATS:
            raise ConfigError(f"answer_format: {self.answer_format!r} is not one of: {', '.join(ANSWER_FORMATS)}")
        if not re.fullmatch(r"\d+/\d+", self.shard) or not int(self.shard.split("/")[0]) < int(self.shard.split("/")[1]):
            raise ConfigError(f"shard: {self.shard!r} is not i/N with 0 <= i < N")
        at_least(self, 1, "n", "max_tokens", "shard_rows", "limit")
        if not 0 <= self.top_logprobs <= 20:
            raise ConfigError(f"top_logprobs: {self.top_logprobs} is not within 0..20")

    @property
    def shard_index(self) -> tuple[int, int]:
        i, count = self.shard.split("/")
        return int(i), int(count)

    @property
    def wants_token_ids(self) -> bool:
        if self.return_token_ids is not None:
            return self.return_token_ids
        return bool(self.serve_model) or self.top_logprobs > 0

    def problem_source(self) -> dict:
        """load_problems' arguments: where the problems come from and how they are read."""
        return {name: getattr(self, name) for name in PROBLEM_SOURCE}

    def save(self, path: Path) -> None:
        """The resolved config, for the run directory: the key's variable name, never the key."""
        save_config(path, self.public())


def parse_config(argv: list[str] | None = None) -> TracegenConfig:
    """--config file.yaml plus --field value overrides (data/config.py); unknown keys and abbreviations are errors."""
    (cfg,) = parse([TracegenConfig], argv, "python -m tracegen")
    return cfg
