"""Benchmarks as Problem records (data/README.md): from the Hugging Face hub (pinned) or local files.

    from evals.benchmarks import load_benchmark
    bench = load_benchmark("math500", data_dir="../shared/benchmarks")   # None: the hub
    bench.problems[0]["id"], bench.problems[0]["answer"], bench.domain, bench.source

Local files follow ../shared/benchmarks/MANIFEST.md: <data_dir>/gsm8k/test.jsonl, math500/test.jsonl,
aime24/test.jsonl, amc23/test.jsonl, humaneval/HumanEval.jsonl.gz, humanevalplus/HumanEvalPlus.jsonl.gz,
mbppplus/MbppPlus.jsonl.gz. Ids are the dataset's own (MATH-500 `unique_id`, HumanEval/MBPP `task_id`,
AIME/AMC `id`), else the 0-based line number. Math problems carry a gold `answer`; code problems carry
`tests` in a kind the code grader runs (`functional` for HumanEval, `evalplus` for HumanEval+/MBPP+).
Custom benchmarks (and `toy`) are Problem-record files, validated by tracegen's loader.
"""

import gzip
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from data.config import InputError
from evals.code_grader import evalplus_tests
from tracegen.problems import load_problems

log = logging.getLogger(__name__)

# Hub sources, pinned. HF's evalplus datasets lack the raw base/plus inputs the grader needs, so HumanEval+
# and MBPP+ come from the evalplus release files (the ones the evalplus package downloads), by version.
GSM8K_REVISION = "e53f048856ff4f594e959d75785d2c2d37b678ee"
MATH500_REVISION = "ff5b20257d8185524591543f8ff5993951537bb8"
AIME24_REVISION = "2fe88a2f1091d5048c0f36abc874fb997b3dd99a"
AMC23_REVISION = None  # not verified offline: pin the commit you used (the loader warns while it is None)
HUMANEVAL_REVISION = "7dce6050a7d6d172f3cc5c32aa97f52fa1a2e544"
HUMANEVALPLUS_URL = "https://github.com/evalplus/humanevalplus_release/releases/download/v0.1.10/HumanEvalPlus.jsonl.gz"
MBPPPLUS_URL = "https://github.com/evalplus/mbppplus_release/releases/download/v0.2.0/MbppPlus.jsonl.gz"

# name -> (domain, local file under data_dir, hub source (path, config, split, revision) or a release URL)
PUBLIC = {
    "gsm8k": ("math", "gsm8k/test.jsonl", ("openai/gsm8k", "main", "test", GSM8K_REVISION)),
    "math500": ("math", "math500/test.jsonl", ("HuggingFaceH4/MATH-500", None, "test", MATH500_REVISION)),
    "aime24": ("math", "aime24/test.jsonl", ("HuggingFaceH4/aime_2024", None, "train", AIME24_REVISION)),
    "amc23": ("math", "amc23/test.jsonl", ("math-ai/amc23", None, "test", AMC23_REVISION)),
    "humaneval": ("code", "humaneval/HumanEval.jsonl.gz",
                  ("openai/openai_humaneval", None, "test", HUMANEVAL_REVISION)),
    "humanevalplus": ("code", "humanevalplus/HumanEvalPlus.jsonl.gz", HUMANEVALPLUS_URL),
    "mbppplus": ("code", "mbppplus/MbppPlus.jsonl.gz", MBPPPLUS_URL),
}
DEFAULT_MAX_TOKENS = {"toy": 512}  # everything else: R1's 32768 (its models were trained on the problem text)
R1_MAX_TOKENS = 32768


@dataclass
class Benchmark:
    name: str
    domain: str  # "math" | "code"
    problems: list[dict]
    source: str  # where the problems came from, for the protocol (hub name@revision, or path + sha256)


def load_benchmark(name: str, data_dir: str | None = None, custom: dict | None = None,
                   limit: int | None = None) -> Benchmark:
    """One benchmark's problems (the first `limit`), validated: ids unique, golds or tests present."""
    if name in PUBLIC:
        domain, rows, source = _public_rows(name, data_dir)
        problems = [_to_problem(name, index, where, row) for index, (where, row) in enumerate(rows)]
    else:
        problems, source = _custom_problems(name, (custom or {})[name])
        domain = _one_domain(name, problems)
    _check(name, domain, problems)
    return Benchmark(name, domain, problems[:limit], source)


def benchmark_source(name: str, data_dir: str | None = None, custom: dict | None = None) -> str | None:
    """What `load_benchmark` records as the benchmark's source (a local file with its sha256, a pinned hub
    revision, a versioned release URL) without parsing the data; None when only loading can tell (a hub set
    without a pinned revision). Caches of data derived from a benchmark key on it."""
    if name not in PUBLIC:
        path = _custom_path(name, (custom or {})[name])
        return f"{path} (sha256 {_sha256(path)})"
    _, rel, hub = PUBLIC[name]
    if data_dir is not None:
        path = _local_path(data_dir, rel)
        return f"{path} (sha256 {_sha256(path)})"
    if isinstance(hub, str):
        return hub
    return f"{hub[0]}@{hub[3]}" if hub[3] else None


def max_tokens_for(name: str) -> int:
    return DEFAULT_MAX_TOKENS.get(name, R1_MAX_TOKENS)


# ----------------------------------------------------------------------------- reading


def _public_rows(name: str, data_dir: str | None):
    domain, rel, hub = PUBLIC[name]
    if data_dir is None:
        return domain, _hub_rows(name, hub), benchmark_source(name) or f"{hub[0]}@main"
    return domain, list(_read_jsonl(_local_path(data_dir, rel))), benchmark_source(name, data_dir)


def _local_path(data_dir: str, rel: str) -> Path:
    path = Path(data_dir) / rel
    if not path.is_file():
        raise InputError(f"data_dir: {path}: no such file (layout: <data_dir>/{rel})")
    return path


def _read_jsonl(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
                if line.strip():
                    try:
                        yield f"{path}:{lineno}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    except (gzip.BadGzipFile, EOFError) as e:  # a gzip file cut short or not gzip at all
        raise InputError(f"{path}: not a readable gzip file ({e})") from None


def _hub_rows(name: str, hub) -> list[tuple[str, dict]]:
    """The real loading code for users with hub access (tests have none and use local files)."""
    import datasets

    try:
        if isinstance(hub, str):  # an evalplus release file, pinned by the version in its URL
            ds = datasets.load_dataset("json", data_files=hub, split="train")
        else:
            path, config, split, revision = hub
            if revision is None:
                log.warning("%s: no pinned revision; loading %s at main (pin it in evals/benchmarks.py)", name, path)
            ds = datasets.load_dataset(path, config, split=split, revision=revision)
    except Exception as e:  # the datasets library raises many types; all mean "cannot load this source"
        raise InputError(f"{name}: cannot load {hub} from the Hugging Face hub ({e}); set data_dir to local "
                         "copies") from None
    return [(f"{name} row {i}", dict(row)) for i, row in enumerate(ds)]


def _custom_problems(name: str, path: str) -> tuple[list[dict], str]:
    _custom_path(name, path)
    return load_problems(path), benchmark_source(name, custom={name: path})


def _custom_path(name: str, path: str) -> Path:
    if not Path(path).is_file():
        hint = " (build it: python -m data.toyworld build --out cache/toyworld)" if name == "toy" else ""
        raise InputError(f"custom_benchmarks: {name}: {path}: no such file{hint}")
    if Path(path).suffix not in (".jsonl", ".json", ".parquet"):
        raise InputError(f"custom_benchmarks: {name}: {path} is not a .jsonl or .parquet Problem file")
    return Path(path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- rows -> Problems


def _to_problem(name: str, index: int, where: str, row: dict) -> dict:
    try:
        return _CONVERT[name](index, row)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{where}: not a {name} row ({type(e).__name__}: {e})") from None


def _problem(pid, domain, prompt, source, answer=None, tests=None, meta=None) -> dict:
    return {"id": str(pid), "domain": domain, "prompt": prompt, "answer": answer, "tests": tests,
            "source": source, "meta": meta or {}}


def _gsm8k(index: int, row: dict) -> dict:
    solution = row["answer"]
    if "####" not in solution:
        raise ValueError("the answer has no '#### <number>' line")
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")  # "1,450,000" -> "1450000"
    return _problem(index, "math", row["question"], "gsm8k", gold, meta={"solution": solution})


def _math500(index: int, row: dict) -> dict:
    meta = {"level": int(row["level"]), "subject": row["subject"], "solution": row["solution"]}
    return _problem(row["unique_id"], "math", row["problem"], "math500", row["answer"], meta=meta)


def _aime24(index: int, row: dict) -> dict:
    meta = {"solution": row.get("solution"), "url": row.get("url")}
    return _problem(row["id"], "math", row["problem"], "aime24", str(int(row["answer"])), meta=meta)  # "025" -> "25"


def _amc23(index: int, row: dict) -> dict:
    answer = float(row["answer"])
    gold = str(int(answer)) if answer.is_integer() else repr(answer)  # 27.0 -> "27"
    prompt = row.get("problem") or row["question"]  # the hub copy names it `question`
    return _problem(row["id"], "math", prompt, "amc23", gold, meta={"url": row.get("url")})


def _humaneval(index: int, row: dict) -> dict:
    tests = {"kind": "functional", "test": row["test"], "entry_point": row["entry_point"], "prompt": row["prompt"]}
    return _problem(row["task_id"], "code", row["prompt"], "humaneval", tests=tests,
                    meta={"canonical_solution": row["canonical_solution"]})


def _evalplus(source: str):
    def convert(index: int, row: dict) -> dict:
        return _problem(row["task_id"], "code", row["prompt"], source, tests=evalplus_tests(row),
                        meta={"canonical_solution": row["canonical_solution"]})
    return convert


_CONVERT = {"gsm8k": _gsm8k, "math500": _math500, "aime24": _aime24, "amc23": _amc23, "humaneval": _humaneval,
            "humanevalplus": _evalplus("humanevalplus"), "mbppplus": _evalplus("mbppplus")}


def _one_domain(name: str, problems: list[dict]) -> str:
    domains = sorted({p["domain"] for p in problems})
    if len(domains) != 1:  # one prompt template and one grader per benchmark
        raise InputError(f"custom_benchmarks: {name} mixes domains {domains}; split it into one file per domain")
    return domains[0]


def _check(name: str, domain: str, problems: list[dict]) -> None:
    ids = [p["id"] for p in problems]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{name}: duplicate problem id {duplicate!r}")
    for p in problems:
        if domain == "math" and not (p.get("answer") or "").strip():
            raise InputError(f"{name}: problem {p['id']!r} has no gold answer: it cannot be scored")
        if domain == "code" and not p.get("tests"):
            raise InputError(f"{name}: problem {p['id']!r} has no tests: it cannot be scored")



def level_of(problem: dict) -> str | None:
    """The difficulty level for the by-level breakdown: MATH-500 `level`, toy `difficulty`, else None."""
    meta = problem.get("meta") or {}
    level = meta.get("level", meta.get("difficulty"))
    return None if level is None else str(level)
