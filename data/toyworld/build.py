"""Build the toy world into one directory, idempotently.

    out/problems/train.jsonl, problems/test.jsonl   Problem records (data/README.md)
    out/tokenizer/                                  AutoTokenizer directory with the chat template
    out/gold/train.parquet                          the gold solutions of the train split as an SFT set, in the
                                                    curated format (data/README.md): how the toy teacher learns
    out/corpus/train.parquet                        the pretraining corpus of the student base (corpus.py), in the
                                                    curated format: stories with their operand plans, exercises, chains
    out/teacher-init/, out/student-init/            random Qwen2 models + tokenizer + generation_config.json
    out/manifest.json                               seed, sizes, sha256 of the problem files, parameter counts

Each artifact is written under a temporary name and renamed, so an existing one is complete; a rerun skips
what exists and matches, and refuses (naming the file) what exists and does not.
"""

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from data.toyworld.corpus import CORPUS_VERSION, corpus_parquet, corpus_rows
from data.toyworld.models import SIZES, build_model, count_parameters, save_model
from data.toyworld.problems import (
    DIFFICULTIES,
    GENERATOR_VERSION,
    generate_problems,
    gold_conversation,
    to_jsonl,
)
from data.toyworld.tokenizer import TOKENIZER_VERSION, corpus, save_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToyWorld:
    """Where `build` put everything."""

    root: Path
    train: Path
    test: Path
    gold: Path
    corpus: Path
    tokenizer: Path
    teacher: Path
    student: Path
    manifest: Path

    @classmethod
    def at(cls, root: Path) -> "ToyWorld":
        root = Path(root)
        return cls(
            root=root,
            train=root / "problems" / "train.jsonl",
            test=root / "problems" / "test.jsonl",
            gold=root / "gold" / "train.parquet",
            corpus=root / "corpus" / "train.parquet",
            tokenizer=root / "tokenizer",
            teacher=root / "teacher-init",
            student=root / "student-init",
            manifest=root / "manifest.json",
        )


N_TRAIN, N_TEST = 10000, 500


def build(out_dir: Path, seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST,
          max_difficulty: int = DIFFICULTIES[-1]) -> ToyWorld:
    """Build (or check and reuse) the toy world in out_dir; returns its paths."""
    paths = ToyWorld.at(out_dir)
    recipe = {"generator_version": GENERATOR_VERSION, "tokenizer_version": TOKENIZER_VERSION, "seed": seed,
              "n_train": n_train, "n_test": n_test}
    if max_difficulty != DIFFICULTIES[-1]:  # recorded only when set, so worlds built before the flag still match
        recipe["max_difficulty"] = max_difficulty
    _check_manifest(paths.manifest, recipe)

    # ---- problems: cheap to regenerate, so an existing file is compared byte for byte
    splits = generate_problems(seed, n_train, n_test, max_difficulty)
    hashes = {}
    for split, path in (("train", paths.train), ("test", paths.test)):
        content = to_jsonl(splits[split])
        hashes[path.relative_to(paths.root).as_posix()] = _sha256(content)
        _write_or_check(path, content, recipe)
    if not paths.gold.exists():  # derived from train.jsonl, checked above
        _publish_file(paths.gold, gold_parquet(splits["train"]))
    content = corpus_parquet(corpus_rows(splits["train"], splits["test"], seed))
    hashes[paths.corpus.relative_to(paths.root).as_posix()] = _sha256(content)
    _write_or_check(paths.corpus, content, {**recipe, "corpus_version": CORPUS_VERSION})

    # ---- tokenizer, then the models whose vocabulary it decides
    if not paths.tokenizer.exists():
        tokenizer = train_tokenizer(corpus(splits["train"]))
        _publish_dir(paths.tokenizer, lambda tmp: save_tokenizer(tokenizer, tmp))
    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer)
    models = {name: _build_model_dir(path, tokenizer, name, seed) for name, path in _model_dirs(paths)}

    # ---- manifest last: its presence means every artifact above is complete
    for path in (
        paths.tokenizer / "tokenizer.json",
        paths.teacher / "model.safetensors",
        paths.student / "model.safetensors",
    ):
        hashes[path.relative_to(paths.root).as_posix()] = _sha256(path.read_bytes())
    manifest = {**recipe, "sha256": hashes, "vocab_size": len(tokenizer), "models": models}
    content = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    if not paths.manifest.exists() or paths.manifest.read_bytes() != content:
        _publish_file(paths.manifest, content)
    return paths


def gold_parquet(problems: list[dict]) -> bytes:
    """The gold conversations as curated rows: messages (reasoning in reasoning_content), ids, difficulty."""
    rows = [{"messages": gold_conversation(p), "trace_id": f"gold-{p['id']}", "problem_id": p["id"],
             "domain": p["domain"], "difficulty": p["meta"]["difficulty"]} for p in problems]
    for row in rows:
        for message in row["messages"]:
            message.setdefault("reasoning_content", None)
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink, compression="zstd")
    return sink.getvalue()


def _model_dirs(paths: ToyWorld) -> list[tuple[str, Path]]:
    return [("teacher", paths.teacher), ("student", paths.student)]


def _build_model_dir(path: Path, tokenizer: PreTrainedTokenizerBase, size: str, seed: int) -> dict:
    """Save the model unless it exists (then check its shape); building in memory is cheap and counts it."""
    model = build_model(tokenizer, size, seed)
    shape = {**SIZES[size], "head_dim": model.config.head_dim, "vocab_size": len(tokenizer)}
    if path.exists():
        config = json.loads((path / "config.json").read_text())
        changed = {k: (config.get(k), v) for k, v in shape.items() if config.get(k) != v}
        if changed:
            what = ", ".join(f"{k}={old} (now {new})" for k, (old, new) in changed.items())
            raise ValueError(f"{path} was built with {what}; delete {path.parent} and build again")
    else:
        log.info("building %s (%d parameters)", path, count_parameters(model))
        _publish_dir(path, lambda tmp: save_model(model, tokenizer, tmp))
    return {"params": count_parameters(model), **shape}


def _check_manifest(path: Path, recipe: dict) -> None:
    if not path.exists():
        return
    built = json.loads(path.read_text())
    changed = {k: (built.get(k), v) for k, v in recipe.items() if built.get(k) != v}
    if changed:
        what = ", ".join(f"{k}={old} (asked {new})" for k, (old, new) in changed.items())
        raise ValueError(f"{path.parent} was built with {what}; pass another --out or delete it")


def _write_or_check(path: Path, content: bytes, recipe: dict) -> None:
    if not path.exists():
        _publish_file(path, content)
    elif _sha256(path.read_bytes()) != _sha256(content):
        raise ValueError(f"{path} differs from what {recipe} generates; pass another --out or delete it")


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _publish_file(path: Path, content: bytes) -> None:
    """Write to a temporary name beside path, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; artifacts are for everyone
    os.replace(tmp, path)


def _publish_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary directory beside path, then rename it into place (a concurrent builder may win)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(tmp)
        # mkdtemp (and some writers) make things private; the artifacts are for everyone to read
        for file in tmp.rglob("*"):
            file.chmod(0o755 if file.is_dir() else 0o644)
        tmp.chmod(0o755)
        os.rename(tmp, path)
    except OSError:
        if not path.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
