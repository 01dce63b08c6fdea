"""Learning-rate schedules over a run's RL steps (`optim.schedule`, `optim.warmup_steps`, `optim.min_lr_ratio`).

Each schedule gives the share of the peak learning rate at progress p in [0, 1] through the steps after the
warm-up, from 1 down to the floor `optim.min_lr_ratio`.
"""

from __future__ import annotations

import math


def _constant(p: float, floor: float) -> float:
    return 1.0


def _linear(p: float, floor: float) -> float:
    return 1.0 - (1.0 - floor) * p


def _cosine(p: float, floor: float) -> float:
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


LR_SCHEDULES = {"constant": _constant, "linear": _linear, "cosine": _cosine}


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0, floor: float = 0.0) -> float:
    """The share of the peak learning rate for RL step `step` (0-based) of `total`: a linear warm-up over the first
    `warmup` steps (step 0 of a warm-up gets 1/warmup of it, not 0), then the schedule from 1 at the warm-up's end
    to `floor` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    rest = max(total - warmup - 1, 1)
    return LR_SCHEDULES[schedule](min((step - warmup) / rest, 1.0), floor)
