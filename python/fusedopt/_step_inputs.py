"""One-step inputs and outputs: copies into a param or its state, SAM's grad mix, and saves of
the state into a snapshot, that the next ``step()`` does inside its own pass over memory instead
of a separate one.

SAM restores ``w`` right before the base step, and LossAdaptiveLR restores the optimizer state
before the next trial's step. Done as copies, each is a full pass over memory ahead of the step's
own pass; handed to the step instead (the table columns ``COL_*_FROM`` / ``COL_GRAD_MIX`` of
csrc/fusedopt/tensor_table.h), the CPU kernel copies each sub-piece of the saved values into
an L1 scratch, updates it there and streams the result to the live buffer (whose stale contents
are then never read), and reads the mixed grad from a per-thread scratch: a restore costs the
step one more read stream.

LossAdaptiveLR's snapshot of the optimizer state is the same in reverse (``COL_*_TO``): the
next step saves the values it is about to update into the snapshot buffers, with streaming
stores, before updating them, so the snapshot costs the step one more write stream instead of a
read and a write pass (params are still copied at once: anything may move them before the
step, SAM's first step for one; the state only this optimizer's step changes, and every other
way to it, ``optimizer.state``, flushes first). When a step both restores and saves a buffer,
the restore comes first (a snapshot taken after a restore saves the restored values), and a
save must not wait behind a later restore: deferring a restore flushes the pending saves.

The results are the same bits as the copies (and as ``torch.lerp_`` for the mix, up to torch's
own fused multiply-add, see sam.py). Whatever a step cannot take is done as plain copies before
its kernels run: CUDA or DTensor buckets, params updated through a stand-in, 8-bit states, params
without a grad this step, a step GradScaler may skip (``found_inf``), a grad mix under global-norm
clipping (the norm must see the mixed grads). Reading ``optimizer.state`` (``state_dict()``,
a snapshot) or a failed step does them too, so no one can see a value that is still pending.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import _backend as B
from . import _multi_tensor

_EXTRA_KEYS = {B.MASTER: "master_param", B.KAHAN: "kahan_comp"}
_LIVE_COLUMN = {B.COL_PARAM_FROM: B.COL_PARAM, B.COL_EXTRA_FROM: B.COL_EXTRA, B.COL_STATE0_FROM: B.COL_STATE0,
                B.COL_STATE1_FROM: B.COL_STATE1, B.COL_STATE2_FROM: B.COL_STATE2, B.COL_EXTRA_TO: B.COL_EXTRA,
                B.COL_STATE0_TO: B.COL_STATE0, B.COL_STATE1_TO: B.COL_STATE1, B.COL_STATE2_TO: B.COL_STATE2}
_SAVE_COLUMN = {B.COL_EXTRA_FROM: B.COL_EXTRA_TO, B.COL_STATE0_FROM: B.COL_STATE0_TO,
                B.COL_STATE1_FROM: B.COL_STATE1_TO, B.COL_STATE2_FROM: B.COL_STATE2_TO}


@dataclass
class _Copy:
    param: torch.Tensor   # whose row holds the live buffer
    column: int           # a COL_*_FROM column (a restore) or COL_*_TO column (a save)
    dst: torch.Tensor     # restore: the live buffer (the param or one of its state tensors)
    src: torch.Tensor     # save: the live buffer

    @property
    def live(self) -> torch.Tensor:
        return self.src if self.column in _SAVE_COLUMN.values() else self.dst


@dataclass
class _Mix:
    param: torch.Tensor
    mix: torch.Tensor     # the grad becomes torch.lerp(grad, mix, weight)
    weight: float


@dataclass
class Pending:
    copies: dict = field(default_factory=dict)  # dst.data_ptr() -> _Copy (restores)
    mixes: dict = field(default_factory=dict)   # id(param) -> _Mix
    saves: dict = field(default_factory=dict)   # dst.data_ptr() -> _Copy (saves of the live src)

    def __bool__(self) -> bool:
        return bool(self.copies or self.mixes or self.saves)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()
            and B.is_dense(a.shape, a.stride()))


def _live_buffers(optimizer, *, params: bool) -> dict:
    """data_ptr -> (param, COL_*_FROM column, the live tensor) for the optimizer's params (when
    ``params``), full-precision moments and master/Kahan buffers."""
    where = {}
    for group in optimizer.param_groups:
        keys = optimizer._moment_keys(group)
        for p in group["params"]:
            if params:
                where[p.data_ptr()] = (p, B.COL_PARAM_FROM, p)
            state = optimizer._state.get(p)
            if not state:
                continue
            for k, key in enumerate(keys):
                t = state.get(key)
                if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:
                    where[t.data_ptr()] = (p, B.COL_STATE0_FROM + k, t)
            for key in _EXTRA_KEYS.values():
                t = state.get(key)
                if isinstance(t, torch.Tensor):
                    where[t.data_ptr()] = (p, B.COL_EXTRA_FROM, t)
    return where


def defer_copies(optimizer, pairs, pending: Pending, *, params: bool) -> list:
    """Takes the ``(dst, src)`` pairs whose dst is (a view of the whole of) one of the
    optimizer's params (when ``params``), moments or master/Kahan buffers, on the CPU with src in
    dst's layout; returns the rest, for the caller to copy now."""
    if pending.saves:  # saves requested earlier see the values from before this restore
        flush(pending)
    where = _live_buffers(optimizer, params=params)
    rest = []
    for dst, src in pairs:
        found = where.get(dst.data_ptr()) if dst.device.type == "cpu" else None
        if found is None or not (_same_layout(dst, found[2]) and _same_layout(dst, src)):
            rest.append((dst, src))
            continue
        pending.copies[dst.data_ptr()] = _Copy(found[0], found[1], dst, src)
    return rest


def defer_saves(optimizer, pairs, pending: Pending) -> list:
    """Takes the ``(dst, src)`` pairs whose src is (a view of the whole of) one of the
    optimizer's moments or master/Kahan buffers, on the CPU with dst in src's layout: the next
    step saves src's values from before its update into dst. Returns the rest, for the caller to
    copy now. (A restore already pending into src is done first, by the same step.)"""
    where = _live_buffers(optimizer, params=False)
    rest = []
    for dst, src in pairs:
        found = where.get(src.data_ptr()) if src.device.type == "cpu" else None
        if found is None or dst.data_ptr() in pending.saves or not (_same_layout(src, found[2]) and _same_layout(dst, src)):
            rest.append((dst, src))
            continue
        pending.saves[dst.data_ptr()] = _Copy(found[0], _SAVE_COLUMN[found[1]], dst, src)
    return rest


def defer_grad_mix(pending: Pending, params, mixes, weight: float) -> list:
    """Takes ``grad = torch.lerp(grad, mix, weight)`` for CPU params whose grad and mix share
    the param's layout; returns the ``(param, mix)`` pairs it did not take."""
    rest = []
    for p, m in zip(params, mixes):
        g = p.grad
        if g is None or p.device.type != "cpu" or not (_same_layout(g, m) and g.stride() == p.stride()):
            rest.append((p, m))
            continue
        pending.mixes[id(p)] = _Mix(p, m, float(weight))
    return rest


@torch.no_grad()
def flush(pending: Pending) -> None:
    """Does everything pending as plain copies and lerps (restores before saves, as a step
    would)."""
    if pending.copies:
        _multi_tensor.copy_([c.dst for c in pending.copies.values()], [c.src for c in pending.copies.values()])
    if pending.saves:
        _multi_tensor.copy_([c.dst for c in pending.saves.values()], [c.src for c in pending.saves.values()])
    by_weight: dict[float, tuple[list, list]] = {}
    for m in pending.mixes.values():
        if m.param.grad is not None:
            grads, mixes = by_weight.setdefault(m.weight, ([], []))
            grads.append(m.param.grad)
            mixes.append(m.mix)
    for weight, (grads, mixes) in by_weight.items():
        torch._foreach_lerp_(grads, mixes, weight)
    pending.copies.clear()
    pending.mixes.clear()
    pending.saves.clear()


def attach(pending: Pending, plan, *, mix_allowed: bool) -> tuple[list, list]:
    """Writes what the plan's buckets can take into their tables, flushes the rest, and returns
    the buckets written to (``detach`` them after the kernels) and the tensors whose addresses
    were written (to keep alive until then). A pointer is written only where the row's live
    buffer is the very tensor the input was meant for."""
    touched, keep = [], []
    for b in plan.buckets:
        if b.device.type != "cpu" or b.dtensor:
            continue
        staged = {id(p) for p, _ in b.writebacks}
        rows = None
        for copies, outside in ((pending.copies, "src"), (pending.saves, "dst")):
            for key, c in list(copies.items()):
                if c.column not in (B.COL_PARAM_FROM, B.COL_EXTRA_FROM, B.COL_EXTRA_TO) and b.state_dtype == torch.uint8:
                    continue
                if rows is None:
                    rows = {id(p): i for i, p in enumerate(b.params)}
                row = rows.get(id(c.param))
                if row is None or id(c.param) in staged or b.table[row, _LIVE_COLUMN[c.column]] != c.live.data_ptr():
                    continue
                other = getattr(c, outside)
                b.table[row, c.column] = other.data_ptr()
                keep.append(other)
                del copies[key]
                if not touched or touched[-1] is not b:
                    touched.append(b)
        if not mix_allowed:
            continue
        for key, m in list(pending.mixes.items()):
            if rows is None:
                rows = {id(p): i for i, p in enumerate(b.params)}
            row = rows.get(id(m.param))
            g = m.param.grad
            if row is None or id(m.param) in staged or g is None or b.table[row, B.COL_GRAD] != g.data_ptr():
                continue
            b.table[row, B.COL_GRAD_MIX] = m.mix.data_ptr()
            b.table[row, B.COL_GRAD_MIX_WEIGHT] = np.float64(m.weight).view(np.int64)
            keep.append(m.mix)
            del pending.mixes[key]
            if not touched or touched[-1] is not b:
                touched.append(b)
    flush(pending)
    return touched, keep


def detach(buckets) -> None:
    """Zeroes the one-step columns again."""
    for b in buckets:
        b.table[:, list(B.INPUT_FROM_COLUMNS)] = 0
