"""Load and validate Problem records (schema: data/README.md), and render them into chat messages.

Every problem is checked before any request is sent: a bad line, a missing field or a duplicate id
stops the run with the file, the line and what is wrong.

    from tracegen.problems import load_problems
    problems = load_problems("gsm8k.parquet", column_map={"id": "@row", "prompt": "question"},
                             problem_defaults={"domain": "math"}, answer_format="gsm8k")
"""

import json
import re
from pathlib import Path

import jinja2

from data.config import ConfigError, InputError

REQUIRED = ("id", "domain", "prompt")
FIELDS = ("id", "domain", "prompt", "answer", "tests", "source", "meta")
DOMAINS = ("math", "code")
ANSWER_FORMATS = ("plain", "gsm8k", "boxed")
TEST_KINDS = ("functional", "evalplus", "stdio")  # data/README.md, Code tests


def load_problems(problems: str, problems_split: str = "train", problems_config: str | None = None,
                  problems_revision: str | None = None, column_map: dict | None = None,
                  problem_defaults: dict | None = None, answer_format: str = "plain", id_prefix: str = "") -> list[dict]:
    """All problems of a JSONL or Parquet file, a dataset folder or a hub dataset, validated, in source order.
    The arguments are TracegenConfig's fields of the same names (`TracegenConfig.problem_source()`)."""
    path = Path(problems)
    if path.suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
    else:  # a dataset folder or a hub name such as openai/gsm8k
        rows = _read_hf(problems, problems_split, problems_config, problems_revision)
    valid = validate(rows, column_map or {}, problem_defaults or {}, answer_format)
    return [{**p, "id": id_prefix + p["id"]} for p in valid] if id_prefix else valid


def _read_jsonl(path: Path):
    if not path.is_file():
        raise InputError(f"problems: {path}: no such file")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{lineno}", row


def _read_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise InputError(f"problems: {path}: no such file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}: row {i}", row


def _read_hf(name: str, split: str, config: str | None, revision: str | None):
    """A Hugging Face dataset: a hub name (pinned with problems_revision) or a local dataset folder."""
    import datasets

    where = f"{name} [{split}]"
    try:
        if Path(name, "dataset_info.json").exists():
            ds = datasets.load_from_disk(name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as e:  # the datasets library raises many types; all mean "cannot load this source"
        raise InputError(f"problems: cannot load dataset {where}: {e}") from None
    for i, row in enumerate(ds):
        yield f"{where}: row {i}", row


def validate(rows, column_map: dict, defaults: dict, answer_format: str = "plain") -> list[dict]:
    if answer_format not in ANSWER_FORMATS:
        raise ConfigError(f"answer_format: {answer_format!r} is not one of {ANSWER_FORMATS}")
    unknown = set(column_map) - set(FIELDS)
    if unknown:
        raise ConfigError(f"column_map: unknown Problem fields {sorted(unknown)}; fields are {FIELDS}")
    problems, seen = [], {}
    for index, (where, row) in enumerate(rows):
        problem = _to_problem(where, index, row, column_map, defaults)
        if answer_format != "plain" and problem["answer"] is not None:
            problem = _with_final_answer(where, problem, answer_format)
        if problem["id"] in seen:
            raise InputError(f"{where}: duplicate id {problem['id']!r} (first at {seen[problem['id']]})")
        seen[problem["id"]] = where
        problems.append(problem)
    if not problems:
        raise InputError("problems: the source has no rows")
    return problems


def _to_problem(where: str, index: int, row: dict, column_map: dict, defaults: dict) -> dict:
    problem = {}
    for name in FIELDS:
        column = column_map.get(name, name)
        if column == "@row":
            problem[name] = str(index)
        elif column in row and row[column] is not None:
            problem[name] = row[column]
        else:
            problem[name] = defaults.get(name)
    for name in REQUIRED:
        if problem[name] in (None, ""):
            column = column_map.get(name, name)
            raise InputError(f"{where}: missing field {column!r} (Problem.{name})")
    if isinstance(problem["id"], int):
        problem["id"] = str(problem["id"])
    for name in ("id", "prompt"):
        if not isinstance(problem[name], str):
            raise InputError(f"{where}: {name} must be a string, got {type(problem[name]).__name__}")
    if problem["domain"] not in DOMAINS:
        raise InputError(f"{where}: domain {problem['domain']!r} is not one of {DOMAINS}")
    if problem["answer"] is not None:
        problem["answer"] = str(problem["answer"])
    for name in ("tests", "meta"):
        if isinstance(problem[name], str):
            try:
                problem[name] = json.loads(problem[name])
            except json.JSONDecodeError:
                raise InputError(f"{where}: {name} is a string but not JSON") from None
    if problem["domain"] == "code" and problem["tests"] is not None and (wrong := tests_error(problem["tests"])):
        raise InputError(f"{where}: tests: {wrong}")
    return problem


def tests_error(tests) -> str | None:
    """What keeps a code problem's tests from running (data/README.md, Code tests), or None. Without this check
    such a problem grades every sample wrong, and nobody is told."""
    if not isinstance(tests, dict):
        return f"must be a JSON object with a kind ({', '.join(TEST_KINDS)}), got {type(tests).__name__}"
    kind = tests.get("kind")
    if kind == "functional":
        if not isinstance(tests.get("test"), str) or not tests["test"].strip():
            return "kind functional needs `test`: the Python code that tests the candidate"
        if re.search(r"^def check\(", tests["test"], re.MULTILINE) and not isinstance(tests.get("entry_point"), str):
            return "kind functional: `test` defines check(candidate), so `entry_point` (the function it tests) is needed"
    elif kind == "stdio":
        cases = tests.get("cases")
        if not isinstance(cases, list) or not cases or not all(
                isinstance(c, dict) and isinstance(c.get("input"), str) and isinstance(c.get("output"), str)
                for c in cases):
            return "kind stdio needs `cases`: a non-empty list of {input, output} strings"
    elif kind == "evalplus":
        missing = [f for f in ("entry_point", "canonical_solution", "base_input", "plus_input") if f not in tests]
        if missing:
            return f"kind evalplus needs {', '.join(missing)} (the HumanEval+/MBPP+ release row's fields)"
    else:
        return f"kind {kind!r} is not one of {', '.join(TEST_KINDS)}"
    return None


def _with_final_answer(where: str, problem: dict, answer_format: str) -> dict:
    """The gold final answer out of a worked solution; the solution itself moves to meta.solution."""
    solution = problem["answer"]
    if answer_format == "gsm8k":
        answer = solution.rsplit("####", 1)[1].strip().replace(",", "") if "####" in solution else None
    else:
        answer = last_boxed(solution)
    if not answer:
        wanted = '"#### <answer>" line' if answer_format == "gsm8k" else "\\boxed{...}"
        raise InputError(f"{where}: answer_format {answer_format}: the answer has no {wanted}: {solution[-80:]!r}")
    meta = problem["meta"] if isinstance(problem["meta"], dict) else {}
    return {**problem, "answer": answer, "meta": {"solution": solution, **meta}}


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in text (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i].strip()
    return None


def shard_of(problems: list[dict], shard: tuple[int, int]) -> list[dict]:
    """Deterministic split by a hash of the problem id: stable when the source is reordered or grows."""
    import zlib

    i, count = shard
    return [p for p in problems if zlib.crc32(p["id"].encode()) % count == i]


def make_renderer(prompt_template: str | None, system_prompt: str | None):
    """problem -> messages, from a Jinja user template and an optional system prompt file."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    user = _template(env, prompt_template, "prompt_template") if prompt_template else None
    system = _template(env, system_prompt, "system_prompt") if system_prompt else None

    def render(problem: dict) -> list[dict]:
        try:
            messages = [{"role": "system", "content": system.render(**problem).strip()}] if system else []
            text = user.render(**problem).strip() if user else problem["prompt"]
        except jinja2.TemplateError as e:
            raise ConfigError(f"prompt_template: {e} (problem {problem['id']})") from None
        return [*messages, {"role": "user", "content": text}]

    return render


def _template(env, path: str, name: str):
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{name}: no such file: {path}")
    try:
        return env.from_string(file.read_text(encoding="utf-8"))
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"{path}:{e.lineno}: {e.message}") from None
