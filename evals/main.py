"""python -m evals --config recipes/<x>/evals.yaml [--field value ...]
python -m evals --config recipes/<x>/evals.yaml --completions generations.jsonl   # grade only, no model

Scores a model on math and code benchmarks with DeepSeek-R1's protocol: n samples per problem at
temperature 0.6 / top_p 0.95, pass@1 as their mean, unbiased pass@k and maj@k (k = n). Generation is
tracegen's `generate` (any engine it has), one run per benchmark into <output_dir>/generations/<model>/<benchmark>/,
so a rerun resumes; a managed server (serve_model) is started once and serves every benchmark. Outputs:
<output_dir>/samples/<model>/<benchmark>.parquet, scores.json (every model evaluated into output_dir) and
report.md; with `efficiency` (default for local models) each benchmark's scores carry latency, throughput and
memory measured on the engine that generated (evals/efficiency.py). Exit codes: 0 done, 1 scored but some
samples could not be generated (counted as wrong; rerun to retry them), 2 a config or input error (named).
"""

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

import yaml

from data.config import ConfigError, InputError
from evals.benchmarks import Benchmark, level_of, load_benchmark, max_tokens_for
from evals.code_grader import CODE_GRADER_VERSION, CodeGrader
from evals.config import PUBLIC_BENCHMARKS, EvalsConfig, measures_efficiency, parse_config, save
from evals.efficiency import measure_efficiency
from evals.grading import grade_logged
from evals.math_grader import GRADER_VERSION, MathGrader
from evals.metrics import score
from evals.report import publish, write_samples
from evals.sandbox import isolation
from tracegen.config import EngineConfig, TracegenConfig
from tracegen.http_engine import FatalEndpointError
from tracegen.main import generate as tracegen_generate
from tracegen.problems import make_renderer
from tracegen.secrets import Redactor, public_url
from tracegen.server import ServerError, managed_vllm_server
from tracegen.store import read_traces

log = logging.getLogger("evals")
REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "evals" / "templates"


def main(argv: list[str] | None = None) -> int:
    engine = None
    try:
        cfg, engine = parse_config(argv)
        log.info("resolved config:\n%s", yaml.safe_dump({**asdict(cfg), **engine.public()}, sort_keys=False).rstrip())
        out = Path(cfg.output_dir)
        # --- load: every benchmark (and the completions file) is validated before any generation ---------
        rows = read_completions(cfg.completions) if cfg.grade_only else []
        names = benchmark_names(cfg, rows)
        benches = {name: load_benchmark(name, cfg.data_dir, cfg.custom_benchmarks) for name in names}
        save(out / "evals.config.yaml", cfg, engine)
        # --- generate with tracegen, or take the completions ----------------------------------------------
        if cfg.grade_only:
            log.info("grade-only: %d completions from %s; no model is called", len(rows), cfg.completions)
            samples = match_completions(cfg, rows, benches)
        else:
            benches = {name: replace(b, problems=b.problems[:cfg.limit]) for name, b in benches.items()}
            with shared_server(cfg, engine, len(benches)) as serving:
                samples = {name: generate(cfg, serving, bench) for name, bench in benches.items()}
                efficiency = measure(cfg, serving, benches, engine.serve_model) if measures_efficiency(
                    cfg, engine) else {}
        # --- grade ----------------------------------------------------------------------------------------
        grade_all(cfg, benches, samples)
        # --- score ----------------------------------------------------------------------------------------
        generation = generation_protocol(cfg, engine)
        scores = {name: score_benchmark(cfg, benches[name], samples[name], generation) for name in benches}
        for name, record in ({} if cfg.grade_only else efficiency).items():
            scores[name]["efficiency"] = record
    except (ConfigError, InputError, ServerError, FatalEndpointError, OSError) as e:
        log.error("%s", Redactor(engine.secrets() if engine else [])(str(e)))
        return 2
    # --- write and report ---------------------------------------------------------------------------------
    for name, graded in samples.items():
        write_samples(out / "samples" / cfg.model_name / f"{name}.parquet", graded, cfg.model_name)
    publish(out, cfg.model_name, scores)
    log_summary(cfg.model_name, scores, out)
    failed = sum(m["errors"] for m in scores.values())
    if failed:
        log.error("%d samples could not be generated (counted as wrong, `error` set in samples/); rerun the same "
                  "command to retry only those", failed)
        return 1
    return 0


# ----------------------------------------------------------------------------- generation (tracegen)


@contextlib.contextmanager
def shared_server(cfg: EvalsConfig, engine: EngineConfig, n_benchmarks: int):
    """With serve_model and several benchmarks, one managed vLLM server for all of them (a start costs minutes
    for a big model); tracegen then talks to it as a base_url. Request keys are unchanged (same served name,
    endpoint "local"), so runs made either way resume each other."""
    if engine.engine != "http" or not engine.serve_model or (n_benchmarks < 2 and not measures_efficiency(cfg, engine)):
        yield engine
        return
    name = engine.model or Path(engine.serve_model).name
    log_path = Path(cfg.output_dir) / "logs" / f"vllm-server-{cfg.model_name}.log"
    try:
        with managed_vllm_server(engine.serve_model, name, engine.serve_args or [], log_path,
                                 engine.serve_timeout_s) as url:
            yield replace(engine, serve_model=None, serve_args=None, model=name, base_url=[url])
    except ServerError as e:
        raise ConfigError(f"serve_model: {e}") from None


def measure(cfg: EvalsConfig, engine: EngineConfig, benches: dict[str, Benchmark], serve_model: str | None
            ) -> dict[str, dict]:
    """Latency, throughput and memory per benchmark (evals/efficiency.py), on the engine that generated."""
    prompts = {name: [make_renderer(prompt_template(cfg, b), None)(p) for p in b.problems[:cfg.efficiency_prompts]]
               for name, b in benches.items()}
    try:
        return measure_efficiency(cfg, engine, prompts, serve_model)
    except Exception as e:  # broad on purpose: a failed measurement must not lose the samples already paid for
        log.error("efficiency: measurement failed (%s: %s); scores are kept without it", type(e).__name__, e)
        return {name: {"error": f"{type(e).__name__}: {e}"} for name in benches}


def generate(cfg: EvalsConfig, engine: EngineConfig, bench: Benchmark) -> list[dict]:
    """n samples per problem, generated by tracegen (only those its run directory lacks) and read back by the
    trace ids it reports; a sample without a finished trace carries its error."""
    problems = Path(cfg.output_dir) / "generations" / bench.name / "problems.jsonl"
    write_problems(problems, bench.problems)
    run_dir = Path(cfg.output_dir) / "generations" / cfg.model_name / bench.name
    run = tracegen_config(cfg, engine, bench, problems, run_dir)
    log.info("%s: %d problems x %d samples (max_tokens %d, template %s) with tracegen into %s",
             bench.name, len(bench.problems), cfg.n, run.max_tokens, run.prompt_template or "none", run_dir)
    return read_generations(bench.name, run_dir, tracegen_generate(run).trace_ids)


def tracegen_config(cfg: EvalsConfig, engine: EngineConfig, bench: Benchmark, problems: Path,
                    run_dir: Path) -> TracegenConfig:
    """The tracegen run of one benchmark: the engine as configured, the prompt and sampling of the protocol."""
    return TracegenConfig(
        **asdict(engine), problems=str(problems), output_dir=str(run_dir), prompt_template=prompt_template(cfg, bench),
        n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=max_tokens_for_run(cfg, bench),
        seed=cfg.seed, chat_template_kwargs=cfg.chat_template_kwargs, extra_body=cfg.extra_body)


def read_generations(benchmark: str, run_dir: Path, trace_ids: dict[tuple[str, int], str]) -> list[dict]:
    """One sample per (problem, index), in tracegen's order: its trace's row without error, else its latest
    error (traces of other settings stay in the run directory under other ids)."""
    wanted = set(trace_ids.values())
    done, errors = {}, {}
    for t in sorted(read_traces(run_dir).to_pylist(), key=lambda t: t["created_at"]):
        if t["trace_id"] in wanted:
            (errors if t["error"] is not None else done)[t["trace_id"]] = t
    return [_sample(benchmark, pid, i, done.get(tid), errors[tid]["error"] if tid in errors else None)
            for (pid, i), tid in trace_ids.items()]


def _sample(benchmark: str, problem_id: str, index: int, trace: dict | None, error: str | None) -> dict:
    sample = {"benchmark": benchmark, "problem_id": problem_id, "sample_index": index}
    if trace is None:
        return sample | {"completion": None, "finish_reason": None, "completion_tokens": None,
                         "error": error or "no trace was generated"}
    # The graders look for the answer after </think>, so the reasoning goes back inside the tags.
    content = trace["content"] or ""
    completion = content if trace["reasoning"] is None else f"<think>\n{trace['reasoning']}\n</think>\n\n{content}"
    return sample | {"completion": completion, "finish_reason": trace["finish_reason"],
                     "completion_tokens": trace["completion_tokens"], "error": None}


def generation_protocol(cfg: EvalsConfig, engine: EngineConfig) -> str:
    """How the samples were made, for the protocol (URL credentials shown as ***)."""
    if cfg.grade_only:
        return f"completions file {cfg.completions} (sampling settings as declared in the config)"
    source = (f"base_url={','.join(map(public_url, engine.base_url))}" if engine.base_url
              else f"serve_model={engine.serve_model}")
    parts = [f"tracegen engine={engine.engine}", source if engine.engine == "http" else "",
             f"model={engine.model}" if engine.model else "", f"adapter={engine.adapter}" if engine.adapter else "",
             f"chat_template_kwargs={json.dumps(cfg.chat_template_kwargs)}" if cfg.chat_template_kwargs else "",
             f"extra_body={json.dumps(cfg.extra_body)}" if cfg.extra_body else ""]
    return " ".join(p for p in parts if p)


def write_problems(path: Path, problems: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two evals may write the same problems
    tmp.write_text("".join(json.dumps(p, sort_keys=True, ensure_ascii=False) + "\n" for p in problems))
    tmp.replace(path)


def prompt_template(cfg: EvalsConfig, bench: Benchmark) -> str | None:
    chosen = cfg.math_prompt_template if bench.domain == "math" else cfg.code_prompt_template
    if chosen is None:  # derived: R1's prompts, except the toy world, whose models learnt the bare problem
        chosen = "none" if bench.name == "toy" else str(TEMPLATES / f"r1_{bench.domain}.jinja")
    return None if chosen == "none" else chosen


def max_tokens_for_run(cfg: EvalsConfig, bench: Benchmark) -> int:
    derived = max_tokens_for(bench.name)
    if cfg.max_tokens is not None and cfg.max_tokens != derived:
        log.info("%s: max_tokens %d (set; the protocol's default is %d)", bench.name, cfg.max_tokens, derived)
    return cfg.max_tokens or derived


# ----------------------------------------------------------------------------- grade-only input


def read_completions(path: str) -> list[tuple[str, dict]]:
    """(file:line, row) of a completions JSONL, each row checked for its fields and their types."""
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg})") from None
            rows.append((where, _checked_completion(where, row)))
    if not rows:
        raise InputError(f"completions: {path} has no rows")
    return rows


def _checked_completion(where: str, row) -> dict:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object")
    for name in ("benchmark", "problem_id", "completion"):
        if not isinstance(row.get(name), str) and not (name == "problem_id" and _is_int(row.get(name))):
            raise InputError(f"{where}: field {name!r} must be a string")
    if row.get("finish_reason") is not None and not isinstance(row["finish_reason"], str):
        raise InputError(f"{where}: field 'finish_reason' must be absent, null or a string")
    for name in ("sample_index", "completion_tokens"):  # JSON true is not 1 here, nor is -5 an index
        if row.get(name) is not None and not (_is_int(row[name]) and row[name] >= 0):
            raise InputError(f"{where}: field {name!r} must be absent, null or a non-negative integer, got "
                             f"{json.dumps(row[name])}")
    return row


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def benchmark_names(cfg: EvalsConfig, rows: list) -> list[str]:
    """The configured benchmarks; default: the public ones, or in grade-only mode those in the file."""
    if cfg.benchmarks or not rows:
        return cfg.benchmarks or list(PUBLIC_BENCHMARKS)
    known = (*PUBLIC_BENCHMARKS, *cfg.custom_benchmarks)
    for where, row in rows:
        if row["benchmark"] not in known:
            raise InputError(f"{where}: unknown benchmark {row['benchmark']!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(row["benchmark"] for _, row in rows))


def match_completions(cfg: EvalsConfig, rows: list, benches: dict[str, Benchmark]) -> dict[str, list[dict]]:
    """Samples per benchmark; unknown benchmarks or ids and repeated samples are errors naming the line.
    With `limit`, problems past the first N are left out (and counted in the log)."""
    known = {name: {p["id"] for p in b.problems} for name, b in benches.items()}
    kept = {name: {p["id"] for p in b.problems[:cfg.limit]} for name, b in benches.items()}
    samples, seen, next_index, skipped = {name: [] for name in benches}, {}, {}, 0
    for where, row in rows:
        name, pid = row["benchmark"], str(row["problem_id"])
        if name not in benches:
            raise InputError(f"{where}: unknown benchmark {name!r} (evaluating: {', '.join(benches)})")
        if pid not in known[name]:
            raise InputError(f"{where}: unknown problem id {pid!r} in {name}")
        index = row.get("sample_index", next_index.get((name, pid), 0))
        next_index[(name, pid)] = max(index + 1, next_index.get((name, pid), 0))
        if (name, pid, index) in seen:
            raise InputError(f"{where}: sample {index} of {name} {pid!r} again (first at {seen[(name, pid, index)]})")
        seen[(name, pid, index)] = where
        if pid not in kept[name]:
            skipped += 1
            continue
        samples[name].append({"benchmark": name, "problem_id": pid, "sample_index": index,
                              "completion": row["completion"], "finish_reason": row.get("finish_reason"),
                              "completion_tokens": row.get("completion_tokens"), "error": None})
    for name, bench in benches.items():
        covered = len({s["problem_id"] for s in samples[name]})
        if not covered:
            raise InputError(f"completions: {cfg.completions} has no completions for benchmark {name}")
        log.info("%s: %d samples for %d of %d problems", name, len(samples[name]), covered, len(bench.problems))
    if skipped:
        log.info("limit %d: left out %d completions of later problems", cfg.limit, skipped)
    return samples


# ----------------------------------------------------------------------------- grading and scoring


def grade_all(cfg: EvalsConfig, benches: dict[str, Benchmark], samples: dict[str, list[dict]]) -> None:
    """Sets correct / extracted / reason on every sample; the math workers are shared by all benchmarks."""
    workers = cfg.grader_workers or os.cpu_count() or 1
    with MathGrader(workers=workers, timeout_s=cfg.math_timeout_s) as math_grader:
        code_grader = CodeGrader(workers=workers)
        for name, bench in benches.items():
            start = time.monotonic()
            grade(bench, samples[name], math_grader if bench.domain == "math" else code_grader)
            right = sum(s["correct"] for s in samples[name])
            log.info("%s: graded %d samples in %.1fs (%d correct)", name, len(samples[name]),
                     time.monotonic() - start, right)


def grade(bench: Benchmark, samples: list[dict], grader: MathGrader | CodeGrader) -> None:
    problems = {p["id"]: p for p in bench.problems}
    for s in samples:
        if s["error"] is not None:
            s.update(correct=False, extracted=None, category="error", reason="generation_error")
    todo = [s for s in samples if s["error"] is None]
    if bench.domain == "math":
        items = [(problems[s["problem_id"]]["answer"], s["completion"]) for s in todo]
    else:
        items = [(problems[s["problem_id"]]["tests"], s["completion"], problems[s["problem_id"]]["prompt"])
                 for s in todo]
    for s, v in zip(todo, grade_logged(grader.grade, items, bench.name), strict=True):
        s.update(correct=v.correct, extracted=v.extracted, category=v.category, reason=v.detail)


def score_benchmark(cfg: EvalsConfig, bench: Benchmark, samples: list[dict], generation: str) -> dict:
    levels = {p["id"]: level_of(p) for p in bench.problems}
    try:
        metrics = score(samples, bench.domain, levels)
    except ValueError as e:  # only completions files can give problems different sample counts
        raise InputError(f"completions: {cfg.completions}: {bench.name}: {e}") from None
    return metrics | {"protocol": protocol(cfg, bench, generation)}


def protocol(cfg: EvalsConfig, bench: Benchmark, generation: str) -> dict:
    """How the numbers were made, stored next to them (`generation`: generation_protocol's description)."""
    template = prompt_template(cfg, bench)
    return {
        "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens or max_tokens_for(bench.name),
        "seed": cfg.seed, "prompt_template": _describe(template),
        "grader": GRADER_VERSION if bench.domain == "math" else CODE_GRADER_VERSION,
        **({"sandbox": isolation().describe()} if bench.domain == "code" else {}),
        "data": bench.source + (f", first {cfg.limit} problems" if cfg.limit else ""),
        "generation": generation, "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _describe(template: str | None) -> str:
    if template is None:
        return "none (the problem as written)"
    path = Path(template).resolve()
    name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    return f"{name} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:12]})"


def log_summary(model: str, scores: dict[str, dict], out: Path) -> None:
    for name, m in scores.items():
        maj = f", maj@{m['k']} {100 * m['maj@k']:.1f}" if "maj@k" in m else ""
        log.info("%s %s: pass@1 %.1f ± %.1f%s, pass@%d %.1f (%d problems x %d)", model, name, 100 * m["pass@1"],
                 100 * m["stderr"], maj, m["k"], 100 * m["pass@k"], m["num_problems"], m["n"])
    log.info("wrote %s, %s and samples/%s/", out / "scores.json", out / "report.md", model)
