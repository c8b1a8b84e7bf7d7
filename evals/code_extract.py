"""Which code in a model completion is the candidate, and what benchmark code goes in front of it.

    from evals.code_extract import extract_code, with_prefix
    extract_code("<think>...</think>\\n```python\\ndef f(): ...\\n```")   # "def f(): ...\\n"

The candidate is the last ```python (or ```py / ```python3) fenced block after `</think>`, else the last
bare ``` block, else the raw text; a completion whose `<think>` never closes has no candidate.
"""

import ast
import re


def extract_code(completion: str) -> str:
    """The candidate program in a model completion ("" when there is none)."""
    if "</think>" in completion:
        completion = completion.rsplit("</think>", 1)[1]
    elif "<think>" in completion:
        return ""  # the reasoning never finished: there is no answer
    blocks = _fenced_blocks(completion)
    python = [code for lang, code in blocks if lang in ("python", "py", "python3")]
    bare = [code for lang, code in blocks if not lang]
    return (python or bare or [completion])[-1]


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each closed ``` block, pairing fences line by line."""
    blocks, lang, lines = [], None, []
    for line in text.splitlines(keepends=True):
        fence = line.strip().startswith("```")
        if lang is None and fence:
            lang, lines = line.strip()[3:].strip().lower(), []
        elif lang is not None and line.strip() == "```":
            blocks.append((lang, "".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def with_prefix(candidate: str, entry_point: str | None, prefix: str) -> str:
    """HumanEval's convention: a candidate without `def <entry_point>` is a body that continues the
    prompt; one with it gets the prompt's top-level imports (models often drop `from typing import List`)."""
    if not entry_point or not prefix:
        return candidate
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", candidate, re.MULTILINE):
        return "\n".join([*_imports(prefix), candidate])
    return prefix + candidate


def _imports(code: str) -> list[str]:
    """The top-level import statements of `code` (none if it does not parse)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    return [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
