"""FilterConfig: the one flat config of the filter stage, read from YAML and overridable by flags.

    python -m filter --config recipes/<x>/filter.yaml [--field value ...]
"""

from dataclasses import asdict, dataclass
from pathlib import Path

from data.config import ConfigError, at_least, documented, json_dict, save_config
from data.config import parse_config as parse
from evals.config import PUBLIC_BENCHMARKS

DEFAULT_DB = "curation.duckdb"  # in the run directory, unless `db` says otherwise

SELECT_BY = ("shortest", "most_confident")
REASONING_FORMATS = ("think_tags", "field")



def is_url(path: str) -> bool:
    return "://" in path


@dataclass
class FilterConfig:
    # --- where ----------------------------------------------------------------------------------------
    run_dir: str | None = documented(
        "Run directory with traces/ (and logprobs/): a local path or an object-store URL (s3://, gs://, read "
        "through DuckDB's httpfs).", default=None)
    db: str | None = documented("The curation database. Default: <run_dir>/curation.duckdb (required when run_dir "
                           "is a URL: the database is always a local file).", default=None)
    output_dir: str | None = documented("Where the curated dataset goes. Default: <run_dir>/curated (a local path "
                                   "is required when run_dir is a URL).", default=None)
    # --- problems (default: those tracegen kept in <run_dir>/problems/) --------------------------------
    problems: str | None = documented(
        "Problem source (JSONL, Parquet, dataset folder or hub name) holding the gold answers and tests, read "
        "with the settings below as tracegen reads it. Default: the problems tracegen kept in <run_dir>/problems/ "
        "(required when run_dir is a URL).", default=None)
    problems_split: str | None = documented("Split of a Hugging Face dataset (default train).", default=None)
    problems_config: str | None = documented("Config (subset) of a Hugging Face dataset.", default=None)
    problems_revision: str | None = documented("Pinned revision of a hub dataset.", default=None)
    column_map: dict | str | None = documented("Problem field -> source column (as in tracegen).", default=None)
    problem_defaults: dict | str | None = documented("Values for Problem fields the source lacks.", default=None)
    answer_format: str = documented("plain, gsm8k or boxed: where the gold answer is (as in tracegen).", default="plain")
    id_prefix: str = documented("Prepended to every problem id (as in tracegen).", default="")
    # --- labels ---------------------------------------------------------------------------------------
    workers: int | None = documented("Grader processes/threads (math and code). Default: the CPU count.", default=None)
    math_timeout_s: float = documented("Seconds one math answer check may take (then: verdict timeout).", default=5.0)
    repetition_ngram: int = documented(
        "n of the word n-grams behind `quality.repetition` (share of a trace's n-grams that repeat an earlier "
        "one). 8 words: ordinary restating stays low, a looping trace goes to ~1.", default=8)
    relabel: bool = documented("Drop every label table and label all traces again (after changing a label "
                          "setting such as repetition_ngram or the problems). Default: label only new traces.",
                          default=False)
    dedup_threshold: float = documented("Estimated Jaccard similarity at which two problems are near-duplicates.",
                                   default=0.8)
    dedup_num_perm: int = documented("MinHash permutations for near-duplicate problems.", default=128)
    dedup_shingle: int = documented("Word shingle size for near-duplicate problems.", default=5)
    contamination_benchmarks: list[str] | None = documented(
        f"Benchmarks whose problems must not be trained on (word n-gram overlap). Default: {', '.join(PUBLIC_BENCHMARKS)}"
        "; [] turns the check off (on the command line too: --contamination_benchmarks '[]'). Names as in evals: "
        "those, toy, or name=path for a Problem file.", default=None)
    benchmarks_dir: str | None = documented(
        "Local copies of the benchmarks (evals' data_dir layout, e.g. ../shared/benchmarks). Default: the "
        "pinned Hugging Face hub datasets.", default=None)
    contamination_ngram: int = documented("Word n-gram size of the contamination check.", default=8)
    # --- rules (thresholds become DuckDB variables: getvariable('<field>') in the rule files) ----------
    rules_dir: list[str] | None = documented(
        "Folders of extra rule files (NNN_<reason>.sql, each a SELECT of the trace_ids to reject), run with "
        "filter/rules/ in file-name order; a file named like a default rule replaces it.", default=None)
    disable_rules: list[str] | None = documented("Reasons of rules not to run, e.g. [language_mixing].", default=None)
    views_dir: list[str] | None = documented(
        "Folders (or .sql files) of the recipe's own views, run after labeling and before the rules, so rules "
        "and queries can use them.", default=None)
    drop_unverifiable: bool = documented("Also reject traces that cannot be verified (no gold answer / no tests).",
                                    default=False)
    max_repetition: float | None = documented("Reject traces whose repetition is above this (null: off).", default=0.5)
    max_language_mixing: float | None = documented(
        "Reject traces with more than this share of letters in scripts other than the prompt's (Latin and Greek "
        "always count as the prompt's: formulas and code use them). null: off.", default=0.02)
    min_mean_logprob: float | None = documented(
        "Reject traces whose mean sampled-token logprob is below this (only traces with logprobs; null: off).",
        default=-1.5)
    min_token_logprob: float | None = documented(
        "Reject traces with a sampled token below this logprob (null: off).", default=None)
    max_mean_entropy: float | None = documented(
        "Reject traces whose mean top-k entropy (nats) is above this (null: off).", default=None)
    # --- selection (after the rules) ------------------------------------------------------------------
    max_per_problem: int | None = documented("Keep at most k traces per problem (null: all).", default=None)
    select_by: str = documented("Which k: shortest (fewest completion tokens) or most_confident (highest mean "
                           "logprob).", default="shortest")
    balance_difficulty: bool = documented(
        "Equal counts per difficulty (meta.difficulty; null is its own level): as many as the smallest level "
        "has, or max_per_difficulty.", default=False)
    max_per_difficulty: int | None = documented("Cap of traces per difficulty level (implies balancing).",
                                           default=None)
    token_budget: int | None = documented("Keep traces (in seeded random order) while the total completion tokens "
                                     "fit this budget.", default=None)
    seed: int = documented("Seed of every random choice in the selection.", default=0)
    # --- export ---------------------------------------------------------------------------------------
    reasoning_format: str = documented(
        "think_tags: the assistant content is '<think>\\n{reasoning}\\n</think>\\n\\n{answer}' (any chat "
        "template); field: content is the answer and `reasoning_content` the reasoning.", default="think_tags")
    rows_per_file: int = documented("Rows per exported Parquet file.", default=100_000)

    def __post_init__(self):
        for name in ("column_map", "problem_defaults"):
            setattr(self, name, json_dict(name, getattr(self, name)))
        if not self.run_dir:
            raise ConfigError("run_dir: required (the tracegen output_dir, e.g. runs/<name>)")
        self.run_dir = self.run_dir.rstrip("/")
        if not is_url(self.run_dir) and not Path(self.run_dir).is_dir():
            raise ConfigError(f"run_dir: {self.run_dir}: no such directory")
        if is_url(self.run_dir) and not (self.db and self.output_dir):
            raise ConfigError("db / output_dir: required when run_dir is a URL (both are local paths)")
        self.db = self.db or f"{self.run_dir}/{DEFAULT_DB}"
        self.output_dir = (self.output_dir or f"{self.run_dir}/curated").rstrip("/")
        if self.contamination_benchmarks is None:
            self.contamination_benchmarks = list(PUBLIC_BENCHMARKS)
        for spec in self.contamination_benchmarks:
            name, is_file, path = spec.partition("=")
            if not is_file and name not in (*PUBLIC_BENCHMARKS, "toy"):
                raise ConfigError(f"contamination_benchmarks: unknown benchmark {spec!r}; known: "
                                  f"{', '.join(PUBLIC_BENCHMARKS)}, toy, or name=path (a Problem file)")
            if is_file and path and not Path(path).is_file():
                raise ConfigError(f"contamination_benchmarks: {spec!r}: no such file: {path}")
        for name, choices in (("select_by", SELECT_BY), ("reasoning_format", REASONING_FORMATS),
                              ("answer_format", ("plain", "gsm8k", "boxed"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(choices)}")
        at_least(self, 1, "repetition_ngram", "dedup_num_perm", "dedup_shingle", "contamination_ngram",
                 "rows_per_file", "max_per_problem", "max_per_difficulty", "token_budget", "workers")
        if not 0 < self.dedup_threshold <= 1:
            raise ConfigError(f"dedup_threshold: {self.dedup_threshold} is not within (0, 1]")
        if self.math_timeout_s <= 0:
            raise ConfigError(f"math_timeout_s: must be > 0, got {self.math_timeout_s}")
        for name in ("rules_dir", "views_dir"):
            for path in getattr(self, name) or []:
                if not Path(path).exists():
                    raise ConfigError(f"{name}: no such folder or file: {path}")

    @property
    def thresholds(self) -> dict:
        """The values rule files read with getvariable('<name>')."""
        names = ("drop_unverifiable", "max_repetition", "max_language_mixing", "min_mean_logprob",
                 "min_token_logprob", "max_mean_entropy")
        return {name: getattr(self, name) for name in names}

    def save(self, path: Path) -> None:
        save_config(path, asdict(self))


def parse_config(argv: list[str] | None = None) -> FilterConfig:
    """--config file.yaml plus --field value overrides (data/config.py); unknown keys and abbreviations are errors."""
    (cfg,) = parse([FilterConfig], argv, "python -m filter")
    return cfg
