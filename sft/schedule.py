"""The KD temperature over training: constant, linear or cosine from a start to an end temperature.

    kd_temperature: 4.0            # the start (and the only value with kd_temperature_schedule: constant)
    kd_temperature_end: 1.0
    kd_temperature_schedule: cosine

Every KD mode reads the step's temperature from `temperature_at` (DistillTrainer.kd_temperature() calls it with
the trainer's global step), so sparse, online and on-policy KD follow one schedule. The first optimizer step uses
the start, the last the end; the KD term keeps its T^2 factor at the step's T (Hinton et al.), so the gradient's
scale stays comparable while T moves.
"""

import math

SCHEDULES = ("constant", "linear", "cosine")


def temperature_at(step: int, total_steps: int, start: float, end: float | None = None,
                   schedule: str = "constant") -> float:
    """The temperature of optimizer step `step` (0-based, as TrainerState.global_step during the step) of
    `total_steps`: the start at step 0, the end at step total_steps - 1, in between along the schedule."""
    if schedule not in SCHEDULES:
        raise ValueError(f"kd_temperature_schedule: {schedule!r} is not one of: {', '.join(SCHEDULES)}")
    if schedule == "constant" or end is None or total_steps <= 1:
        return start
    progress = min(max(step / (total_steps - 1), 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2
