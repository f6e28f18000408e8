"""Learning-rate schedules: warmup-stable-decay (WSD) and warmup + cosine.

Both are :class:`torch.optim.lr_scheduler.LRScheduler` subclasses, so ``state_dict`` /
``load_state_dict``, ``get_last_lr`` and chaining with other schedulers work as in torch:

* **Closed form.** Each group's lr after ``t`` calls of :meth:`step` is exactly
  ``initial_lr * factor(t)`` (no product of per-step ratios, so no drift over long runs), whatever
  lr the optimizer held before: a scheduler whose state is loaded onto a freshly built optimizer
  continues exactly where the saved one was.
* **Chaining** (opt-in, ``chainable=True``). A change made to ``group["lr"]`` by another
  scheduler (or by hand) since this one last set it is kept as a multiplier: the next lr is
  ``initial_lr * factor(t) * m`` with ``m = group["lr"] / (initial_lr * factor(t - 1))``. So
  ``ChainedScheduler([WSD(..., chainable=True), ExponentialLR(...)])`` gives
  ``initial_lr * factor(t) * gamma**t``, as torch's own chainable schedulers do. While this
  schedule's own lr is 0 (``warmup_start_factor=0`` at step 0, ``final_factor=0`` at the end)
  the multiplier cannot be read off and the last one is kept. A chained schedule reads the
  optimizer's lr, so on resume load the optimizer's state dict (which holds the chained lr)
  along with the schedulers'. Off by default, because a plain schedule must never mistake an
  lr it did not set (a fresh optimizer's, say) for a chained one.
* **Tensor lrs** (for CUDA graphs / ``torch.compile``) are updated in place with
  ``group["lr"].fill_(value)`` and computed with tensor arithmetic: same object, no host sync.
"""
from __future__ import annotations

import math
import numbers
import operator

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WSD", "WarmupCosine", "SHAPES", "LossAdaptiveLR"]

# g(s) for s in [0, 1], from 1 down to 0: the cooldown's shape.
SHAPES = {
    "linear": lambda s: 1.0 - s,
    "1-sqrt": lambda s: 1.0 - math.sqrt(s),
    "cosine": lambda s: (1.0 + math.cos(math.pi * s)) / 2.0,
    "square": lambda s: 1.0 - s * s,
}


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _check_unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _ratio(cur, prev, prev_scale):
    """cur / prev, or prev_scale where prev is 0; tensor arithmetic (no sync) for tensors."""
    if isinstance(cur, torch.Tensor) or isinstance(prev, torch.Tensor):
        if not isinstance(prev, torch.Tensor):
            return prev_scale if prev == 0 else cur / prev
        return torch.where(prev != 0, cur / torch.where(prev != 0, prev, 1), prev_scale)
    return prev_scale if prev == 0 else cur / prev


class _WarmupDecay(LRScheduler):
    """Linear warmup from ``warmup_start_factor`` over ``warmup_steps``, 1 until
    ``decay_start``, then ``final_factor + (1 - final_factor) * g(s)`` with
    ``s = (t - decay_start) / (total_steps - decay_start)``, and ``final_factor`` from
    ``total_steps`` on. Factors multiply each group's ``initial_lr``."""

    def __init__(self, optimizer, warmup_steps, total_steps, decay_start, shape, warmup_start_factor,
                 final_factor, last_epoch, chainable):
        if not isinstance(chainable, bool):
            raise ValueError(f"chainable must be a bool, got {chainable!r}")
        self.chainable = chainable
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.decay_start = decay_start
        self.shape = shape
        self.warmup_start_factor = warmup_start_factor
        self.final_factor = final_factor
        # Chaining state: this schedule's own lr at the previous step (initial_lr * factor) and
        # the multiplier found on the group's lr then. None: first step after (re)initialisation.
        self._own = None
        self._scale = None
        self._pending = None
        super().__init__(optimizer, last_epoch)

    def _factor(self, t: int) -> float:
        if t < self.warmup_steps:
            w = self.warmup_start_factor
            return w + (1.0 - w) * t / self.warmup_steps
        if t < self.decay_start:
            return 1.0
        if t >= self.total_steps:
            return self.final_factor
        s = (t - self.decay_start) / (self.total_steps - self.decay_start)
        f = self.final_factor
        return f + (1.0 - f) * SHAPES[self.shape](s)

    # ---- LRScheduler hooks -------------------------------------------------------------
    def _initial_step(self) -> None:
        # Also reached from SequentialLR, which first resets the lrs to initial_lr.
        self._own = self._scale = None
        super()._initial_step()

    def get_lr(self):
        t = self.last_epoch
        f = self._factor(t)
        if not self.chainable:
            return self._get_closed_form_lr()
        values, own, scale = [], [], []
        for i, (group, base) in enumerate(zip(self.optimizer.param_groups, self.base_lrs)):
            if self._own is None:
                prev, prev_scale = (base if t <= 0 else base * self._factor(t - 1)), 1.0
            else:
                prev, prev_scale = self._own[i], self._scale[i]
            m = _ratio(group["lr"], prev, prev_scale)
            o = base * f
            own.append(o)
            scale.append(m)
            values.append(o * m)
        self._pending = (own, scale)
        return values

    def _get_closed_form_lr(self):
        f = self._factor(self.last_epoch)
        own = [base * f for base in self.base_lrs]
        self._pending = (own, [1.0] * len(own))
        return list(own)

    def step(self, epoch=None) -> None:
        groups = self.optimizer.param_groups
        tensors = [g["lr"] if isinstance(g["lr"], torch.Tensor) else None for g in groups]
        self._pending = None
        super().step(epoch)
        # torch >= 2.2 already fills tensor lrs in place; make sure of it on any version.
        for group, lr in zip(groups, tensors):
            if lr is not None and group["lr"] is not lr:
                value = group["lr"]
                group["lr"] = lr
                with torch.no_grad():
                    lr.fill_(value)
        if self._pending is not None:
            self._own, self._scale = self._pending
            self._pending = None
        self._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in groups]


class WSD(_WarmupDecay):
    """Warmup-stable-decay ("trapezoidal") schedule, see API.md.

    With ``t`` the step count, ``c = round(cooldown_fraction * total_steps)`` (Python's
    ``round``: halves go to the even integer) and ``s = (t - (total_steps - c)) / c``, the factor
    on each group's initial lr is

    * ``warmup_start_factor + (1 - warmup_start_factor) * t / warmup_steps`` for ``t < warmup_steps``,
    * ``1`` until ``total_steps - c``,
    * ``final_factor + (1 - final_factor) * g(s)`` during the cooldown, ``g`` one of
      ``linear`` ``1 - s``, ``1-sqrt`` ``1 - sqrt(s)``, ``cosine`` ``(1 + cos(pi s)) / 2``,
      ``square`` ``1 - s**2``,
    * ``final_factor`` from ``total_steps`` on.

    The warmup must end before the cooldown starts: ``warmup_steps <= total_steps - c``.
    """

    def __init__(self, optimizer, warmup_steps, total_steps, cooldown_fraction=0.2, shape="1-sqrt",
                 warmup_start_factor=0.01, final_factor=0.0, last_epoch=-1, *, chainable=False):
        total_steps = _check_int("total_steps", total_steps, 1)
        warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        cooldown_fraction = _check_unit("cooldown_fraction", cooldown_fraction)
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}: use one of {', '.join(map(repr, SHAPES))}")
        warmup_start_factor = _check_unit("warmup_start_factor", warmup_start_factor)
        final_factor = _check_unit("final_factor", final_factor)
        cooldown_steps = round(cooldown_fraction * total_steps)
        if warmup_steps > total_steps - cooldown_steps:
            raise ValueError(
                f"warmup_steps ({warmup_steps}) must be <= total_steps - cooldown steps "
                f"({total_steps} - round({cooldown_fraction} * {total_steps}) = {total_steps - cooldown_steps}): "
                "the warmup must end before the cooldown starts")
        self.cooldown_fraction = cooldown_fraction
        self.cooldown_steps = cooldown_steps
        super().__init__(optimizer, warmup_steps, total_steps, total_steps - cooldown_steps, shape,
                         warmup_start_factor, final_factor, last_epoch, chainable)


class WarmupCosine(_WarmupDecay):
    """Linear warmup then cosine decay to ``final_factor``.

    Factor on each group's initial lr: ``warmup_start_factor + (1 - warmup_start_factor) *
    t / warmup_steps`` for ``t < warmup_steps``, then ``final_factor + (1 - final_factor) *
    (1 + cos(pi s)) / 2`` with ``s = (t - warmup_steps) / (total_steps - warmup_steps)``, and
    ``final_factor`` from ``total_steps`` on (the same as ``WSD`` with its cooldown starting
    right after the warmup and ``shape="cosine"``).
    """

    def __init__(self, optimizer, warmup_steps, total_steps, warmup_start_factor=0.01, final_factor=0.0,
                 last_epoch=-1, *, chainable=False):
        total_steps = _check_int("total_steps", total_steps, 1)
        warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        if warmup_steps > total_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")
        warmup_start_factor = _check_unit("warmup_start_factor", warmup_start_factor)
        final_factor = _check_unit("final_factor", final_factor)
        super().__init__(optimizer, warmup_steps, total_steps, warmup_steps, "cosine", warmup_start_factor,
                         final_factor, last_epoch, chainable)


from .adaptive_lr import LossAdaptiveLR  # noqa: E402,F401  (the contract's fusedopt.schedules.LossAdaptiveLR)
