"""The learning-rate schedule: warmup-stable-decay with a (1 - sqrt) cooldown.

``fusedopt.schedules.WSD`` when the installed fusedopt has it; otherwise a
``torch.optim.lr_scheduler.LambdaLR`` over :func:`wsd_factor`, the same formula (API.md)."""
from __future__ import annotations

import math

import torch

SHAPES = {
    "linear": lambda s: 1.0 - s,
    "1-sqrt": lambda s: 1.0 - math.sqrt(s),
    "cosine": lambda s: (1.0 + math.cos(math.pi * s)) / 2.0,
    "square": lambda s: 1.0 - s * s,
}


def wsd_factor(t: int, warmup_steps: int, total_steps: int, cooldown_fraction: float = 0.2,
               shape: str = "1-sqrt", warmup_start_factor: float = 0.01,
               final_factor: float = 0.0) -> float:
    """The factor on the initial lr after ``t`` scheduler steps."""
    c = round(cooldown_fraction * total_steps)
    if t < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * t / warmup_steps
    if t >= total_steps:
        return final_factor
    if t < total_steps - c:
        return 1.0
    s = (t - (total_steps - c)) / c
    return final_factor + (1.0 - final_factor) * SHAPES[shape](s)


def make_wsd(optimizer, warmup_steps: int, total_steps: int, cooldown_fraction: float = 0.2,
             shape: str = "1-sqrt"):
    """(scheduler, name of the implementation used)."""
    try:
        from fusedopt.schedules import WSD
    except ImportError:
        WSD = None
    if WSD is not None:
        return (WSD(optimizer, warmup_steps, total_steps, cooldown_fraction=cooldown_fraction,
                    shape=shape), "fusedopt.schedules.WSD")
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: wsd_factor(t, warmup_steps, total_steps, cooldown_fraction, shape))
    return sched, "torch.optim.lr_scheduler.LambdaLR(wsd_factor)"
