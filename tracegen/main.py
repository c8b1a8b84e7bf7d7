"""python -m tracegen --config recipes/<x>/tracegen.yaml [--field value ...]

Reads problems, asks the teacher for n chain-of-thought samples each, and writes trace shards under
<output_dir>/traces/ (schema: data/README.md). Rerunning the same command skips finished traces and
retries failed ones; `--shard i/N` splits the job across machines. Other stages call the same work as a
function (evals samples the models it scores this way):

    from tracegen.main import generate
    result = generate(TracegenConfig(problems="p.jsonl", output_dir="runs/x", base_url=["http://h:8000/v1"]))
    result.trace_ids[("p1", 0)]   # the trace of each (problem id, sample index) the config asks for
"""

import asyncio
import contextlib
import json
import logging
import urllib.parse
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import httpx2
import openai

from data.config import ConfigError, InputError
from tracegen.config import TracegenConfig, parse_config
from tracegen.http_engine import FatalEndpointError, HttpEngine
from tracegen.problems import load_problems, make_renderer, shard_of
from tracegen.progress import Meter, Tally, cost
from tracegen.records import logprob_row, request_key, source_key, trace_id
from tracegen.secrets import Redactor, public_url, split_query
from tracegen.server import ServerError, managed_vllm_server
from tracegen.store import ShardWriter, check_parts, done_trace_ids, write_problems

log = logging.getLogger("tracegen")


@dataclass
class WorkItem:
    problem_id: str
    messages: list[dict]
    key: str
    indexes: list[int]


@dataclass
class Generated:
    """What generate() leaves: the trace id of every (problem id, sample index) the config asks for, in problem
    order (their rows: tracegen.store.read_traces), and the summary it wrote next to the traces."""
    trace_ids: dict[tuple[str, int], str]
    summary: dict

    @property
    def failed(self) -> int:
        return self.summary["this_run"]["errors"]


def main(argv: list[str] | None = None) -> int:
    cfg = None
    try:
        cfg = parse_config(argv)
        log.info("resolved config:\n%s", json.dumps(cfg.public(), indent=2))
        result = generate(cfg)
    except (ConfigError, InputError, ServerError, FatalEndpointError, ImportError, OSError) as e:
        log.error("%s", Redactor(cfg.secrets() if cfg else [])(str(e)))
        return 2
    # --- report ----------------------------------------------------------------------------------------
    run = result.summary["this_run"]
    log.info("done: %d samples, %d failed, %s tokens, %.0fs%s", run["samples"], run["errors"],
             f"{run['completion_tokens']:,}", run["wall_s"],
             f", cost ${run['cost_usd']}" if run["cost_usd"] is not None else "")
    if result.failed:
        log.error("%d samples failed after retries (see the error column and the summary); rerun the same "
                  "command to retry only those", result.failed)
        return 1
    return 0


def generate(cfg: TracegenConfig) -> Generated:
    """Generate and write every sample `cfg` asks for that its run directory lacks. The problems, the run
    directory and the teacher are checked before anything is written: ConfigError, InputError, ServerError and
    FatalEndpointError name what is wrong."""
    # --- load: every problem is validated before anything is sent ------------------------------------
    problems = load_problems(**cfg.problem_source())
    mine = shard_of(problems, cfg.shard_index)[: cfg.limit]
    render = make_renderer(cfg.prompt_template, cfg.system_prompt)
    prompts = {p["id"]: render(p) for p in mine}
    check_parts(Path(cfg.output_dir))
    log.info("%d problems (%d in shard %s), n=%d", len(problems), len(mine), cfg.shard, cfg.n)
    # --- generate --------------------------------------------------------------------------------------
    if cfg.engine == "http":
        with teacher(cfg) as base_urls:
            return asyncio.run(generate_http(cfg, base_urls, prompts, mine))
    return generate_in_process(cfg, prompts, mine)


@contextlib.contextmanager
def teacher(cfg: TracegenConfig):
    """The base URLs to use: the configured ones, or a vLLM server we start (and always stop)."""
    if cfg.base_url:
        yield cfg.base_url
        return
    name = cfg.model or Path(cfg.serve_model).name
    with managed_vllm_server(cfg.serve_model, name, cfg.serve_args or [], Path(cfg.output_dir) / "logs" /
                             "vllm-server.log", cfg.serve_timeout_s) as url:
        yield [url]


async def generate_http(cfg: TracegenConfig, base_urls: list[str], prompts: dict, problems: list[dict]) -> Generated:
    """Check the servers, then write every sample not done yet (one event loop for the clients' life)."""
    clients = make_clients(cfg, base_urls)
    try:
        cfg = replace(cfg, model=await resolve_model(cfg, clients))  # the served name, in every request key
        with open_writer(cfg, problems) as writer:
            keys, work = plan_and_log(cfg, prompts, endpoint_id(cfg, base_urls), writer)
            tally = await generate_all(cfg, HttpEngine(cfg, clients), work, writer)
        return finish(cfg, prompts, keys, work, tally)
    finally:
        for client in clients:
            await client.close()


def generate_in_process(cfg: TracegenConfig, prompts: dict, problems: list[dict]) -> Generated:
    """engine vllm/hf: batches of `batch_size` prompts through a model loaded here."""
    if cfg.engine == "vllm":
        from tracegen.vllm_engine import VllmEngine as Engine
    else:
        from tracegen.hf_engine import HfEngine as Engine
    engine = Engine(cfg)  # load before writing anything: a bad model path fails with nothing half-written
    endpoint = cfg.engine + (f"+adapter:{cfg.adapter}" if cfg.adapter else "")
    with open_writer(cfg, problems) as writer:
        keys, work = plan_and_log(cfg, prompts, endpoint, writer)
        tally = generate_batches(cfg, engine, work, writer)
    return finish(cfg, prompts, keys, work, tally)


@contextlib.contextmanager
def open_writer(cfg: TracegenConfig, problems: list[dict]):
    run_dir, (i, count) = Path(cfg.output_dir), cfg.shard_index
    cfg.save(run_dir / ("tracegen.config.yaml" if count == 1 else f"tracegen.config.{i}of{count}.yaml"))
    write_problems(run_dir, problems, source_key(cfg.problem_source()), cfg.shard_index)
    writer = ShardWriter(run_dir, cfg.shard_index, cfg.shard_rows, logprobs=cfg.top_logprobs > 0)
    try:
        yield writer
    finally:
        writer.close()


def plan_and_log(cfg: TracegenConfig, prompts: dict, endpoint: str, writer: ShardWriter
                 ) -> tuple[dict[str, str], list[WorkItem]]:
    keys = request_keys(cfg, prompts, endpoint)
    work = plan(cfg, prompts, keys, done_trace_ids(Path(cfg.output_dir)))
    todo = sum(len(w.indexes) for w in work)
    log.info("%d samples to generate in %d requests (%d already done)", todo, len(work), len(prompts) * cfg.n - todo)
    return keys, work


def finish(cfg: TracegenConfig, prompts: dict, keys: dict[str, str], work: list[WorkItem], tally: Tally) -> Generated:
    tally.expected = len(prompts) * cfg.n
    tally.done = tally.expected - sum(len(w.indexes) for w in work) + tally.samples - tally.errors
    trace_ids = {(pid, i): trace_id(keys[pid], pid, i) for pid in prompts for i in range(cfg.n)}
    return Generated(trace_ids, write_summary(cfg, tally, len(prompts)))


def make_clients(cfg: TracegenConfig, base_urls: list[str]) -> list[openai.AsyncOpenAI]:
    timeout = openai.Timeout(cfg.timeout_s, connect=30.0)  # openai 3.x clients are httpx2's
    per_client = max(1, cfg.concurrency)
    clients = []
    for url in base_urls:
        base, query = split_query(url)  # the SDK sends `default_query` with every request, intact
        clients.append(openai.AsyncOpenAI(
            base_url=base, default_query=query or None, api_key=cfg.api_key(), max_retries=0, timeout=timeout,
            http_client=openai.DefaultAsyncHttpxClient(
                timeout=timeout, limits=httpx2.Limits(max_connections=per_client, max_keepalive_connections=per_client)),
        ))
    return clients


async def resolve_model(cfg: TracegenConfig, clients: list[openai.AsyncOpenAI]) -> str:
    """Check every server answers before anything is written; default the model to the one served."""
    redact = Redactor(cfg.secrets())

    async def models(client):
        where = public_url(str(client.base_url))
        try:
            return [m.id async for m in client.with_options(timeout=30, max_retries=2).models.list()]
        except openai.NotFoundError:
            return None  # some gateways do not list models
        except openai.AuthenticationError:
            raise ConfigError(f"{where}: the API key was refused (api_key_env: {cfg.api_key_env})") from None
        except openai.APIError as e:
            raise ConfigError(redact(f"base_url: cannot reach {where}: {e}")) from None

    listed = [await models(c) for c in clients]
    if cfg.model is None:
        if not listed[0] or len(listed[0]) != 1:
            raise ConfigError(f"model: required; {public_url(str(clients[0].base_url))} serves {listed[0]}")
        log.info("model: %s (the only model the server lists)", listed[0][0])
        return listed[0][0]
    for client, names in zip(clients, listed, strict=True):
        if names is not None and cfg.model not in names:
            raise ConfigError(f"model: {cfg.model!r} is not served by {public_url(str(client.base_url))} "
                              f"(it serves {names})")
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


def request_keys(cfg: TracegenConfig, prompts: dict, endpoint: str) -> dict[str, str]:
    """problem id -> the hash of everything that decides its samples (tracegen/records.py)."""
    sampling = sampling_params(cfg)
    return {problem_id: request_key(messages, cfg.model, endpoint, sampling) for problem_id, messages in prompts.items()}


def plan(cfg: TracegenConfig, prompts: dict, keys: dict[str, str], done: set[str]) -> list[WorkItem]:
    """The requests still needed: every sample index of every problem whose trace is not done."""
    per_request = cfg.samples_per_request or cfg.n
    work = []
    for problem_id, messages in prompts.items():
        missing = [i for i in range(cfg.n) if trace_id(keys[problem_id], problem_id, i) not in done]
        for start in range(0, len(missing), per_request):
            work.append(WorkItem(problem_id, messages, keys[problem_id], missing[start:start + per_request]))
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
                response = engine.failed(len(item.indexes), engine.redact(f"internal error: {type(e).__name__}: {e}"))
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
