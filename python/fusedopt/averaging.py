"""Weight averaging: exponential moving average (EMA) and stochastic weight averaging (SWA).

Both keep one float32 average per param (also for bf16/fp16 params), laid out like the param,
and fold the live params in with the fused multi-tensor kernel ``average_``
(``avg += weight * (p - avg)``, one call per (device, dtype) bucket). Only parameters are
averaged (no buffers such as BatchNorm statistics).

    ema = EMA(model, decay=0.999)
    for batch in data:
        ...; optimizer.step(); ema.update()
    with ema.average_parameters():   # evaluate with the averages
        evaluate(model)
    torch.save({"ema": ema.state_dict()}, path)
"""
from __future__ import annotations

import contextlib
import math
import numbers
import operator
from collections.abc import Mapping

import torch
from torch import nn

from . import _backend as B
from ._multi_tensor import average_

__all__ = ["EMA", "SWA"]


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return operator.index(value)


def _check_decay(decay) -> float:
    if (isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not math.isfinite(float(decay))
            or not 0.0 <= float(decay) <= 1.0):
        raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
    return float(decay)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def _collect(params_or_module, what: str = "params") -> list[torch.Tensor]:
    """The trainable params of a module, or the tensors of an iterable, validated."""
    if isinstance(params_or_module, nn.Module):
        params = [p for p in params_or_module.parameters() if p.requires_grad]
        source = "the module's trainable parameters"
    elif isinstance(params_or_module, torch.Tensor):
        params = [params_or_module]
        source = what
    else:
        try:
            params = list(params_or_module)
        except TypeError:
            raise TypeError(f"{what} must be an nn.Module or an iterable of tensors, "
                            f"got {type(params_or_module).__name__}") from None
        source = what
    if not params:
        raise ValueError(f"{source}: nothing to average (empty)")
    seen = set()
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{what}[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if p.dtype not in B.AVERAGE_SOURCE_DTYPES:
            raise ValueError(f"{what}[{i}] ({_describe(p)}): only float32, bfloat16 and float16 params "
                             "can be averaged (the averages are float32)")
        if p.layout != torch.strided or (p.numel() and not B.is_dense(p.shape, p.stride())):
            raise ValueError(f"{what}[{i}] ({_describe(p)}) must be dense in memory "
                             "(contiguous or a permutation of it)")
        if id(p) in seen:
            raise ValueError(f"{what}[{i}] ({_describe(p)}) appears more than once")
        seen.add(id(p))
    return params


class _Averager:
    """Shared machinery: fp32 copies, `every`, the swap-in context manager, state dicts."""

    _kind = ""
    _counters: tuple[str, ...] = ()

    def __init__(self, params_or_module, every: int):
        self._params = _collect(params_or_module)
        self.every = _check_int("every", every, 1)
        with torch.no_grad():
            # empty_like keeps the strides of dense non-contiguous params, as average_ needs.
            self._averages = [torch.empty_like(p, dtype=torch.float32).copy_(p) for p in self._params]
        # The kernel's lists: empty params have nothing to average (and B.is_dense, which
        # average_ checks, rejects shapes with a zero-size dim).
        self._work = [i for i, p in enumerate(self._params) if p.numel()]
        self.num_calls = 0  # update() calls so far, counting the ones `every` skips
        self._backup: list[torch.Tensor] | None = None

    # ---- public API ----------------------------------------------------------------------
    @property
    def averages(self) -> list[torch.Tensor]:
        """The float32 averages, in the order of the params (the live tensors, not copies)."""
        return list(self._averages)

    def update(self) -> None:
        """Fold the current params into the average; with ``every=k`` only every k-th call does."""
        if self._backup is not None:
            raise RuntimeError(f"{self._kind}.update() called inside average_parameters(): the params "
                               "hold the averages there, so this would average the averages")
        self.num_calls += 1
        if self.num_calls % self.every == 0:
            with torch.no_grad():
                self._fold([self._averages[i] for i in self._work], [self._params[i].detach() for i in self._work])

    @contextlib.contextmanager
    def average_parameters(self):
        """Swap the averages into the params for the body; restore the params bit-exactly on
        exit, also when the body raises. (Low-precision params hold the rounded averages.)"""
        if self._backup is not None:
            raise RuntimeError(f"{self._kind}.average_parameters() is already active (not re-entrant)")
        live = [p.detach() for p in self._params]
        with torch.no_grad():
            backup = [p.clone() for p in live]  # clone keeps bits and strides
            torch._foreach_copy_(live, self._averages)
        self._backup = backup
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, backup)
            self._backup = None

    def copy_to(self, params_or_module=None) -> None:
        """Copy the averages into ``params_or_module`` (default: the averaged params themselves),
        rounding to the params' dtype."""
        targets = self._params if params_or_module is None else _collect(params_or_module)
        self._check_matches([tuple(t.shape) for t in targets], "copy_to", "params")
        with torch.no_grad():
            torch._foreach_copy_([t.detach() for t in targets], self._averages)

    def state_dict(self) -> dict:
        """Averages (float32, aliased like ``nn.Module.state_dict``) and counters; plain types
        only, so ``torch.load(..., weights_only=True)`` reads it back."""
        out = {"kind": self._kind, "averages": list(self._averages), "every": self.every,
               "num_calls": self.num_calls}
        out.update(self._extra_state())
        return out

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Load averages and counters saved by the same kind of averager over params of the
        same shapes; nothing changes if the state dict does not match."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        kind = state_dict.get("kind")
        if kind != self._kind:
            raise ValueError(f"state dict is from {kind!r}, not {self._kind!r}")
        required = ("averages", "every", "num_calls") + self._counters
        missing = [k for k in required if k not in state_dict]
        if missing:
            raise ValueError(f"{self._kind} state dict misses {', '.join(missing)}")
        averages = list(state_dict["averages"])
        for i, a in enumerate(averages):
            if not isinstance(a, torch.Tensor) or not a.is_floating_point():
                raise ValueError(f"{self._kind} state dict: averages[{i}] is not a floating-point tensor")
        self._check_matches([tuple(a.shape) for a in averages], "state dict", "averages")
        every = _check_int("every", state_dict["every"], 1)
        num_calls = _check_int("num_calls", state_dict["num_calls"], 0)
        extra = self._check_extra_state(state_dict)
        with torch.no_grad():
            for dst, src in zip(self._averages, averages):
                dst.copy_(src)
        self.every, self.num_calls = every, num_calls
        for k, v in extra.items():
            setattr(self, k, v)

    # ---- helpers -------------------------------------------------------------------------
    def _check_matches(self, shapes, where, what):
        if len(shapes) != len(self._averages):
            raise ValueError(f"{self._kind} {where}: {len(shapes)} {what}, but {len(self._averages)} "
                             "params are averaged")
        for i, (shape, avg) in enumerate(zip(shapes, self._averages)):
            if shape != tuple(avg.shape):
                raise ValueError(f"{self._kind} {where}: {what}[{i}] has shape {shape}, the averaged "
                                 f"param has shape {tuple(avg.shape)}")

    def _fold(self, avgs, params):
        raise NotImplementedError

    def _extra_state(self) -> dict:
        raise NotImplementedError

    def _check_extra_state(self, state_dict) -> dict:
        raise NotImplementedError

    def __repr__(self):
        extra = ", ".join(f"{k}={v}" for k, v in self._extra_state().items())
        return f"{self._kind}({len(self._params)} params, every={self.every}, {extra})"


class EMA(_Averager):
    """Exponential moving average of params: ``avg = decay * avg + (1 - decay) * p`` per
    :meth:`update`, in one fused multi-tensor call (weight ``1 - decay``).

    * Starts as a float32 copy of the params (an ``nn.Module``'s trainable parameters, or an
      iterable of tensors), and the first :meth:`update` already averages with that copy.
      (``torch.optim.swa_utils.AveragedModel`` instead overwrites its copy on the first
      ``update_parameters()``: ``EMA(m)`` matches ``AveragedModel(m, ...)`` followed by one
      ``update_parameters(m)``.)
    * ``every=k``: only every k-th :meth:`update` call averages (the others only count).
    * ``warmup=w``: for the first ``w`` averaging updates the decay is
      ``min(decay, (1 + n) / (10 + n))``, ``n`` the number of averaging updates before this one
      (0.1 for the first, then 2/11, 3/12, ...), as in TensorFlow's ``ExponentialMovingAverage``
      with ``num_updates``; so the average is not dominated by the initial weights. From update
      ``w`` on (and always with the default ``w=0``) plain ``decay`` is used.
    * The state dict keeps ``decay``, ``every``, ``warmup`` and the counters ``num_updates``
      (averaging updates) and ``num_calls`` (update() calls); loading it restores them.
    """

    _kind = "EMA"
    _counters = ("decay", "warmup", "num_updates")

    def __init__(self, params_or_module, decay: float = 0.999, every: int = 1, warmup: int = 0):
        self.decay = _check_decay(decay)
        self.warmup = _check_int("warmup", warmup, 0)
        self.num_updates = 0
        super().__init__(params_or_module, every)

    def current_decay(self) -> float:
        """The decay the next averaging update will use."""
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n)) if n < self.warmup else self.decay

    def _fold(self, avgs, params):
        average_(avgs, params, 1.0 - self.current_decay())
        self.num_updates += 1

    def _extra_state(self):
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}

    def _check_extra_state(self, sd):
        return {"decay": _check_decay(sd["decay"]), "warmup": _check_int("warmup", sd["warmup"], 0),
                "num_updates": _check_int("num_updates", sd["num_updates"], 0)}


class SWA(_Averager):
    """Stochastic weight averaging: a running uniform mean of the params seen by :meth:`update`,
    ``avg += (p - avg) / n`` with ``n`` the number of averaging updates so far (weight ``1 / n``
    in the fused kernel). As in ``torch.optim.swa_utils.AveragedModel`` the first update copies
    the params exactly, so the starting params (held until then) are not part of the mean.
    ``every=k`` averages on every k-th call only. The state dict keeps ``n``.
    """

    _kind = "SWA"
    _counters = ("n",)

    def __init__(self, params_or_module, every: int = 1):
        self.n = 0
        super().__init__(params_or_module, every)

    def _fold(self, avgs, params):
        self.n += 1
        if self.n == 1:
            torch._foreach_copy_(avgs, params)
        else:
            average_(avgs, params, 1.0 / self.n)

    def _extra_state(self):
        return {"n": self.n}

    def _check_extra_state(self, sd):
        return {"n": _check_int("n", sd["n"], 0)}
