"""python -m tracegen --config recipes/<x>/tracegen.yaml [--field value ...]

Reads problems, asks the teacher for n chain-of-thought samples each, and writes trace shards under
<output_dir>/traces/ (schema: data/README.md). Rerunning the same command skips finished traces and
retries failed ones; `--shard i/N` splits the job across machines.
"""

import asyncio
import contextlib
import json
import logging
import urllib.parse
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai

from tracegen.config import ConfigError, TracegenConfig, parse_config
from tracegen.http_engine import FatalEndpointError, HttpEngine
from tracegen.problems import ProblemError, load_problems, make_renderer, shard_of
from tracegen.progress import Meter, Tally, cost
from tracegen.records import logprob_row, request_key, source_key, trace_id
from tracegen.server import ServerError, managed_vllm_server
from tracegen.store import ShardWriter, done_trace_ids, write_problems

log = logging.getLogger("tracegen")


@dataclass
class WorkItem:
    problem_id: str
    messages: list[dict]
    key: str
    indexes: list[int]


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        log.info("resolved config:\n%s", json.dumps(asdict(cfg), indent=2))
        # --- load: every problem is validated before anything is sent --------------------------------
        problems = load_problems(cfg)
        mine = shard_of(problems, cfg.shard_index)[: cfg.limit]
        render = make_renderer(cfg.prompt_template, cfg.system_prompt)
        prompts = {p["id"]: render(p) for p in mine}
        log.info("%d problems (%d in shard %s), n=%d", len(problems), len(mine), cfg.shard, cfg.n)
        # --- generate ----------------------------------------------------------------------------------
        if cfg.engine == "http":
            with teacher(cfg) as base_urls:
                tally = asyncio.run(generate(cfg, base_urls, prompts, mine))
        else:
            tally = generate_in_process(cfg, prompts, mine)
    except (ConfigError, ProblemError, ServerError, FatalEndpointError, ImportError, OSError) as e:
        log.error("%s", e)
        return 2
    # --- report ----------------------------------------------------------------------------------------
    summary = write_summary(cfg, tally, len(mine))
    log.info("done: %d samples, %d failed, %s tokens, %.0fs%s", tally.samples, tally.errors,
             f"{tally.completion_tokens:,}", tally.wall_s,
             f", cost ${summary['this_run']['cost_usd']}" if summary["this_run"]["cost_usd"] is not None else "")
    if tally.errors:
        log.error("%d samples failed after retries (see the error column and the summary); rerun the same "
                  "command to retry only those", tally.errors)
        return 1
    return 0


@contextlib.contextmanager
def teacher(cfg: TracegenConfig):
    """The base URLs to use: the configured ones, or a vLLM server we start (and always stop)."""
    if cfg.base_url:
        yield cfg.base_url
        return
    name = cfg.model or Path(cfg.serve_model).name
    cfg.model = name
    with managed_vllm_server(cfg.serve_model, name, cfg.serve_args or [], Path(cfg.output_dir) / "logs" /
                             "vllm-server.log", cfg.serve_timeout_s) as url:
        yield [url]


async def generate(cfg: TracegenConfig, base_urls: list[str], prompts: dict, problems: list[dict]) -> Tally:
    """Check the servers, then write every sample not done yet (one event loop for the clients' life)."""
    clients = make_clients(cfg, base_urls)
    try:
        cfg.model = await resolve_model(cfg, clients)
        with open_writer(cfg, problems) as writer:
            work = plan_and_log(cfg, prompts, endpoint_id(cfg, base_urls), writer)
            return finish(await generate_all(cfg, HttpEngine(cfg, clients), work, writer), cfg, prompts, work)
    finally:
        for client in clients:
            await client.close()


def generate_in_process(cfg: TracegenConfig, prompts: dict, problems: list[dict]) -> Tally:
    """engine vllm/hf: batches of `batch_size` prompts through a model loaded here."""
    if cfg.engine == "vllm":
        from tracegen.vllm_engine import VllmEngine as Engine
    else:
        from tracegen.hf_engine import HfEngine as Engine
    engine = Engine(cfg)  # load before writing anything: a bad model path fails with nothing half-written
    endpoint = cfg.engine + (f"+adapter:{cfg.adapter}" if cfg.adapter else "")
    with open_writer(cfg, problems) as writer:
        work = plan_and_log(cfg, prompts, endpoint, writer)
        return finish(generate_batches(cfg, engine, work, writer), cfg, prompts, work)


@contextlib.contextmanager
def open_writer(cfg: TracegenConfig, problems: list[dict]):
    run_dir, (i, count) = Path(cfg.output_dir), cfg.shard_index
    cfg.save(run_dir / ("tracegen.config.yaml" if count == 1 else f"tracegen.config.{i}of{count}.yaml"))
    source = {name: getattr(cfg, name) for name in ("problems", "problems_split", "problems_config",
                                                    "problems_revision", "column_map", "problem_defaults",
                                                    "answer_format", "id_prefix")}
    write_problems(run_dir, problems, source_key(source), cfg.shard_index)
    writer = ShardWriter(run_dir, cfg.shard_index, cfg.shard_rows, logprobs=cfg.top_logprobs > 0)
    try:
        yield writer
    finally:
        writer.close()


def plan_and_log(cfg: TracegenConfig, prompts: dict, endpoint: str, writer: ShardWriter) -> list[WorkItem]:
    work = plan(cfg, prompts, endpoint, done_trace_ids(Path(cfg.output_dir)))
    todo = sum(len(w.indexes) for w in work)
    log.info("%d samples to generate in %d requests (%d already done)", todo, len(work), len(prompts) * cfg.n - todo)
    return work


def finish(tally: Tally, cfg: TracegenConfig, prompts: dict, work: list[WorkItem]) -> Tally:
    tally.expected = len(prompts) * cfg.n
    tally.done = tally.expected - sum(len(w.indexes) for w in work) + tally.samples - tally.errors
    return tally


def make_clients(cfg: TracegenConfig, base_urls: list[str]) -> list[openai.AsyncOpenAI]:
    timeout = httpx.Timeout(cfg.timeout_s, connect=30.0)
    per_client = max(1, cfg.concurrency)
    return [openai.AsyncOpenAI(
        base_url=url, api_key=cfg.api_key(), max_retries=0, timeout=timeout,
        http_client=openai.DefaultAsyncHttpxClient(
            timeout=timeout, limits=httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)),
    ) for url in base_urls]


async def resolve_model(cfg: TracegenConfig, clients: list[openai.AsyncOpenAI]) -> str:
    """Check every server answers before anything is written; default the model to the one served."""
    async def models(client):
        try:
            return [m.id async for m in client.with_options(timeout=30, max_retries=2).models.list()]
        except openai.NotFoundError:
            return None  # some gateways do not list models
        except openai.AuthenticationError:
            raise ConfigError(f"{client.base_url}: the API key was refused (api_key_env: {cfg.api_key_env})") from None
        except openai.APIError as e:
            raise ConfigError(f"base_url: cannot reach {client.base_url}: {e}") from None

    listed = [await models(c) for c in clients]
    if cfg.model is None:
        if not listed[0] or len(listed[0]) != 1:
            raise ConfigError(f"model: required; {clients[0].base_url} serves {listed[0]}")
        log.info("model: %s (the only model the server lists)", listed[0][0])
        return listed[0][0]
    for client, names in zip(clients, listed, strict=True):
        if names is not None and cfg.model not in names:
            raise ConfigError(f"model: {cfg.model!r} is not served by {client.base_url} (it serves {names})")
    return cfg.model


def endpoint_id(cfg: TracegenConfig, base_urls: list[str]) -> str:
    if cfg.endpoint_id:
        return cfg.endpoint_id
    host = urllib.parse.urlparse(base_urls[0]).hostname or ""
    return "local" if cfg.serve_model or host in ("localhost", "::1") or host.startswith("127.") else host


def sampling_params(cfg: TracegenConfig) -> dict:
    """The effective sampling parameters: part of every request key and stored with every trace."""
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens, "seed": cfg.seed,
            "top_logprobs": cfg.top_logprobs, "extra_body": cfg.extra_body,
            "chat_template_kwargs": cfg.chat_template_kwargs}


def plan(cfg: TracegenConfig, prompts: dict, endpoint: str, done: set[str]) -> list[WorkItem]:
    """The requests still needed: every sample index of every problem whose trace is not done."""
    sampling, per_request = sampling_params(cfg), cfg.samples_per_request or cfg.n
    work = []
    for problem_id, messages in prompts.items():
        key = request_key(messages, cfg.model, endpoint, sampling)
        missing = [i for i in range(cfg.n) if trace_id(key, problem_id, i) not in done]
        for start in range(0, len(missing), per_request):
            work.append(WorkItem(problem_id, messages, key, missing[start:start + per_request]))
    return work


async def generate_all(cfg: TracegenConfig, engine: HttpEngine, work: list[WorkItem], writer: ShardWriter) -> Tally:
    """`concurrency` workers pull requests from one queue; each finished request is journaled at once."""
    tally, queue = Tally(), iter(work)
    sampling = json.dumps(sampling_params(cfg), sort_keys=True)

    async def worker(meter):
        for item in queue:
            try:
                response = await engine.generate(item.messages, len(item.indexes))
            except FatalEndpointError:
                raise
            except Exception as e:  # a bug must not kill a week-long job: record it on the item
                log.exception("request for %s failed unexpectedly", item.problem_id)
                response = engine.failed(len(item.indexes), f"internal error: {type(e).__name__}: {e}")
            writer.append(*to_rows(item, response, sampling, cfg.top_logprobs > 0))
            tally.add(item.problem_id, response)
            meter.update(tally)

    with Meter(sum(len(w.indexes) for w in work), cfg.log_every_s) as meter:
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(cfg.concurrency, len(work))):
                    group.create_task(worker(meter))
        except* FatalEndpointError as group_error:
            raise group_error.exceptions[0] from None
    return tally


def generate_batches(cfg: TracegenConfig, engine, work: list[WorkItem], writer: ShardWriter) -> Tally:
    """In-process engines: one batch at a time, each request journaled as soon as its batch is done."""
    tally = Tally()
    sampling = json.dumps(sampling_params(cfg), sort_keys=True)
    with Meter(sum(len(w.indexes) for w in work), cfg.log_every_s) as meter:
        for start in range(0, len(work), cfg.batch_size):
            batch = work[start:start + cfg.batch_size]
            responses = engine.generate_batch([(item.messages, len(item.indexes)) for item in batch])
            for item, response in zip(batch, responses, strict=True):
                writer.append(*to_rows(item, response, sampling, cfg.top_logprobs > 0))
                tally.add(item.problem_id, response)
            meter.update(tally)
    return tally


def to_rows(item: WorkItem, response, sampling: str, with_logprobs: bool) -> tuple[list[dict], list[dict]]:
    traces, logprobs, now = [], [], datetime.now(UTC)
    messages = json.dumps(item.messages, ensure_ascii=False)
    for index, s in zip(item.indexes, response.samples, strict=True):
        tid = trace_id(item.key, item.problem_id, index)
        traces.append({
            "trace_id": tid, "request_key": item.key, "problem_id": item.problem_id, "sample_index": index,
            "model": response.model, "messages": messages, "reasoning": s.reasoning, "content": s.content,
            "reasoning_source": s.reasoning_source, "finish_reason": s.finish_reason,
            "prompt_tokens": response.prompt_tokens, "completion_tokens": s.completion_tokens,
            "reasoning_tokens": s.reasoning_tokens, "latency_s": response.latency_s,
            "attempts": response.attempts, "error": response.error, "sampling": sampling, "created_at": now})
        if with_logprobs and s.token_ids is not None:
            logprobs.append(logprob_row(tid, s, response))
    return traces, logprobs


def write_summary(cfg: TracegenConfig, tally: Tally, problems: int) -> dict:
    i, count = cfg.shard_index
    wall = max(tally.wall_s, 1e-9)
    summary = {
        "model": cfg.model, "shard": cfg.shard, "problems": problems, "n": cfg.n,
        "samples_expected": tally.expected, "samples_done": tally.done,
        "this_run": {
            "requests": tally.requests, "samples": tally.samples, "errors": tally.errors,
            "finish_reasons": dict(tally.finish_reasons), "prompt_tokens": tally.prompt_tokens,
            "completion_tokens": tally.completion_tokens, "wall_s": round(tally.wall_s, 2),
            "samples_per_s": round(tally.samples / wall, 3), "tokens_per_s": round(tally.completion_tokens / wall, 1),
            "cost_usd": cost(tally, cfg), "first_failures": tally.failed,
        },
    }
    path = Path(cfg.output_dir) / ("tracegen.summary.json" if count == 1 else f"tracegen.summary.{i}of{count}.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
    return summary
