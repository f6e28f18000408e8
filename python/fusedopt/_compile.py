"""torch.compile support: the kernels as ``torch.library`` custom ops, and the step that
Dynamo traces instead of the eager one.

Eager ``step()`` keeps a cached NumPy pointer table and patches it per step, which Dynamo
cannot trace. Under ``torch.compile`` (``torch.compiler.is_compiling()``), ``step()`` calls
:func:`compiled_step` instead, which

1. runs ``FusedOptimizer._init_group`` (:func:`init_group`) to validate every param and
   create missing state. Dynamo runs a method of that name *eagerly at trace time* (as it
   does for torch's own optimizers), then guards on the state's structure and hands the
   traced code the params, grads and state tensors as graph inputs: state creation costs
   no graph break and no extra recompile;
2. buckets the tensors by (device, dtype, state dtype, precision path, variant) and calls
   one op per bucket, ``fusedopt::step_`` (the algorithm an int argument), with tensor lists
   and scalars (``mutates_args`` declared, so AOTAutograd functionalizes them and Inductor
   re-inplaces them). The op builds the same int64 pointer table as the eager path and calls
   the same ``_C`` / ``_C_cuda`` kernel, so compiled and eager steps give the same bits;
3. passes a tensor ``lr`` (and ``grad_scale``/``found_inf`` of ``torch.amp.GradScaler`` and
   the clip coefficient) as tensors, so a scheduler that updates a tensor lr in place
   causes no recompile. A float lr is a constant of the graph: changing it recompiles, as
   for torch's optimizers.

``max_grad_norm`` uses ``fusedopt::sum_squares`` (the eager path's deterministic reduction)
and ``track_stats`` passes its sum buffer to the step op, both inside the graph. Publishing
``opt.last_grad_norm`` and ``opt.stats()`` is an attribute store on the optimizer, which
Dynamo does not replay, so it runs after the graph in one ``torch.compiler.disable``d call:
one graph break per step, only when one of these two features is on.

What the traced path does not handle falls back to the eager step through one
``torch.compiler.disable``d call (a graph break, with the eager path's clear errors):
a closure, tensor ``betas``, DTensor params, params that are strided views (not dense in
memory), anything ``_validate`` rejects, and the first step of SGD with momentum and
``dampening != 0`` (its momentum buffer must start as the grad; with ``dampening == 0`` a
zero buffer gives the same first update). After such a fallback the state exists, so the
next trace takes the op path.

Limits: the op builds its pointer table on every call (a Python loop over the tensors, a
few microseconds per tensor, where the eager path patches a cached table in C); a float lr
or any other float hyper-parameter changed between calls recompiles; Inductor may fuse the
clip factor's float64 arithmetic differently from eager (last-bit differences in the clip
coefficient); an SGD whose eager first step was skipped by ``found_inf`` and whose next step
is compiled starts its momentum as ``(1 - dampening) * grad``.
"""
from __future__ import annotations

import inspect
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import _backend as B
from . import _distributed as D
from ._norms import clip_norm_and_factor, on_device, stats_from_sums

__all__ = ["step_", "sum_squares", "compiled_step", "init_group"]


# ---- the custom ops ------------------------------------------------------------------------
def _ptr(t: Optional[Tensor], device: torch.device, what: str) -> int:
    if t is None:
        return 0
    if t.dtype != torch.float32 or t.numel() != 1 or t.device != device:
        raise RuntimeError(f"fusedopt: {what} must be a 1-element float32 tensor on {device}, "
                           f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t.data_ptr()


def _column(table: np.ndarray, col: int, tensors: list[Tensor], like: list[Tensor], what: str, dtype=None,
            device=None) -> None:
    """Fills a pointer column from `tensors` (one per row, or none), checking that each has
    its param's shape and strides, so the kernel can walk both as one flat array."""
    if not tensors:
        return
    if len(tensors) != len(like):
        raise RuntimeError(f"fusedopt: {len(tensors)} {what} for {len(like)} params")
    ptrs = []
    for t, p in zip(tensors, like):
        if t.shape != p.shape or (t.stride() != p.stride() and p.numel() > 1) or t.device != device:
            raise RuntimeError(f"fusedopt: {what} of shape {tuple(t.shape)}, strides {t.stride()} on {t.device} "
                               f"does not match its param ({tuple(p.shape)}, {p.stride()}, {p.device})")
        if dtype is not None and t.dtype != dtype:
            raise RuntimeError(f"fusedopt: {what} must be {dtype}, got {t.dtype}")
        ptrs.append(t.data_ptr())
    table[:, col] = ptrs


def _run_step(algorithm: int, params, grads, state0, state1, state2, extras, steps, lrs, groups, group_seeds,
              group_index, param_index, state_dtype, precision, variant, grad_scale, found_inf, clip_coef,
              stats) -> None:
    n = len(params)
    if n == 0:
        return
    device, pdtype = params[0].device, params[0].dtype
    sdtype = _CODE_DTYPES[state_dtype]
    for p in params:
        if p.device != device or p.dtype != pdtype:
            raise RuntimeError("fusedopt: the params of one step call must share device and dtype")
        if not B.is_dense(p.shape, p.stride()):
            raise RuntimeError(f"fusedopt: param of shape {tuple(p.shape)} is not dense in memory")
    if len(group_index) != n or len(param_index) != n:
        raise RuntimeError("fusedopt: group_index and param_index need one entry per param")
    table = np.zeros((n, B.TABLE_COLUMNS), dtype=np.int64)
    table[:, B.COL_PARAM] = [p.data_ptr() for p in params]
    _column(table, B.COL_GRAD, grads, params, "grads", pdtype, device)
    if len(grads) != n:
        raise RuntimeError("fusedopt: one grad per param is needed")
    _column(table, B.COL_STATE0, state0, params, "state 0", sdtype, device)
    _column(table, B.COL_STATE1, state1, params, "state 1", sdtype, device)
    _column(table, B.COL_STATE2, state2, params, "state 2", sdtype, device)
    if extras:
        extra_dtype = torch.float32 if precision == B.MASTER else pdtype
        _column(table, B.COL_EXTRA, extras, params, "master/compensation buffers", extra_dtype, device)
    if steps:
        if len(steps) != n:
            raise RuntimeError("fusedopt: one step tensor per param is needed")
        table[:, B.COL_STEP] = [_ptr(s, device, "step") for s in steps]
    table[:, B.COL_NUMEL] = [p.numel() for p in params]
    table[:, B.COL_GROUP] = group_index
    table[:, B.COL_PARAM_INDEX] = param_index
    table[:, B.COL_SEED] = [group_seeds[g] for g in group_index]
    lr_ptrs = [_ptr(lr, device, "tensor lr") if lr is not None else 0 for lr in lrs]
    table[:, B.COL_LR] = [lr_ptrs[g] for g in group_index]
    group_table = np.asarray(groups, dtype=np.float64).reshape(-1, B.GROUP_FIELDS)
    kwargs = dict(grad_scale=_ptr(grad_scale, device, "grad_scale"), found_inf=_ptr(found_inf, device, "found_inf"),
                  clip_coef=_ptr(clip_coef, device, "clip coefficient"))
    if stats is not None:
        if stats.dtype != torch.float64 or stats.device != device or not stats.is_contiguous():
            raise RuntimeError("fusedopt: stats must be a contiguous float64 tensor on the params' device")
        kwargs["stats"] = stats.data_ptr()
    kwargs.update(B.launch_kwargs(device))
    B.module_for(device).step(algorithm, table, group_table, B.TORCH_DTYPE_CODES[pdtype], state_dtype, precision,
                              variant, **kwargs)


_CODE_DTYPES = {code: dt for dt, code in B.TORCH_DTYPE_CODES.items()}


@torch.library.custom_op("fusedopt::step_", mutates_args=("params", "state0", "state1", "state2", "extras", "steps",
                                                         "stats"))
def step_(algorithm: int, params: list[Tensor], grads: list[Tensor], state0: list[Tensor], state1: list[Tensor],
          state2: list[Tensor], extras: list[Tensor], steps: list[Tensor], lrs: list[Optional[Tensor]],
          groups: list[float], group_seeds: list[int], group_index: list[int], param_index: list[int],
          state_dtype: int, precision: int, variant: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
          clip_coef: Optional[Tensor], stats: Optional[Tensor]) -> None:
    """One fused step of `algorithm` (an id of csrc/fusedopt/algorithms.h) over tensors of one
    device and dtype.

    ``state0..2`` are the algorithm's state buffers in its order (empty lists for those it
    does not keep); ``groups`` is the flattened (n_groups x GROUP_FIELDS) hyper-parameter table
    of ``_group_row``; ``lrs[g]`` a float32 lr tensor on the params' device for group ``g``
    (read by the kernel) or None (the table's lr); ``group_index``/``param_index`` give each
    tensor's group and its index over all groups (stochastic rounding key). Empty
    ``extras``/``steps`` mean none. SGD's momentum buffers are updated as after the first step."""
    _run_step(algorithm, params, grads, state0, state1, state2, extras, steps, lrs, groups, group_seeds, group_index,
              param_index, state_dtype, precision, variant, grad_scale, found_inf, clip_coef, stats)


@step_.register_fake
def _(algorithm, params, grads, state0, state1, state2, extras, steps, lrs, groups, group_seeds, group_index,
      param_index, state_dtype, precision, variant, grad_scale, found_inf, clip_coef, stats) -> None:
    return None


@torch.library.custom_op("fusedopt::sum_squares", mutates_args=())
def sum_squares(tensors: list[Tensor]) -> Tensor:
    """Sum of squares of tensors of one device and dtype, by the eager path's deterministic
    reduction: a 0-dim float64 tensor on their device."""
    device, dtype = tensors[0].device, tensors[0].dtype
    for t in tensors:
        if t.device != device or t.dtype != dtype or not B.is_dense(t.shape, t.stride()):
            raise RuntimeError("fusedopt: sum_squares needs dense tensors of one device and dtype")
    ptrs = np.asarray([t.data_ptr() for t in tensors], dtype=np.int64)
    numels = np.asarray([t.numel() for t in tensors], dtype=np.int64)
    code = B.TORCH_DTYPE_CODES[dtype]
    if device.type == "cpu":
        return torch.tensor(B._C.sum_squares(ptrs, numels, code, B.num_threads()), dtype=torch.float64)
    mod = B.module_for(device)
    workspace = torch.empty(mod.sum_squares_workspace_size(), dtype=torch.float64, device=device)  # per call
    out = torch.empty((), dtype=torch.float64, device=device)
    mod.sum_squares(ptrs, numels, code, out.data_ptr(), workspace.data_ptr(), **B.launch_kwargs(device))
    return out


@sum_squares.register_fake
def _(tensors):
    return tensors[0].new_empty((), dtype=torch.float64)


# ---- state initialisation (run eagerly by Dynamo at trace time) -------------------------------
def _sgd_first_step_differs(opt, group, state) -> bool:
    """SGD's momentum buffer starts as the grad. The op path starts it at zero instead, which
    is the same update when dampening is 0 (momentum * 0 + 1 * g == g); otherwise the first
    step must go through the eager path."""
    if opt._algorithm != B.SGD or not opt._variant(group):
        return False
    return float(group.get("dampening", 0)) != 0.0 and not isinstance(state.get("momentum_buffer"), Tensor)


def init_group(opt, params: list, grads: list, state0: list, state1: list, state2: list, extras: list,
               steps: list):
    """``FusedOptimizer._init_group``: validates every param with a grad (over all groups)
    and creates its missing state like the eager step does. Appends each such param and its
    grad to ``params``/``grads``, and those of its moments, master/compensation buffer and
    step tensor that it has to ``state0``/``state1``/``state2``/``extras``/``steps`` (the
    lists hold tensors only). Returns ``(None, entries)``, one entry per param:
    ``(group index, param index over all groups, i0, i1, i2, i_extra, i_step)``, the ``i``
    being positions in those lists or -1; or ``(reason, ())`` when the step must take the
    eager path, and then nothing was changed or appended.

    Dynamo calls this eagerly at trace time (as it does for torch's optimizers' method of
    this name) and hands the filled lists to the traced code as graph inputs; without Dynamo
    it is an ordinary function."""
    todo = []
    for gi, j, k, p, g in opt._walk_params():
        if g is None:
            continue
        group = opt.param_groups[gi]
        state = opt.state.get(p, {})
        try:
            sd, precision = opt._validate(gi, j, p, g, state, group)[:2]
        except (ValueError, RuntimeError) as e:
            return f"invalid input: {e}", ()
        if D.is_dtensor(p):
            return "DTensor params (sharded steps run eagerly)", ()
        if not B.is_dense(p.shape, p.stride()):
            return "a param is a strided view (not dense in memory)", ()
        if _sgd_first_step_differs(opt, group, state):
            return "first step of SGD with momentum and dampening", ()
        todo.append((gi, k, p, g, sd, precision))
    entries = []
    for gi, k, p, g, sd, precision in todo:
        group = opt.param_groups[gi]
        state = opt.state.get(p)
        fresh = state is None
        state = {} if fresh else state
        opt._prepare_state(group, p, p.detach(), state, sd, precision)
        if fresh and state:
            opt.state[p] = state  # torch keeps no entry for a param without state
            state = opt.state[p]
        moments = [state[m] for m in opt._moment_keys(group)]
        moments += [None] * (3 - len(moments))
        extra = state.get("master_param") if precision == B.MASTER else (
            state.get("kahan_comp") if precision == B.KAHAN else None)
        step = state.get("step") if opt._uses_step(group) else None
        params.append(p)
        grads.append(g)
        where = []
        for lst, t in zip((state0, state1, state2, extras, steps), (*moments, extra, step)):
            where.append(len(lst) if t is not None else -1)
            if t is not None:
                lst.append(t)
        entries.append((gi, k, *where))
    return None, tuple(entries)


# ---- the traced step -------------------------------------------------------------------------
@torch.compiler.disable
def _eager_step(opt, closure):
    """The eager step (without the optimizer hooks, which the traced call already runs)."""
    with torch.no_grad():
        return inspect.unwrap(type(opt).step)(opt, closure)


def compiled_step(opt, closure=None):
    """``FusedOptimizer.step`` while Dynamo traces it; see the module docstring."""
    if closure is not None or opt._eager_only or any(g.get("state_dtype") == torch.uint8 for g in opt.param_groups):
        return _eager_step(opt, closure)
    for group in opt.param_groups:
        if any(isinstance(b, Tensor) for b in group.get("betas", ())):
            return _eager_step(opt, None)
    params, grads, state0, state1, state2, extras, steps = [], [], [], [], [], [], []
    reason, entries = opt._init_group(params, grads, state0, state1, state2, extras, steps)
    if reason is not None:
        return _eager_step(opt, None)
    if not entries:
        return None

    # Group table and per-group seeds and lrs, read here so Dynamo guards on them.
    groups, seeds, group_lrs = [], [], []
    for group in opt.param_groups:
        lr = group["lr"]
        groups += opt._group_row(group, 0.0 if isinstance(lr, Tensor) else float(lr))
        seeds.append(int(group.get("seed", 0)))
        group_lrs.append(lr if isinstance(lr, Tensor) else None)

    # Buckets by (device, param dtype, state dtype, precision, variant), in first-seen order
    # as the eager plan makes them (the clip norm adds the buckets' sums in this order).
    lists = (state0, state1, state2, extras, steps)
    buckets: dict = {}
    for i, (gi, k, *where) in enumerate(entries):
        group = opt.param_groups[gi]
        p, g = params[i], grads[i]
        if g.stride() != p.stride() and p.numel() > 1:
            g = torch.empty_like(p).copy_(g)  # the param's layout, for this step only
        sd = state0[where[0]].dtype if where[0] >= 0 else opt._state_dtype(group, p, {})
        key = (str(p.device), p.dtype, sd, opt._precision(group), bool(opt._variant(group)))
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = dict(device=p.device, params=[], grads=[], groups=[], indices=[],
                                         tensors=([], [], [], [], []))
        bucket["params"].append(p)
        bucket["grads"].append(g)
        bucket["groups"].append(gi)
        bucket["indices"].append(k)
        for lst, out, j in zip(lists, bucket["tensors"], where):
            if j >= 0:
                out.append(lst[j])

    grad_scale = getattr(opt, "grad_scale", None)
    found_inf = getattr(opt, "found_inf", None)
    clip = {}
    if opt.defaults.get("max_grad_norm"):
        clip = _clip_coefficients(opt, buckets, grad_scale)
    stats = {}
    if opt.defaults.get("track_stats"):
        n_groups = len(opt.param_groups)
        for b in buckets.values():
            dev = b["device"]
            if str(dev) not in stats:
                stats[str(dev)] = torch.zeros((n_groups, 4), dtype=torch.float64, device=dev)

    for key, b in buckets.items():
        _, _, sd, precision, variant = key
        dev = b["device"]
        s0, s1, s2, ex, st = b["tensors"]
        common = dict(
            lrs=[None if lr is None else lr.to(device=dev, dtype=torch.float32) for lr in group_lrs],
            groups=groups, group_seeds=seeds, group_index=b["groups"], param_index=b["indices"],
            state_dtype=B.STATE_DTYPE_CODES[sd], precision=precision, grad_scale=on_device(grad_scale, dev),
            found_inf=on_device(found_inf, dev), clip_coef=clip.get(str(dev)), stats=stats.get(str(dev)))
        torch.ops.fusedopt.step_(opt._algorithm, b["params"], b["grads"], s0, s1, s2, ex, st, variant=variant,
                                 **common)

    if "norm" in clip or stats:
        _publish(opt, clip.get("norm"), _finish_stats(stats, grad_scale) if stats else None)
    return None


def _finish_stats(sums: dict, grad_scale) -> list[dict]:
    """The per-group norms of ``stats()`` from the kernels' sums (the eager step's math)."""
    parts = list(sums.values())
    home = parts[0].device
    total = parts[0] if len(parts) == 1 else torch.stack([s.to(home) for s in parts]).sum(0)
    return stats_from_sums(total, grad_scale)


@torch.compiler.disable
def _publish(opt, last_grad_norm, stats) -> None:
    """Sets ``opt.last_grad_norm`` and what ``opt.stats()`` returns. Outside the graph: Dynamo
    does not replay attribute stores on optimizer objects (torch 2.13 drops them silently),
    so this costs one graph break per step, only with ``max_grad_norm`` or ``track_stats``."""
    if last_grad_norm is not None:
        opt.last_grad_norm = last_grad_norm
    if stats is not None:
        opt._last_stats = stats


def _clip_coefficients(opt, buckets: dict, grad_scale) -> dict:
    """The eager path's global-norm clip factor (same reduction, same float64 arithmetic),
    per device, as device tensors."""
    max_norm = opt.defaults.get("max_grad_norm")
    sums = [torch.ops.fusedopt.sum_squares(b["grads"]) for b in buckets.values()]
    home = next(iter(buckets.values()))["device"]
    total = torch.stack([s.to(home, dtype=torch.float64) for s in sums]).sum()
    norm, coef = clip_norm_and_factor(total, grad_scale, max_norm)
    out = {str(b["device"]): on_device(coef, b["device"]) for b in buckets.values()}
    out["norm"] = norm
    return out
