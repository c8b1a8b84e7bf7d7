"""Live progress (done/total, samples/s, tokens/s, errors, ETA) and the run's summary counters."""

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger(__name__)


@dataclass
class Tally:
    """What this invocation did. Prompt tokens count once per request (as APIs bill them)."""
    requests: int = 0
    samples: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: Counter = field(default_factory=Counter)
    failed: list = field(default_factory=list)  # (problem_id, error) of the first failures
    started: float = field(default_factory=time.monotonic)
    expected: int = 0  # samples this shard should have in the end, and how many it has now
    done: int = 0

    def add(self, problem_id: str, response) -> None:
        self.requests += 1
        self.samples += len(response.samples)
        self.prompt_tokens += response.prompt_tokens or 0
        if response.error:
            self.errors += len(response.samples)
            self.finish_reasons["error"] += len(response.samples)
            if len(self.failed) < 50:
                self.failed.append({"problem_id": problem_id, "error": response.error})
        for s in response.samples if not response.error else ():
            self.completion_tokens += s.completion_tokens or 0
            self.finish_reasons[s.finish_reason or "unknown"] += 1

    @property
    def wall_s(self) -> float:
        return time.monotonic() - self.started


class Meter:
    """A rich progress bar on a terminal; a status line every `every_s` seconds in a batch log."""

    def __init__(self, total: int, every_s: float):
        self.total, self.every_s = total, every_s
        self.tty = sys.stderr.isatty()
        self.last_log = time.monotonic()
        self.bar = Progress(TextColumn("traces"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), disable=not self.tty)
        self.task = self.bar.add_task("traces", total=total, rate="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def update(self, tally: Tally) -> None:
        wall = max(tally.wall_s, 1e-6)
        rate = (f"{tally.samples / wall:.1f} samples/s  {tally.completion_tokens / wall:,.0f} tok/s  "
                f"errors {tally.errors}")
        self.bar.update(self.task, completed=tally.samples, rate=rate)
        if not self.tty and time.monotonic() - self.last_log >= self.every_s:
            self.last_log = time.monotonic()
            left = (self.total - tally.samples) / (tally.samples / wall) if tally.samples else float("nan")
            log.info("%d/%d traces  %s  eta %.0fs", tally.samples, self.total, rate, left)


def cost(tally: Tally, cfg) -> float | None:
    if cfg.price_input_per_mtok is None and cfg.price_output_per_mtok is None:
        return None
    return round((tally.prompt_tokens * (cfg.price_input_per_mtok or 0)
                  + tally.completion_tokens * (cfg.price_output_per_mtok or 0)) / 1e6, 4)
