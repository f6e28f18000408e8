"""The demo's learning-rate schedule: warmup-stable-decay with a (1 - sqrt) cooldown, from
``fusedopt.schedules``."""
from __future__ import annotations

from fusedopt.schedules import WSD


def make_wsd(optimizer, warmup_steps: int, total_steps: int, cooldown_fraction: float = 0.2,
             shape: str = "1-sqrt"):
    """(scheduler, name of the implementation used)."""
    return (WSD(optimizer, warmup_steps, total_steps, cooldown_fraction=cooldown_fraction, shape=shape),
            "fusedopt.schedules.WSD")
