"""python -m evals --config recipes/<x>/evals.yaml [--field value ...]
python -m evals --config recipes/<x>/evals.yaml --completions generations.jsonl   # grade only, no model

Scores a model on math and code benchmarks with DeepSeek-R1's protocol: n samples per problem at
temperature 0.6 / top_p 0.95, pass@1 as their mean, unbiased pass@k and maj@k (k = n). Generation goes
through tracegen (any engine it has), one run per benchmark into <output_dir>/generations/<model>/<benchmark>/,
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
import shlex
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

import yaml

from evals.benchmarks import Benchmark, InputError, level_of, load_benchmark, max_tokens_for
from evals.code_grader import CODE_GRADER_VERSION, CodeGrader, extract_code
from evals.config import PUBLIC_BENCHMARKS, ConfigError, EvalsConfig, parse_config
from evals.efficiency import measure_efficiency
from evals.math_grader import GRADER_VERSION, MathGrader
from evals.metrics import score
from evals.report import publish, write_samples
from tracegen.config import TracegenConfig
from tracegen.main import main as tracegen_main
from tracegen.problems import ProblemError, make_renderer
from tracegen.server import ServerError, managed_vllm_server
from tracegen.store import read_traces

log = logging.getLogger("evals")
REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "evals" / "templates"
SERVE_TIMEOUT_S = TracegenConfig.serve_timeout_s  # tracegen's default wait for a managed server
GRADE_CHUNK = 256  # samples per grading call: one progress line each


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        log.info("resolved config:\n%s", yaml.safe_dump(asdict(cfg), sort_keys=False).rstrip())
        out = Path(cfg.output_dir)
        # --- load: every benchmark (and the completions file) is validated before any generation ---------
        rows = read_completions(cfg.completions) if cfg.grade_only else []
        names = benchmark_names(cfg, rows)
        benches = {name: load_benchmark(name, cfg.data_dir, cfg.custom_benchmarks) for name in names}
        cfg.save(out / "evals.config.yaml")
        # --- generate with tracegen, or take the completions ----------------------------------------------
        if cfg.grade_only:
            log.info("grade-only: %d completions from %s; no model is called", len(rows), cfg.completions)
            samples = match_completions(cfg, rows, benches)
        else:
            benches = {name: replace(b, problems=b.problems[:cfg.limit]) for name, b in benches.items()}
            with shared_server(cfg, len(benches)) as gen_cfg:
                samples = {name: generate(gen_cfg, bench) for name, bench in benches.items()}
                efficiency = measure(gen_cfg, benches, cfg.serve_model) if cfg.measures_efficiency else {}
        # --- grade ----------------------------------------------------------------------------------------
        grade_all(cfg, benches, samples)
        # --- score ----------------------------------------------------------------------------------------
        scores = {name: score_benchmark(cfg, benches[name], samples[name]) for name in benches}
        for name, record in ({} if cfg.grade_only else efficiency).items():
            scores[name]["efficiency"] = record
    except (ConfigError, InputError, ProblemError, OSError) as e:
        log.error("%s", e)
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
def shared_server(cfg: EvalsConfig, n_benchmarks: int):
    """With serve_model and several benchmarks, one managed vLLM server for all of them (a start costs minutes
    for a big model); tracegen then talks to it as a base_url. Request keys are unchanged (same served name,
    endpoint "local"), so runs made either way resume each other."""
    if cfg.engine != "http" or not cfg.serve_model or (n_benchmarks < 2 and not cfg.measures_efficiency):
        yield cfg
        return
    name = cfg.model or Path(cfg.serve_model).name
    log_path = Path(cfg.output_dir) / "logs" / f"vllm-server-{cfg.model_name}.log"
    try:
        with managed_vllm_server(cfg.serve_model, name, cfg.serve_args or [], log_path, SERVE_TIMEOUT_S) as url:
            yield replace(cfg, serve_model=None, serve_args=None, model=name, base_url=[url])
    except ServerError as e:
        raise ConfigError(f"serve_model: {e}") from None



def measure(cfg: EvalsConfig, benches: dict[str, Benchmark], serve_model: str | None) -> dict[str, dict]:
    """Latency, throughput and memory per benchmark (evals/efficiency.py), on the engine that generated."""
    prompts = {name: [make_renderer(prompt_template(cfg, b), None)(p) for p in b.problems[:cfg.efficiency_prompts]]
               for name, b in benches.items()}
    try:
        return measure_efficiency(cfg, prompts, serve_model)
    except Exception as e:  # broad on purpose: a failed measurement must not lose the samples already paid for
        log.error("efficiency: measurement failed (%s: %s); scores are kept without it", type(e).__name__, e)
        return {name: {"error": f"{type(e).__name__}: {e}"} for name in benches}


def generate(cfg: EvalsConfig, bench: Benchmark) -> list[dict]:
    """n samples of every problem through tracegen, read back from its traces (resumes what is done)."""
    problems = Path(cfg.output_dir) / "generations" / bench.name / "problems.jsonl"
    write_problems(problems, bench.problems)
    run_dir = Path(cfg.output_dir) / "generations" / cfg.model_name / bench.name
    template, max_tokens = prompt_template(cfg, bench), max_tokens_for_run(cfg, bench)
    log.info("%s: %d problems x %d samples (max_tokens %d, template %s) with tracegen into %s",
             bench.name, len(bench.problems), cfg.n, max_tokens, template or "none", run_dir)
    code = tracegen_main(tracegen_argv(cfg, problems, run_dir, template, max_tokens))
    if code == 2:
        raise ConfigError(f"{bench.name}: tracegen stopped before generating (its error is logged above)")
    return read_generations(cfg, bench, run_dir, template, max_tokens)


def tracegen_argv(cfg: EvalsConfig, problems: Path, run_dir: Path, template: str | None, max_tokens: int) -> list:
    as_json = lambda d: json.dumps(d) if d else None  # noqa: E731
    flags = {
        "problems": problems, "output_dir": run_dir, "prompt_template": template, "n": cfg.n,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": max_tokens, "seed": cfg.seed,
        "chat_template_kwargs": as_json(cfg.chat_template_kwargs), "engine": cfg.engine,
        "serve_model": cfg.serve_model, "serve_args": shlex.join(cfg.serve_args) if cfg.serve_args else None,
        "model": cfg.model, "adapter": cfg.adapter, "engine_kwargs": as_json(cfg.engine_kwargs),
        "api_key_env": cfg.api_key_env, "concurrency": cfg.concurrency, "batch_size": cfg.batch_size,
        "samples_per_request": cfg.samples_per_request,
    }
    # --flag=value: values such as serve_args start with "--" and would otherwise read as flags
    argv = [f"--{name}={value}" for name, value in flags.items() if value is not None]
    if cfg.base_url:
        argv += ["--base_url", *cfg.base_url]
    return argv + shlex.split(cfg.tracegen_args or "")


def read_generations(cfg: EvalsConfig, bench: Benchmark, run_dir: Path, template: str | None,
                     max_tokens: int) -> list[dict]:
    """One sample per (problem, index < n): the newest finished trace made with this exact prompt and these
    sampling settings (older settings stay in the run directory); a sample without one carries its error."""
    render = make_renderer(template, None)
    messages = {p["id"]: render(p) for p in bench.problems}
    wanted = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": max_tokens, "seed": cfg.seed,
              "chat_template_kwargs": cfg.chat_template_kwargs}
    done, errors, replaced = {}, {}, 0
    for t in sorted(read_traces(run_dir).to_pylist(), key=lambda t: t["created_at"]):
        key = (t["problem_id"], t["sample_index"])
        if key[0] not in messages or key[1] >= cfg.n or json.loads(t["messages"]) != messages[key[0]]:
            continue
        sampling = json.loads(t["sampling"])
        if any(sampling.get(name) != value for name, value in wanted.items()):
            continue
        if t["error"] is not None:
            errors[key] = t["error"]
        else:
            replaced += key in done
            done[key] = t
    if replaced:
        log.warning("%s: %d samples exist from another model or endpoint in %s; using the newest (give each model "
                    "its own model_name)", bench.name, replaced, run_dir)
    return [_sample(bench.name, p["id"], i, done.get((p["id"], i)), errors.get((p["id"], i)))
            for p in bench.problems for i in range(cfg.n)]


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
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
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
    types = {"benchmark": str, "problem_id": (str, int), "completion": str, "sample_index": int,
             "finish_reason": str, "completion_tokens": int}
    for name, kind in types.items():
        required = name in ("benchmark", "problem_id", "completion")
        if (row.get(name) is None and required) or (row.get(name) is not None and not isinstance(row[name], kind)):
            raise InputError(f"{where}: field {name!r} must be {'a' if required else 'absent, null or a'} "
                             f"{'string' if kind in (str, (str, int)) else 'integer'}")
    return row


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
            s.update(correct=False, extracted=None, reason="generation_error")
    todo = [s for s in samples if s["error"] is None]
    for start in range(0, len(todo), GRADE_CHUNK):
        chunk = todo[start:start + GRADE_CHUNK]
        if bench.domain == "math":
            verdicts = grader.grade((problems[s["problem_id"]]["answer"], s["completion"]) for s in chunk)
            for s, v in zip(chunk, verdicts, strict=True):
                s.update(correct=v.correct, extracted=v.extracted, reason=v.reason)
        else:
            items = [(problems[s["problem_id"]]["tests"], s["completion"], problems[s["problem_id"]]["prompt"])
                     for s in chunk]
            for s, v in zip(chunk, grader.grade(items), strict=True):
                s.update(correct=v.correct, extracted=extract_code(s["completion"]) or None, reason=v.reason)
        if len(todo) > GRADE_CHUNK:
            log.info("%s: graded %d/%d", bench.name, min(start + GRADE_CHUNK, len(todo)), len(todo))


def score_benchmark(cfg: EvalsConfig, bench: Benchmark, samples: list[dict]) -> dict:
    levels = {p["id"]: level_of(p) for p in bench.problems}
    try:
        metrics = score(samples, bench.domain, levels)
    except ValueError as e:  # only completions files can give problems different sample counts
        raise InputError(f"completions: {cfg.completions}: {bench.name}: {e}") from None
    return metrics | {"protocol": protocol(cfg, bench)}


def protocol(cfg: EvalsConfig, bench: Benchmark) -> dict:
    """How the numbers were made, stored next to them."""
    template = prompt_template(cfg, bench)
    if cfg.grade_only:
        generation = f"completions file {cfg.completions} (sampling settings as declared in the config)"
    else:
        source = f"base_url={','.join(cfg.base_url)}" if cfg.base_url else f"serve_model={cfg.serve_model}"
        parts = [f"tracegen engine={cfg.engine}", source if cfg.engine == "http" else "",
                 f"model={cfg.model}" if cfg.model else "", f"adapter={cfg.adapter}" if cfg.adapter else "",
                 f"chat_template_kwargs={json.dumps(cfg.chat_template_kwargs)}" if cfg.chat_template_kwargs else "",
                 f"tracegen_args={cfg.tracegen_args}" if cfg.tracegen_args else ""]
        generation = " ".join(p for p in parts if p)
    return {
        "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens or max_tokens_for(bench.name),
        "seed": cfg.seed, "prompt_template": _describe(template),
        "grader": GRADER_VERSION if bench.domain == "math" else CODE_GRADER_VERSION,
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
