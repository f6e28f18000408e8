"""Loss-adaptive learning rate: the learning-rate-adaptive Adam of Dereich, Jentzen and Riekert
(2024, arXiv:2406.14340) as a controller for any optimizer.

When training has gone ``patience`` steps without a new lowest loss, the controller snapshots
the params and the optimizer state in memory, tries ``candidates`` learning rates (the current
one times ``factor**e`` for ``e`` in ``-(candidates // 2) .. candidates // 2``) for
``trial_steps`` steps each, evaluates each on fresh samples, restores the snapshot bit for bit
after every trial and continues with the lr that gave the lowest loss::

    controller = LossAdaptiveLR(optimizer, module=model)

    def train_step():
        optimizer.zero_grad()
        loss = loss_fn(model(*next(batches)))
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(steps):
        loss = train_step()
        controller.step(loss.detach(), train_step, evaluate)

The snapshot is a set of buffers laid out like the live tensors, allocated once and reused
by every search while the tensors keep their shapes and dtypes; a snapshot and a restore are
one multi-tensor copy per (device, dtype) bucket each (``_multi_tensor.copy_``: on the CPU one
call of the kernels with streaming stores, elsewhere ``torch._foreach_copy_``). What is not snapshotted: the
params' ``.grad`` (every ``train_step`` makes fresh ones), and anything outside the optimizer
and the module (RNG state, a GradScaler, data iterators: trials consume fresh samples, as in
the paper).
"""
from __future__ import annotations

import copy
import math
import numbers
import operator
from collections.abc import Callable, Mapping

import torch
from torch import nn

from . import _multi_tensor

__all__ = ["LossAdaptiveLR"]

_SCHEMA = "fusedopt.LossAdaptiveLR/1"


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return operator.index(value)


def _check_factor(value) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value))
            or not float(value) > 1.0):
        raise ValueError(f"factor must be a finite number > 1, got {value!r}")
    return float(value)


def _check_candidates(value) -> int:
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
            or operator.index(value) % 2 == 0):
        raise ValueError(f"candidates must be an odd int >= 1 (the current lr in the middle), got {value!r}")
    return operator.index(value)


def _as_loss_tensor(name: str, value) -> torch.Tensor:
    """A detached 0-dim float64 tensor (same device) from a float or a 1-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a float or a 1-element real tensor, got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        return value.detach().reshape(()).to(torch.float64)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a float or a 1-element real tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=torch.float64)


def _is_float_lr(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _best_candidate(losses: list[float]) -> int | None:
    """Index of the first smallest loss; NaN never wins; None when every loss is NaN."""
    best = None
    for i, loss in enumerate(losses):
        if not math.isnan(loss) and (best is None or loss < losses[best]):
            best = i
    return best


class _Snapshot:
    """An in-memory, bit-exact copy of an optimizer's params, state and group scalars (and a
    module's buffers) that can be restored after a trial.

    Tensors are copied into buffers kept between snapshots (reallocated only when the list of
    shapes/strides/dtypes/devices changes), one multi-tensor copy per (device, dtype)
    bucket. The restore copies back into the *original* tensor objects and puts those objects
    back where a trial replaced them (state containers, group values), so fusedopt's cached
    pointer table stays valid whenever the trial replaced nothing, and is invalidated by the
    tracked assignments when it did. State a trial created is removed again.
    """

    def __init__(self):
        self._signature = None
        self._buffers: list[torch.Tensor] = []
        self._index: dict[int, int] = {}  # id(live tensor) -> its buffer
        self._buckets: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # (buffers, live)
        self._state: list[tuple[torch.Tensor, dict, dict]] = []  # (param, its state dict, saved items)
        self._state_keys: set[int] = set()  # ids of the params that had state
        self._groups: list[tuple[dict, dict]] = []  # (group, key -> (value, list items or None))
        self.taken = False

    # ---- which tensors -------------------------------------------------------------------
    def _collect(self, optimizer: torch.optim.Optimizer, module: nn.Module | None) -> list[torch.Tensor]:
        """Every tensor to copy, once each, and the structure to put back on restore."""
        tensors: list[torch.Tensor] = []
        self._index = {}

        def add(t: torch.Tensor) -> None:
            if id(t) not in self._index:
                self._index[id(t)] = len(tensors)
                tensors.append(t)

        self._groups = []
        for group in optimizer.param_groups:
            saved = {}
            for key, value in group.items():
                if key == "params":
                    continue
                for v in (value if isinstance(value, (tuple, list)) else (value,)):  # e.g. tensor betas
                    if isinstance(v, torch.Tensor):
                        add(v)
                # Lists also keep their items, so an in-place change by a trial is undone too.
                saved[key] = (value, list(value)) if isinstance(value, list) else (value, None)
            self._groups.append((group, saved))
            for p in group["params"]:
                add(p)
        state = optimizer.state
        self._state_keys = {id(p) for p in state.keys()}
        self._state = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                entry = state.get(p)  # .get: torch's state is a defaultdict; [] would create entries
                if entry is None:
                    continue
                self._state.append((p, entry, dict(entry)))
                for value in entry.values():
                    if isinstance(value, torch.Tensor):
                        add(value)
        if module is not None:
            for b in module.buffers():
                add(b)
        return tensors

    # ---- snapshot and restore --------------------------------------------------------------
    @torch.no_grad()
    def take(self, optimizer: torch.optim.Optimizer, module: nn.Module | None = None) -> None:
        """Copy every tensor into the snapshot buffers (allocated on first use, and again only
        when the shapes/strides/dtypes/devices changed)."""
        live = [t.detach() for t in self._collect(optimizer, module)]
        signature = tuple((t.device, t.dtype, tuple(t.shape), t.stride()) for t in live)
        if signature != self._signature:
            self._buffers = [torch.empty_like(t, memory_format=torch.preserve_format) for t in live]
            self._signature = signature
        buckets: dict[tuple, tuple[list, list]] = {}
        for t, buf in zip(live, self._buffers):
            dst, src = buckets.setdefault((t.device, t.dtype), ([], []))
            dst.append(buf)
            src.append(t)
        self._buckets = list(buckets.values())
        pairs = [(buf, t) for buffers, tensors in self._buckets for buf, t in zip(buffers, tensors)]
        if hasattr(optimizer, "_defer_saves"):
            # A fusedopt optimizer saves its moments (and master/Kahan buffers) inside the next
            # step's pass (_step_inputs.py): only that step changes them, and reading
            # optimizer.state, or a restore, before it does the copies. Params, buffers and group
            # tensors are copied now (anything may change them before the step).
            pairs = optimizer._defer_saves(pairs)
        if pairs:
            _multi_tensor.copy_([buf for buf, _ in pairs], [t for _, t in pairs])
        self.taken = True

    def saved(self, tensor: torch.Tensor) -> torch.Tensor:
        """The snapshot's copy of one of the snapshotted tensors (e.g. a tensor lr)."""
        return self._buffers[self._index[id(tensor)]]

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.taken:
            raise RuntimeError("restore() before take()")
        self._restore_structure(optimizer)
        pairs = [(t, buf) for buffers, tensors in self._buckets for buf, t in zip(buffers, tensors)]
        if hasattr(optimizer, "_defer_copies"):
            # A fusedopt optimizer restores its moments (and master/Kahan buffers) inside the
            # next step's pass (_step_inputs.py): nothing reads them before that step, and
            # reading optimizer.state earlier does the copies. Params, buffers and group
            # tensors are copied now (the next forward pass reads them).
            pairs = optimizer._defer_copies(pairs, params=False)
        if pairs:
            _multi_tensor.copy_([t for t, _ in pairs], [buf for _, buf in pairs])

    def _restore_structure(self, optimizer: torch.optim.Optimizer) -> None:
        # Group values: put back replaced objects, drop keys a trial added.
        for group, saved in self._groups:
            for key in [k for k in group if k != "params" and k not in saved]:
                del group[key]
            for key, (value, items) in saved.items():
                if group.get(key) is not value:
                    group[key] = value
                if items is not None and (len(value) != len(items) or any(a is not b for a, b in zip(value, items))):
                    value[:] = items
        # State: remove what a trial created, put back replaced containers, tensors and values.
        # Plain assignments only, so fusedopt's tracked containers invalidate its cache.
        state = optimizer.state
        for p in [p for p in list(state.keys()) if id(p) not in self._state_keys]:
            del state[p]
        for p, entry, items in self._state:
            if state.get(p) is not entry:
                state[p] = entry
                entry = state[p]  # fusedopt may wrap a plain dict on assignment
            for key in [k for k in entry if k not in items]:
                del entry[key]
            for key, value in items.items():
                if key not in entry or entry[key] is not value:
                    entry[key] = value


class LossAdaptiveLR:
    """Adapts the learning rate of ``optimizer`` from measured losses (see API.md, "Loss-adaptive
    learning rate", and the module docstring).

    Args:
        optimizer: any ``torch.optim.Optimizer`` (fusedopt's or torch's); every group's lr is
            scaled by the same factor. Tensor lrs are changed in place.
        patience: steps without a new (strictly) lowest training loss before :meth:`step` runs
            a search.
        factor: ratio between neighbouring candidate lrs (> 1).
        candidates: number of lrs tried per search (odd, the current lr in the middle).
        trial_steps: ``train_step()`` calls per candidate.
        module: optional ``nn.Module`` whose buffers (e.g. BatchNorm statistics) are part of
            the snapshot too.
    """

    def __init__(self, optimizer, *, patience: int = 400, factor: float = 4.0, candidates: int = 5,
                 trial_steps: int = 50, module: nn.Module | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if module is not None and not isinstance(module, nn.Module):
            raise ValueError(f"module must be an nn.Module or None, got {type(module).__name__}")
        for i, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            if not (isinstance(lr, torch.Tensor) and lr.numel() == 1) and not _is_float_lr(lr):
                raise ValueError(f"optimizer: param group {i} has no lr that can be scaled (got {lr!r})")
        self.optimizer = optimizer
        self.module = module
        self.patience = _check_int("patience", patience, 1)
        self.factor = _check_factor(factor)
        self.candidates = _check_candidates(candidates)
        self.trial_steps = _check_int("trial_steps", trial_steps, 1)
        self.num_steps = 0          # step() calls so far
        self.num_trial_steps = 0    # train_step() calls made by searches so far
        self.history: list[dict] = []
        # Best loss and bad-step count live on the losses' device, so step() needs no host
        # sync: `_bad_bound` is a host-side upper bound of the count (it grows by at most one
        # per step), and the count is only read once the bound reaches `patience`.
        self._best = torch.tensor(math.inf, dtype=torch.float64)
        self._bad = torch.tensor(0, dtype=torch.int64)
        self._bad_bound = 0
        self._snapshot = _Snapshot()

    # ---- public API ----------------------------------------------------------------------
    @property
    def exponents(self) -> list[int]:
        """The exponents ``e`` of the candidate lrs ``current * factor**e``, in trial order."""
        half = self.candidates // 2
        return list(range(-half, half + 1))

    @property
    def best_loss(self) -> float:
        """Lowest training loss passed to :meth:`step` so far (inf before the first)."""
        return float(self._best)

    @property
    def num_bad_steps(self) -> int:
        """Steps since the last new lowest loss or the last search, whichever came later."""
        return int(self._bad)

    def search(self, train_step: Callable[[], object], evaluate: Callable[[], object]) -> float:
        """Try each candidate lr for ``trial_steps`` calls of ``train_step()`` from the same
        snapshot, score it with ``evaluate()`` (a float or 1-element tensor loss), restore the
        snapshot after each, then scale every group's lr by the best candidate's factor (the
        first minimum; a NaN loss never wins; if every loss is NaN the lr is kept) and return
        that factor. Also restarts the patience count. If a callback raises, the snapshot and
        the lrs are restored and nothing else changes."""
        if not callable(train_step):
            raise ValueError(f"train_step must be callable, got {type(train_step).__name__}")
        if not callable(evaluate):
            raise ValueError(f"evaluate must be callable, got {type(evaluate).__name__}")
        factor = self._search(train_step, evaluate)
        self._bad = torch.zeros_like(self._bad)
        self._bad_bound = 0
        return factor

    def step(self, loss, train_step: Callable[[], object], evaluate: Callable[[], object]) -> float | None:
        """Record the training loss of the step just taken; after ``patience`` steps without a
        new (strictly) lowest loss run :meth:`search` and return its factor, else return None.
        The best loss is never reset; the count restarts after each search. No host sync
        except every ``patience``-ish steps (see the module's notes)."""
        value = _as_loss_tensor("loss", loss)
        if not callable(train_step):
            raise ValueError(f"train_step must be callable, got {type(train_step).__name__}")
        if not callable(evaluate):
            raise ValueError(f"evaluate must be callable, got {type(evaluate).__name__}")
        if value.device != self._best.device:
            if isinstance(loss, torch.Tensor):  # the state follows the tensor losses' device
                self._best, self._bad = self._best.to(value.device), self._bad.to(value.device)
            else:
                value = value.to(self._best.device)
        improved = value < self._best  # False for NaN
        best = torch.where(improved, value, self._best)
        bad = torch.where(improved, torch.zeros_like(self._bad), self._bad + 1)
        bound = self._bad_bound + 1
        if bound >= self.patience:
            bound = int(bad)  # the only host sync, and only while the count may have reached patience
        factor = None
        if bound >= self.patience:
            self.num_steps += 1
            try:
                factor = self._search(train_step, evaluate)
            except BaseException:
                self.num_steps -= 1
                raise
            bad, bound = torch.zeros_like(bad), 0
        else:
            self.num_steps += 1
        self._best, self._bad, self._bad_bound = best, bad, bound
        return factor

    def state_dict(self) -> dict:
        """Hyper-parameters, best loss, bad-step count, step counts and the search history, as
        plain Python values (``torch.load(..., weights_only=True)`` reads them back)."""
        return {
            "schema": _SCHEMA,
            "patience": self.patience, "factor": self.factor, "candidates": self.candidates,
            "trial_steps": self.trial_steps,
            "best_loss": self.best_loss, "num_bad_steps": self.num_bad_steps,
            "num_steps": self.num_steps, "num_trial_steps": self.num_trial_steps,
            "history": copy.deepcopy(self.history),  # plain floats/ints/lists only
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Load a :meth:`state_dict`; validated first, so a bad one changes nothing."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        if state_dict.get("schema") != _SCHEMA:
            raise ValueError(f"state_dict is not a LossAdaptiveLR state dict (schema {state_dict.get('schema')!r})")
        required = ("patience", "factor", "candidates", "trial_steps", "best_loss", "num_bad_steps",
                    "num_steps", "num_trial_steps", "history")
        missing = [k for k in required if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict misses {', '.join(missing)}")
        patience = _check_int("patience", state_dict["patience"], 1)
        factor = _check_factor(state_dict["factor"])
        candidates = _check_candidates(state_dict["candidates"])
        trial_steps = _check_int("trial_steps", state_dict["trial_steps"], 1)
        best = state_dict["best_loss"]
        if isinstance(best, bool) or not isinstance(best, numbers.Real):
            raise ValueError(f"best_loss must be a float, got {best!r}")
        bad = _check_int("num_bad_steps", state_dict["num_bad_steps"], 0)
        num_steps = _check_int("num_steps", state_dict["num_steps"], 0)
        num_trial_steps = _check_int("num_trial_steps", state_dict["num_trial_steps"], 0)
        history = state_dict["history"]
        if not isinstance(history, (list, tuple)) or not all(isinstance(h, Mapping) for h in history):
            raise ValueError("history must be a list of dicts")
        self.patience, self.factor, self.candidates, self.trial_steps = patience, factor, candidates, trial_steps
        device = self._best.device
        self._best = torch.tensor(float(best), dtype=torch.float64, device=device)
        self._bad = torch.tensor(bad, dtype=torch.int64, device=device)
        self._bad_bound = bad
        self.num_steps, self.num_trial_steps = num_steps, num_trial_steps
        self.history = [copy.deepcopy(dict(h)) for h in history]

    def __repr__(self):
        return (f"LossAdaptiveLR(patience={self.patience}, factor={self.factor:g}, candidates={self.candidates}, "
                f"trial_steps={self.trial_steps}, searches={len(self.history)})")

    # ---- the search ------------------------------------------------------------------------
    def _set_lrs(self, saved_lrs: list, scale: float) -> None:
        """Every group's lr = its saved value * scale (tensor lrs in place, no host sync)."""
        with torch.no_grad():
            for group, saved in zip(self.optimizer.param_groups, saved_lrs):
                lr = group["lr"]
                if isinstance(saved, torch.Tensor):
                    lr.copy_(saved * scale)
                else:
                    group["lr"] = saved * scale

    def _search(self, train_step, evaluate) -> float:
        opt = self.optimizer
        snapshot = self._snapshot
        snapshot.take(opt, self.module)
        # The lrs at the start: floats, or the snapshot's copy of a tensor lr (the live tensor
        # itself is overwritten by every candidate).
        saved_lrs = [snapshot.saved(g["lr"]) if isinstance(g["lr"], torch.Tensor) else g["lr"]
                     for g in opt.param_groups]
        lrs_before = [float(lr) for lr in saved_lrs]
        scales = [self.factor ** e for e in self.exponents]
        losses = []
        steps_taken = 0
        try:
            for scale in scales:
                self._set_lrs(saved_lrs, scale)
                for _ in range(self.trial_steps):
                    train_step()
                    steps_taken += 1
                losses.append(_as_loss_tensor("the result of evaluate()", evaluate()).clone())
                snapshot.restore(opt)
        except BaseException:
            snapshot.restore(opt)
            self._set_lrs(saved_lrs, 1.0)
            raise
        values = [float(v) for v in torch.stack([v.cpu() for v in losses]).tolist()]
        best = _best_candidate(values)
        chosen = 1.0 if best is None else scales[best]
        self._set_lrs(saved_lrs, chosen)
        self.num_trial_steps += steps_taken
        self.history.append({"step": self.num_steps, "factor": chosen, "lrs_before": lrs_before,
                             "scales": scales, "losses": values})
        return chosen
