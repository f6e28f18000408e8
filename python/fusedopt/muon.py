"""Muon (orthogonalised momentum for weight matrices) with AdamW groups in the same optimizer,
single-process, DDP (``process_group=``) and FSDP2 (DTensor params).

The math, state (``momentum_buffer``) and validation wording are ``torch.optim.Muon``'s; the
speed comes from structure. Matrices of the same shape are stacked into one ``[n, rows, cols]``
bf16 tensor and each Newton-Schulz iteration is one ``bmm`` + two ``baddbmm`` calls for all of
them (on the CPU, for cache-sized batches of them: see ``CPU_BATCH_ELEMENTS``, in bf16
buffers kept across steps, with torch's own GEMM operand layouts so the bits match); the
elementwise work (momentum, weight decay, the scaled update, the precision paths) is one
``torch._foreach_*`` call per bucket, and the Nesterov blend is lerped straight into the bf16
stack; ``use_muon=False`` groups are stepped by one ``fusedopt.functional.adamw_`` call per
(device, dtype, hyper-parameters) bucket.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:  # DTensor (FSDP2 params) is public from torch 2.5 on
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = Shard = None

from . import functional as F

__all__ = ["Muon", "muon_param_groups", "newton_schulz"]

_ADJUST_LR_FNS = ("original", "match_rms_adamw")
_SHAPE_MODES = ("flatten", "batch")
_ADAMW_BETAS = (0.9, 0.95)
_ADAMW_EPS = 1e-8
_UNSUPPORTED = ("state_dtype", "weight_decay_mode")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


# ---- the math --------------------------------------------------------------------------------
def newton_schulz(x: Tensor, coefficients=(3.4445, -4.775, 2.0315), steps: int = 5, eps: float = 1e-7,
                  workspace: "_Workspace | None" = None) -> Tensor:
    """Orthogonalises each matrix of the stack ``x`` (``[n, rows, cols]``) as torch.optim.Muon's
    ``_zeropower_via_newtonschulz`` does one matrix: in bf16, on the wide orientation
    (transposed when rows > cols), after dividing by the Frobenius norm clamped at ``eps``.
    Every iteration is one ``bmm`` and two ``baddbmm`` calls for the whole stack.

    On the CPU the GEMMs get torch's own operand layouts: for a tall stack, torch's first
    iteration runs on the transposed view (``Y = X^T``: the Gram matrix ``Y Y^T`` reads ``X``
    as it lies, and the update ``a Y + B Y`` is written wide and contiguous), the later ones on
    that wide copy. oneDNN's bf16 kernels sum a GEMM's products in an order that depends on
    its operands' layouts (and on the shape and thread count): a tall stack transposed in
    memory first, or run in its own layout throughout, gives the same algorithm with other
    roundings (measured: several ulps of the output at 1024 x 256 with 2 threads, 2048 x 256
    with 1). The result is ``[n, rows, cols]`` (for a tall stack, a transposed view of a wide
    one, as torch's). ``workspace`` (CPU): a :class:`_Workspace` of this stack's shape whose
    ``stack`` holds the input (normalised in place); the result lives in its buffers, valid
    until the workspace is used again."""
    if x.device.type != "cpu":
        return _newton_schulz_transposing(x, coefficients, steps, eps)
    a, b, c = coefficients
    n, rows, cols = x.shape
    if workspace is None:
        workspace = _Workspace(n, rows, cols, x.device)
    if x is not workspace.stack:
        workspace.stack.copy_(x)
    x, spare, gram, gram_update = workspace.stack, workspace.spare, workspace.gram, workspace.gram_update
    norms = torch.linalg.vector_norm(x.reshape(n, -1), dim=1).clamp_(min=eps)
    x.div_(norms[:, None, None])
    tall = rows > cols
    if tall and steps:
        # torch's first iteration on Y = X^T (a view): Y Y^T (Y^T is X itself), then
        # a Y + B Y written wide (the copy of Y that baddbmm starts from is the transpose).
        y = x.mT
        torch.bmm(y, x, out=gram)
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=gram_update)
        torch.baddbmm(y, gram_update, y, beta=a, out=spare)
        x, spare = spare, x.view(n, cols, rows)  # (the tall stack's memory, reused wide)
        steps -= 1
    for _ in range(steps):
        torch.bmm(x, x.mT, out=gram)
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=gram_update)
        torch.baddbmm(x, gram_update, x, beta=a, out=spare)
        x, spare = spare, x
    return x.mT if x.shape[1] != rows else x


class _Workspace:
    """The bf16 buffers of one CPU Newton-Schulz batch shape ``[n, rows, cols]``: the input
    stack, its ping-pong partner, the Gram matrix and its update. Kept by the optimizer across
    steps (per device and batch shape; dropped when a step no longer uses them), so a step
    allocates nothing for its GEMMs and their outputs stay in already-mapped pages."""

    __slots__ = ("stack", "spare", "gram", "gram_update")

    def __init__(self, n: int, rows: int, cols: int, device) -> None:
        side = min(rows, cols)
        self.stack = torch.empty((n, rows, cols), dtype=torch.bfloat16, device=device)
        self.spare = torch.empty((n, side, max(rows, cols)), dtype=torch.bfloat16, device=device)  # wide
        self.gram = torch.empty((n, side, side), dtype=torch.bfloat16, device=device)
        self.gram_update = torch.empty_like(self.gram)


def _newton_schulz_transposing(x: Tensor, coefficients, steps: int, eps: float) -> Tensor:
    """GPUs: a tall stack is transposed to the wide orientation first (torch's GEMMs there)."""
    a, b, c = coefficients
    x = x.to(torch.bfloat16)
    tall = x.size(-2) > x.size(-1)
    if tall:
        # (contiguous: a transposed operand takes slower GEMM and reduction paths)
        x = x.mT.contiguous()
    norms = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).clamp(min=eps)
    x = x / norms[:, None, None]
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x.mT if tall else x


def _shared_newton_schulz(stack: Tensor, coefficients, steps: int, eps: float, group) -> Tensor:
    """``newton_schulz(stack)`` with the matrices split over the ranks of ``group``: rank r
    orthogonalises matrices [r*share, (r+1)*share) of its (replicated) stack, and one
    ``all_gather`` assembles the result on every rank."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    count = stack.shape[0]
    share = -(-count // world)
    mine = stack[min(rank * share, count):min((rank + 1) * share, count)]
    out = torch.zeros((share, *stack.shape[1:]),
                      dtype=torch.bfloat16, device=stack.device)
    if mine.shape[0]:
        out[:mine.shape[0]] = newton_schulz(mine, coefficients, steps, eps)
    gathered = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(gathered, out, group=group)
    return torch.cat(gathered)[:count]


def _is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t):
    """A DTensor's local tensor (sharing its storage), or ``t`` itself."""
    return t._local_tensor if _is_dtensor(t) else t


class _Label:
    """``param j 'name' of group gi (shape, dtype, device)``, built only when formatted."""

    __slots__ = ("optimizer", "gi", "j", "p")

    def __init__(self, optimizer, gi, j, p):
        self.optimizer, self.gi, self.j, self.p = optimizer, gi, j, p

    def __format__(self, spec) -> str:
        return self.optimizer._label(self.gi, self.j, self.p)


def _mesh_group(entries):
    """The process group of the DTensor params' mesh, None when there are none."""
    meshes = list({id(e.param.device_mesh): e.param.device_mesh for e in entries if _is_dtensor(e.param)}.values())
    if not meshes:
        return None
    if len(meshes) > 1:
        raise ValueError("max_grad_norm / track_stats with DTensor params on more than one device mesh is not "
                         "supported; use one optimizer per mesh")
    return meshes[0].get_group()


def _counted_sums(entries, lists, home, mesh_group) -> list[Tensor]:
    """Per list (aligned with ``entries``), each tensor's float64 sum of squares on ``home``;
    under FSDP2 (``mesh_group``) plain params count on the mesh's first rank only (they are
    replicated there), so that an all_reduce counts every element once."""
    out = []
    for tensors in lists:
        norms = [n.to(home) for n in torch._foreach_norm(tensors, 2, dtype=torch.float32)]
        sq = torch.stack(norms).double() ** 2
        if mesh_group is not None and dist.get_rank(mesh_group) != 0:
            counted = torch.tensor([_is_dtensor(e.param) for e in entries], device=home)
            sq = sq * counted
        out.append(sq)
    return out


def _shard_offset(p) -> int:
    """Index in the full param of the local shard's first element (``Shard(0)``, torch.chunk
    sizes); 0 for a plain tensor."""
    if not _is_dtensor(p):
        return 0
    mesh = p.device_mesh
    rows = p.shape[0]
    chunk = -(-rows // mesh.size())
    return min(mesh.get_local_rank() * chunk, rows) * (p.numel() // max(rows, 1))


def _check_dtensor(label, p, g, group, defaults) -> None:
    """What the FSDP2 path takes: dim-0 shards (torch.chunk sizes) on a 1-D mesh."""
    if not _is_dtensor(g):
        raise ValueError(f"{label}: a DTensor param needs a DTensor grad, got {type(g).__name__}")
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or tuple(g.placements) != (Shard(0),):
        raise ValueError(f"{label}: DTensor params must be sharded on dim 0 over a 1-D mesh (FSDP2), got "
                         f"placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh")


def _sharded_newton_schulz(local_updates, param, rows, cols, coefficients, steps, eps) -> list[Tensor]:
    """FSDP2: the updates of same-shaped DTensor params (``Shard(0)``, local shards given)
    are assembled whole with one ``all_gather``; each rank orthogonalises its share of the
    matrices and a second ``all_gather`` returns them; each rank keeps its shard's rows."""
    mesh = param.device_mesh
    group = mesh.get_group()
    world, rank = mesh.size(), mesh.get_local_rank()
    full_rows = param.shape[0]
    chunk = -(-full_rows // world)  # torch.chunk / Shard(0) sizes: chunk, ..., the rest, then 0
    sizes = [max(0, min(full_rows, (r + 1) * chunk) - r * chunk) for r in range(world)]
    rest = tuple(param.shape[1:])
    n = len(local_updates)
    local = torch.zeros((n, chunk, *rest), dtype=torch.bfloat16, device=local_updates[0].device)
    if sizes[rank]:
        torch._foreach_copy_(list(local[:, :sizes[rank]].unbind(0)), local_updates)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    full = torch.cat([g[:, :size] for g, size in zip(gathered, sizes)], dim=1)  # [n, rows, *rest]
    ortho = _shared_newton_schulz(full.reshape(-1, rows, cols), coefficients, steps, eps, group)
    start = sum(sizes[:rank])
    mine = ortho.reshape(n, full_rows, *rest)[:, start:start + sizes[rank]]
    return list(mine.unbind(0))


def _lr_ratio(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """torch.optim.Muon's lr adjustment for a [rows, cols] matrix."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def _matrix_shape(p: Tensor, shape_mode: str | None) -> tuple[int, int]:
    """The [rows, cols] of the matrices Muon orthogonalises for ``p``."""
    if p.ndim == 2 or shape_mode is None:
        return p.shape[0], p.shape[1]
    if shape_mode == "flatten":
        return p.shape[0], math.prod(p.shape[1:])
    return p.shape[-2], p.shape[-1]  # "batch": leading dims index the matrices


# ---- the optimizer ---------------------------------------------------------------------------
@dataclass
class _Entry:
    group: int    # index of its param group
    index: int    # index over all groups (keys stochastic rounding)
    param: Tensor  # the param (the key of its state; a DTensor under FSDP2)
    grad: Tensor   # its grad's local tensor
    local: Tensor  # the param's local tensor: what the elementwise ops update


class Muon(torch.optim.Optimizer):
    """Drop-in for :class:`torch.optim.Muon` that also trains the rest of the model.

    Groups are Muon groups unless they set ``use_muon=False``: those are stepped as AdamW
    with the group's ``lr``, ``betas`` (default ``(0.9, 0.95)``), ``eps`` (default ``1e-8``)
    and ``weight_decay`` (the constructor's unless set), keeping torch AdamW's state. A Muon
    group may set ``shape_mode="flatten"`` (a >2-D param is the matrix
    ``[shape[0], prod(shape[1:])]``, e.g. conv kernels) or ``"batch"`` (a >2-D param is a
    batch of matrices over its last two dims, e.g. MoE experts). See
    :func:`muon_param_groups` to build the groups of a model.

    Precision keywords: ``max_grad_norm`` (global clip over all grads; ``last_grad_norm``),
    ``master_weights`` (bf16/fp16 params), ``stochastic_rounding`` (``seed``) and
    ``kahan_summation`` (bf16 params; Muon groups only for these two), and
    ``track_stats``. GradScaler is supported; ``p.grad`` is never written.

    ``process_group`` (replicated params, e.g. under DDP, whose grads are the same on every
    rank): the ranks of the group split the Newton-Schulz work, each orthogonalising a
    contiguous share of every shape group's matrices, and one ``all_gather`` per shape group
    brings the results to every rank. The params after a step equal those of a
    single-process step bit for bit (each matrix's GEMMs do not depend on what else is in the
    batch). Every rank must call ``step()`` with the same params having grads.

    FSDP2 (``fully_shard``: DTensor params sharded on dim 0 over a 1-D mesh) needs no keyword:
    per group of same-shaped params, one ``all_gather`` assembles the whole updates, each rank
    orthogonalises its share of the matrices, a second ``all_gather`` returns them and every
    rank updates its shard; again equal, bit for bit, to a single-process step.
    ``max_grad_norm`` and ``track_stats`` all_reduce their sums over the mesh once a step;
    stochastic rounding keys its bits by the element's index in the full param.
    """

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None,
                 *, process_group=None, **precision):
        _check_lr(lr)
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn is not None and adjust_lr_fn not in _ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        _check_newton_schulz(ns_coefficients, ns_steps)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        defaults.update(_precision_options(**precision))
        if process_group is not None and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group needs torch.distributed to be initialized")
        self.process_group = process_group
        self.last_grad_norm: Tensor | None = None
        self._last_stats = None
        self._workspaces: dict = {}  # CPU Newton-Schulz buffers per (device, batch shape); not state
        super().__init__(params, defaults)
        self.register_load_state_dict_pre_hook(Muon._remember_saved_state)
        self.register_load_state_dict_post_hook(Muon._restore_saved_dtypes)

    # ---- groups ------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Validates the group (torch's wording) before it joins; AdamW groups get their
        own ``betas``/``eps`` defaults."""
        group = param_group
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        group["params"] = params
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        use_muon = group.get("use_muon", True)
        if not isinstance(use_muon, bool):
            raise ValueError(f"use_muon must be True or False, got {use_muon!r}")
        get = lambda k: group.get(k, self.defaults.get(k))  # noqa: E731
        _check_lr(get("lr"))
        if not 0.0 <= get("weight_decay"):
            raise ValueError(f"weight decay should be >= 0 but is: {get('weight_decay')}")
        if use_muon:
            if not 0.0 <= get("momentum"):
                raise ValueError(f"momentum should be >= 0 but is: {get('momentum')}")
            if get("adjust_lr_fn") is not None and get("adjust_lr_fn") not in _ADJUST_LR_FNS:
                raise ValueError(f"Adjust learning rate function {get('adjust_lr_fn')} is not supported")
            _check_newton_schulz(get("ns_coefficients"), get("ns_steps"))
            shape_mode = group.get("shape_mode")
            if shape_mode is not None and shape_mode not in _SHAPE_MODES:
                raise ValueError(f"Invalid shape_mode: {shape_mode!r} (None, 'flatten' or 'batch')")
            for p in tensors:
                if p.ndim != 2 and not (p.ndim > 2 and shape_mode is not None):
                    raise ValueError(
                        f"Muon only supports 2D parameters whereas we found a parameter with size: {p.size()}")
        else:
            group.setdefault("betas", _ADAMW_BETAS)
            group.setdefault("eps", _ADAMW_EPS)
            beta1, beta2 = group["betas"]
            if not 0.0 <= beta1 < 1.0:
                raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
            if not 0.0 <= beta2 < 1.0:
                raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
            if not 0.0 <= group["eps"]:
                raise ValueError(f"Invalid epsilon value: {group['eps']}")
        mode = next((k for k in ("master_weights", "stochastic_rounding", "kahan_summation") if get(k)), None)
        if mode in ("stochastic_rounding", "kahan_summation") and not use_muon and tensors:
            # functional.adamw_ rounds to nearest and wants moments of the param's dtype.
            raise ValueError(f"{mode}=True is not supported in use_muon=False (AdamW) groups; "
                             "use master_weights=True")
        if mode is not None:
            allowed = _LOW_PRECISION if mode == "master_weights" else (torch.bfloat16,)
            for p in tensors:
                if p.dtype not in allowed:
                    raise ValueError(f"{mode}=True needs {' or '.join(str(d)[6:] for d in allowed)} params, "
                                     f"got a {p.dtype} param of shape {tuple(p.shape)}")
        super().add_param_group(group)

    # ---- state dicts -------------------------------------------------------------------------
    @staticmethod
    def _remember_saved_state(optimizer, state_dict):
        # torch's loader casts floating state to the param's dtype (an fp32 master copy of a
        # bf16 param would be rounded); remember what was saved to undo that.
        optimizer._saved = (state_dict["state"], [i for g in state_dict["param_groups"] for i in g["params"]])

    @staticmethod
    def _restore_saved_dtypes(optimizer):
        saved, ids = optimizer.__dict__.pop("_saved")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        adamw = {p for g in optimizer.param_groups if not g.get("use_muon", True) for p in g["params"]}
        for pid, p in zip(ids, params):
            if pid not in saved or p not in optimizer.state:
                continue
            state = optimizer.state[p]
            for key, value in saved[pid].items():
                if not isinstance(value, Tensor):
                    continue
                if key == "step":
                    # AdamW keeps its step on the CPU as torch's for-loop AdamW does (read for
                    # the bias correction without a device sync); Muon's (for SR) on the device.
                    home = torch.device("cpu") if p in adamw else p.device
                    state[key] = value.to(device=home, dtype=torch.float32)
                elif value.dtype != state[key].dtype:
                    state[key] = value.to(device=p.device)

    # ---- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step (all groups)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon_entries, adamw_entries = self._collect()  # validates everything first
        entries = muon_entries + adamw_entries
        if not entries:
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and adamw_entries and bool(found_inf):
            # The AdamW kernel takes a host step count, so a skip must be known on the host
            # (one sync on CUDA, none on the CPU); Muon-only optimizers never read it.
            return loss
        # (GradScaler sums found_inf over devices: any non-zero value means skip)
        keep = None if (found_inf is None or adamw_entries) else (found_inf == 0).float()
        self._create_state(muon_entries, adamw_entries)
        factors = self._grad_factors(entries, grad_scale)
        before = self._stats_begin(entries, grad_scale) if self.defaults.get("track_stats") else None
        if muon_entries:
            self._muon_step(muon_entries, factors, keep)
        if adamw_entries:
            self._adamw_step(adamw_entries, factors)
        if before is not None:
            self._stats_end(entries, before)
        return loss

    def _collect(self):
        """(Muon entries, AdamW entries) of the params with grads; raises, before anything
        changes, for anything the step cannot take."""
        muon, adamw = [], []
        k = 0
        for gi, group in enumerate(self.param_groups):
            use_muon = group.get("use_muon", True)
            if use_muon:
                _check_newton_schulz(group["ns_coefficients"], group["ns_steps"])
            for j, p in enumerate(group["params"]):
                if p.grad is not None:
                    self._check(gi, j, p, p.grad, group, use_muon)
                    (muon if use_muon else adamw).append(_Entry(gi, k, p, _local(p.grad), _local(p)))
                k += 1
        return muon, adamw

    def _label(self, gi: int, j: int, p: Tensor) -> str:
        names = self.param_groups[gi].get("param_names")
        name = f" '{names[j]}'" if names and j < len(names) else ""
        return f"param {j}{name} of group {gi} (shape {tuple(p.shape)}, {p.dtype}, {p.device})"

    def _check(self, gi, j, p, g, group, use_muon):
        label = _Label(self, gi, j, p)  # formatted only when a message needs it
        if p.is_complex():
            raise RuntimeError(f"{label}: Muon does not support complex parameters")
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(f"{label}: Muon does not support sparse gradients")
        if not p.is_floating_point():
            raise ValueError(f"{label}: params must be floating point")
        if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
            raise ValueError(f"{label}: grad ({tuple(g.shape)}, {g.dtype}, {g.device}) does not match the param")
        if p.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{label}: device {p.device} is not supported (cpu, cuda)")
        if _is_dtensor(p):
            _check_dtensor(label, p, g, group, self.defaults)
        state = self.state.get(p, {})
        master = bool(group.get("master_weights"))
        mp = state.get("master_param")
        if master and isinstance(mp, Tensor) and (mp.shape != p.shape or mp.dtype != torch.float32):
            raise ValueError(f"{label}: state 'master_param' has shape {tuple(mp.shape)} and dtype {mp.dtype}, "
                             f"expected {tuple(p.shape)} and torch.float32")
        if use_muon:
            if p.ndim != 2 and not (p.ndim > 2 and group.get("shape_mode") is not None):
                raise ValueError(f"{label}: Muon only supports 2D parameters whereas we found a parameter "
                                 f"with size: {p.size()}")
            comp = state.get("kahan_comp")
            if group.get("kahan_summation") and isinstance(comp, Tensor) and (comp.shape != p.shape
                                                                              or comp.dtype != p.dtype):
                raise ValueError(f"{label}: state 'kahan_comp' has shape {tuple(comp.shape)} and dtype "
                                 f"{comp.dtype}, expected {tuple(p.shape)} and {p.dtype}")
            buf = state.get("momentum_buffer")
            if isinstance(buf, Tensor) and (buf.shape != p.shape or buf.dtype not in (p.dtype, torch.float32)):
                raise ValueError(f"{label}: state 'momentum_buffer' has shape {tuple(buf.shape)} and dtype "
                                 f"{buf.dtype}, expected {tuple(p.shape)} and {p.dtype} or torch.float32")
            return
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{label}: AdamW groups take float32, bfloat16 or float16 params, not {p.dtype}")
        if not _dense(p):
            raise ValueError(f"{label}: AdamW groups need params dense in memory (not a strided view)")
        want = torch.float32 if master else p.dtype
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            if isinstance(t, Tensor) and (t.shape != p.shape or t.dtype != want):
                raise ValueError(f"{label}: state '{key}' has shape {tuple(t.shape)} and dtype {t.dtype}, "
                                 f"expected {tuple(p.shape)} and {want}")
        step = state.get("step")
        one_number = isinstance(step, (int, float)) or (isinstance(step, Tensor) and step.numel() == 1)
        if step is not None and not one_number:
            raise ValueError(f"{label}: state 'step' must be one number")

    def _create_state(self, muon_entries, adamw_entries):
        """Lazy state, after every param passed its checks."""
        for e in muon_entries:
            group, state = self.param_groups[e.group], self.state[e.param]
            master = bool(group.get("master_weights"))
            if "momentum_buffer" not in state:
                dtype = torch.float32 if master else e.param.dtype
                state["momentum_buffer"] = torch.zeros_like(e.param, dtype=dtype, memory_format=torch.preserve_format)
            if master and "master_param" not in state:
                state["master_param"] = e.param.detach().float()
            if group.get("kahan_summation") and "kahan_comp" not in state:
                state["kahan_comp"] = torch.zeros_like(e.param, memory_format=torch.preserve_format)
            if group.get("stochastic_rounding"):
                step = state.get("step")
                if not isinstance(step, Tensor) or step.device != e.param.device or step.dtype != torch.float32:
                    state["step"] = torch.tensor(0.0 if step is None else float(step), device=e.param.device)
        for e in adamw_entries:
            group, state = self.param_groups[e.group], self.state[e.param]
            master = bool(group.get("master_weights"))
            step = state.get("step")
            if not isinstance(step, Tensor) or step.device.type != "cpu" or step.dtype != torch.float32:
                state["step"] = torch.tensor(0.0 if step is None else float(step))
            dtype = torch.float32 if master else e.param.dtype
            for key in ("exp_avg", "exp_avg_sq"):
                if key not in state:
                    state[key] = torch.zeros_like(e.param, dtype=dtype, memory_format=torch.preserve_format)
                elif not _is_dtensor(e.param) and state[key].stride() != e.param.stride():
                    state[key] = torch.empty_like(e.param, dtype=dtype).copy_(state[key])
            if master and "master_param" not in state:
                state["master_param"] = e.param.detach().float()
            elif master and not _is_dtensor(e.param) and state["master_param"].stride() != e.param.stride():
                state["master_param"] = torch.empty_like(e.param, dtype=torch.float32).copy_(state["master_param"])

    def _grad_factors(self, entries, grad_scale) -> dict:
        """Per device, the 0-dim fp32 factor every grad is multiplied by (GradScaler's unscale
        times the clip factor of ``max_grad_norm``), or nothing when there is none. No sync."""
        max_norm = self.defaults.get("max_grad_norm")
        devices = list(dict.fromkeys(e.param.device for e in entries))
        if grad_scale is None and max_norm is None:
            return {}
        home = devices[0]
        factor = torch.ones((), dtype=torch.float32, device=home)
        if grad_scale is not None:
            factor = grad_scale.to(home).double().reciprocal().float()
        mesh_group = _mesh_group(entries)
        if max_norm is not None and mesh_group is not None:
            # FSDP2: each rank sums the squares of its shards (plain params, taken to be
            # replicated, on the mesh's first rank only) and one all_reduce makes it global.
            sq = _counted_sums(entries, [[e.grad for e in entries]], home, mesh_group)[0].sum()
            dist.all_reduce(sq, group=mesh_group)
            total = sq.sqrt().float() * factor
            self.last_grad_norm = total
            factor = factor * torch.clamp(max_norm / (total + 1e-6), max=1.0)
        elif max_norm is not None:
            # torch.nn.utils.clip_grad_norm_'s arithmetic: the norm of the per-tensor norms.
            norms = []
            for d in devices:
                grads = [e.grad for e in entries if e.param.device == d]
                per_tensor = torch._foreach_norm(grads, 2, dtype=torch.float32)
                norms.append(torch.linalg.vector_norm(torch.stack(per_tensor)).to(home))
            total = torch.linalg.vector_norm(torch.stack(norms)) * factor
            self.last_grad_norm = total
            factor = factor * torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return {d: factor.to(d, non_blocking=True) for d in devices}

    # ---- Muon --------------------------------------------------------------------------------
    def _muon_step(self, entries, factors, keep):
        # 1. Momentum, per (group, device, buffer dtype): one in-place foreach call.
        used_grads = {}  # id(param) -> the grad as the update uses it (unscaled, clipped, cast)
        by_bucket = defaultdict(list)
        for e in entries:
            buf = self.state[e.param]["momentum_buffer"]
            by_bucket[(e.group, e.local.device, buf.dtype)].append(e)
        for (gi, device, dtype), bucket in by_bucket.items():
            group = self.param_groups[gi]
            bufs = [_local(self.state[e.param]["momentum_buffer"]) for e in bucket]
            k = None if keep is None else keep.to(device)
            grads = _prepared_grads([e.grad for e in bucket], dtype, factors.get(device), k)
            weight = 1 - group["momentum"]
            # torch.optim.Muon: buf.lerp_(grad, 1 - momentum); a skipped step lerps by 0.
            torch._foreach_lerp_(bufs, grads, weight if k is None else weight * k)
            used_grads.update((id(e.param), g) for e, g in zip(bucket, grads))
        # 2. Newton-Schulz per (device, matrix shape, NS settings, dtype): one stack for all
        #    (on the CPU, cache-sized batches of it: see CPU_BATCH_ELEMENTS).
        by_shape = defaultdict(list)
        for e in entries:
            group = self.param_groups[e.group]
            rows, cols = _matrix_shape(e.param, group.get("shape_mode"))
            buf = self.state[e.param]["momentum_buffer"]
            # FSDP2: same global shape and mesh, so every entry has the same shard on each rank.
            sharded = (tuple(e.param.shape), e.param.device_mesh) if _is_dtensor(e.param) else None
            key = (e.local.device, rows, cols, tuple(group["ns_coefficients"]), group["ns_steps"], group["eps"],
                   buf.dtype, sharded)
            by_shape[key].append(e)
        work = {}  # id(param) -> fp32 work copy of a stochastically rounded bf16 param
        shared = self.process_group is not None and dist.get_world_size(self.process_group) > 1
        batches = []
        for key, bucket in by_shape.items():
            device, sharded = key[0], key[-1]
            local_cpu = device.type == "cpu" and sharded is None and not shared
            batches += [(key, part, local_cpu) for part in (_cache_sized(bucket) if local_cpu else [bucket])]
        # (the ones this step uses stay; an optimizer pickled before they existed has none)
        workspaces, self._workspaces = self.__dict__.get("_workspaces", {}), {}
        for (device, rows, cols, coefficients, steps, eps, _, sharded), bucket, local_cpu in batches:
            if sharded is not None:
                # The Nesterov blend is made here, one shape group at a time: its temporaries
                # are the size of one stack, not of all Muon params.
                updates = self._blend(bucket, used_grads)
                pieces = _sharded_newton_schulz(updates, bucket[0].param, rows, cols, coefficients, steps, eps)
            else:
                count = sum(e.local.numel() for e in bucket) // (rows * cols)
                workspace = None
                if local_cpu:
                    # The CPU keeps each batch shape's buffers across steps (a fresh 1-4 MiB
                    # temporary comes back from malloc as unmapped pages: faulting them in
                    # cost as much as the op that wrote them). Batches run one after the
                    # other and _apply below uses each result up before the next batch of
                    # the same shape overwrites it.
                    wkey = (device, count, rows, cols)
                    workspace = workspaces.get(wkey) or self._workspaces.get(wkey)
                    if workspace is None:
                        workspace = _Workspace(count, rows, cols, device)
                    self._workspaces[wkey] = workspace
                    stack = workspace.stack
                else:
                    stack = torch.empty((count, rows, cols), dtype=torch.bfloat16, device=device)
                # The blend is written straight into the bf16 stack: torch's
                # `grad.lerp(buf, momentum).bfloat16()` rounding, in one pass and no temporary.
                self._blend(bucket, used_grads, out=_split_like(stack, bucket))
                if shared:
                    ortho = _shared_newton_schulz(stack, coefficients, steps, eps, self.process_group)
                elif workspace is not None:
                    ortho = newton_schulz(stack, coefficients, steps, eps, workspace)
                else:
                    ortho = newton_schulz(stack, coefficients, steps, eps)
                del stack
                pieces = _split_like(ortho, bucket)
            # 3. Weight decay and the scaled update, per group's run of the bucket.
            self._apply(bucket, pieces, rows, cols, keep, work)
        self._write_back(entries, work, keep)

    def _blend(self, bucket, used_grads, out=None) -> list[Tensor]:
        """The update each entry orthogonalises: torch's ``grad.lerp(buf, momentum)`` with
        Nesterov, else the buffer; one foreach call per group's run of the bucket. ``out``
        (one tensor per entry, any float dtype): written there instead (one lerp per entry,
        rounded once into ``out``'s dtype, the bits of lerp-then-cast) and returned."""
        runs = defaultdict(list)
        for i, e in enumerate(bucket):
            runs[e.group].append(i)
        result = [None] * len(bucket) if out is None else out
        for gi, idx in runs.items():
            group = self.param_groups[gi]
            bufs = [_local(self.state[bucket[i].param]["momentum_buffer"]) for i in idx]
            if out is not None:
                if group["nesterov"]:
                    for i, buf in zip(idx, bufs):
                        torch.lerp(used_grads[id(bucket[i].param)], buf, group["momentum"], out=out[i])
                else:
                    torch._foreach_copy_([out[i] for i in idx], bufs)
                continue
            if group["nesterov"]:
                bufs = torch._foreach_lerp([used_grads[id(bucket[i].param)] for i in idx], bufs, group["momentum"])
            for i, u in zip(idx, bufs):
                result[i] = u
        return result

    def _targets(self, bucket, work):
        """The tensors the update is added to: fp32 masters, fp32 work copies of SR params, or
        the params themselves."""
        out = []
        for e in bucket:
            group = self.param_groups[e.group]
            if group.get("master_weights"):
                out.append(_local(self.state[e.param]["master_param"]))
            elif group.get("stochastic_rounding") or group.get("kahan_summation"):
                out.append(work.setdefault(id(e.param), e.local.detach().float()))
            else:
                out.append(e.local)
        return out

    def _apply(self, bucket, pieces, rows, cols, keep, work):
        """Weight decay, then ``target += -lr * ratio * piece`` for every entry (``pieces``: its
        orthogonalised update, in the target's shape), one foreach call per group's run."""
        runs = defaultdict(list)  # group -> [(entry, piece)]
        for e, piece in zip(bucket, pieces):
            runs[e.group].append((e, piece))
        for gi, run in runs.items():
            group = self.param_groups[gi]
            device = run[0][0].local.device
            targets = self._targets([e for e, _ in run], work)
            pieces = [piece for _, piece in run]
            lr = group["lr"]
            if isinstance(lr, Tensor):
                lr = lr.to(device, non_blocking=True)
            k = None if keep is None else keep.to(device)
            if group["weight_decay"] != 0:
                decay = lr * group["weight_decay"]
                if k is not None:
                    decay = decay * k  # a skipped step multiplies by exactly 1
                factor = 1 - decay
                if not isinstance(factor, Tensor):
                    # A Python scalar would be rounded to a bf16/fp16 target's dtype by the
                    # foreach kernel (0.998 -> 0.9961); torch's `p.mul_(1 - lr*wd)` keeps it
                    # in fp32, as a 0-dim fp32 tensor does here.
                    factor = torch.tensor(factor, dtype=torch.float32, device=device)
                torch._foreach_mul_(targets, factor)
            alpha = -lr * _lr_ratio(group["adjust_lr_fn"], rows, cols)
            if k is None and not isinstance(alpha, Tensor):
                # torch's own `param.add_(update, alpha=-adjusted_lr)`, as one multi-tensor call.
                torch._foreach_add_(targets, pieces, alpha=alpha)
                continue
            if k is not None:
                alpha = alpha * k  # a skipped step adds exactly 0
            dtype = torch.promote_types(targets[0].dtype, torch.float32)
            scaled = torch.cat([piece.reshape(-1) for piece in pieces]).to(dtype).mul_(alpha)
            torch._foreach_add_(targets, [x.view(t.shape) for x, t in
                                          zip(scaled.split([t.numel() for t in targets]), targets)])

    def _write_back(self, entries, work, keep):
        """Masters are rounded to nearest into the params; fp32 work copies stochastically
        (SR) or with a Kahan compensation."""
        masters = [(e.local, _local(self.state[e.param]["master_param"])) for e in entries
                   if self.param_groups[e.group].get("master_weights")]
        if masters:
            torch._foreach_copy_([p for p, _ in masters], [m for _, m in masters])
        if not work:
            return
        by_device, kahan = defaultdict(list), defaultdict(list)
        for e in entries:
            if id(e.param) in work:
                kahan_group = self.param_groups[e.group].get("kahan_summation")
                (kahan if kahan_group else by_device)[e.local.device].append(e)
        for device, bucket in kahan.items():
            _kahan_store([e.local for e in bucket], [_local(self.state[e.param]["kahan_comp"]) for e in bucket],
                         [work[id(e.param)] for e in bucket], None if keep is None else keep.to(device))
        for device, bucket in by_device.items():
            steps = [self.state[e.param]["step"] for e in bucket]
            # (a skipped step leaves the count, and SR of the unchanged values is exact)
            torch._foreach_add_(steps, 1.0 if keep is None else keep.to(device))
            seeds = [self.param_groups[e.group]["seed"] for e in bucket]
            _stochastic_round_into([e.local for e in bucket], [work[id(e.param)] for e in bucket],
                                   seeds, [e.index for e in bucket], steps, [_shard_offset(e.param) for e in bucket])

    # ---- AdamW groups ------------------------------------------------------------------------
    def _adamw_step(self, entries, factors):
        buckets = defaultdict(list)
        for e in entries:
            group, state = self.param_groups[e.group], self.state[e.param]
            lr = group["lr"]
            lr = float(lr) if isinstance(lr, Tensor) else lr  # (a CUDA tensor lr syncs here)
            master = bool(group.get("master_weights"))
            key = (e.local.device, e.param.dtype, master, lr, tuple(group["betas"]), group["eps"],
                   group["weight_decay"], int(state["step"]))
            buckets[key].append(e)
        for (device, dtype, master, lr, (beta1, beta2), eps, weight_decay, step), bucket in buckets.items():
            states = [{k: _local(v) for k, v in self.state[e.param].items()} for e in bucket]
            targets = [s["master_param"] for s in states] if master else [e.local for e in bucket]
            grads = _prepared_grads([e.grad for e in bucket], targets[0].dtype, factors.get(device), None,
                                    like=targets)
            F.adamw_(targets, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                     step=step + 1, lr=lr, beta1=float(beta1), beta2=float(beta2), eps=eps,
                     weight_decay=weight_decay)
            torch._foreach_add_([s["step"] for s in states], 1.0)
            if master:
                torch._foreach_copy_([e.local for e in bucket], targets)

    # ---- track_stats -------------------------------------------------------------------------
    def _stats_begin(self, entries, grad_scale):
        home = entries[0].local.device
        mesh_group = _mesh_group(entries)
        grad_sq = _counted_sums(entries, [[e.grad for e in entries]], home, mesh_group)[0]
        if grad_scale is not None:
            grad_sq = grad_sq / grad_scale.double().to(home) ** 2
        before = [e.local.detach().to(torch.float32, copy=True) for e in entries]
        return grad_sq, before

    def _stats_end(self, entries, begin):
        grad_sq, before = begin
        home = entries[0].local.device
        mesh_group = _mesh_group(entries)
        after = [e.local.detach().float() for e in entries]
        diff = torch._foreach_sub(after, before)
        per_entry = _counted_sums(entries, [after, diff, before], home, mesh_group)
        n = len(self.param_groups)
        index = torch.tensor([e.group for e in entries], device=home)
        sums = torch.zeros((4, n), dtype=torch.float64, device=home)
        for row, values in enumerate([grad_sq] + per_entry):
            sums[row].index_add_(0, index, values)
        if mesh_group is not None:
            dist.all_reduce(sums, group=mesh_group)  # FSDP2: one collective for all groups' sums
        roots = sums.sqrt()
        ratio = roots[2] / roots[3]
        self._last_stats = [{"grad_norm": roots[0, i].float(), "param_norm": roots[1, i].float(),
                             "update_ratio": ratio[i].float()} for i in range(n)]

    def stats(self) -> list[dict]:
        """Per param group, from the last step: ``grad_norm`` (after unscaling, before
        clipping), ``param_norm`` (after the step), ``update_ratio``
        (||p_after - p_before|| / ||p_before||), 0-dim fp32 tensors; needs ``track_stats=True``."""
        if not self.defaults.get("track_stats"):
            raise RuntimeError("stats() needs the optimizer to be built with track_stats=True")
        if self._last_stats is None:
            raise RuntimeError("stats() is available after the first step()")
        return self._last_stats


# ---- helpers ---------------------------------------------------------------------------------
def _check_lr(lr) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        value = float(lr) if lr.device.type == "cpu" else 0.0  # (construction only: no sync on CUDA)
    else:
        value = lr
    if not 0.0 <= value:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")


def _check_newton_schulz(coefficients, steps) -> None:
    if isinstance(steps, int) and steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"Invalid ns_steps value: {steps} (an int >= 0)")
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")


def _precision_options(max_grad_norm=None, master_weights=False, stochastic_rounding=False, kahan_summation=False,
                       seed=None, track_stats=False, **other) -> dict:
    for key in _UNSUPPORTED:
        if key in other:
            if other[key] in (None, False):
                other.pop(key)
                continue
            raise ValueError(f"{key} is not supported by fusedopt.Muon")
    if other:
        raise TypeError(f"Muon.__init__() got an unexpected keyword argument '{next(iter(other))}'")
    out = {}
    modes = [k for k, v in (("master_weights", master_weights), ("stochastic_rounding", stochastic_rounding),
                            ("kahan_summation", kahan_summation)) if v]
    if len(modes) > 1:
        raise ValueError(f"{' and '.join(modes)} are mutually exclusive: choose one precision path")
    if kahan_summation:
        out["kahan_summation"] = True
    if max_grad_norm is not None:
        if not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm} (a finite number > 0)")
        out["max_grad_norm"] = float(max_grad_norm)
    if master_weights:
        out["master_weights"] = True
    if stochastic_rounding:
        out["stochastic_rounding"] = True
        seed = torch.initial_seed() if seed is None else seed
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"Invalid seed value: {seed} (a non-negative int)")
        out["seed"] = seed % (1 << 63)
    elif seed is not None:
        raise ValueError("seed is only used with stochastic_rounding=True")
    if track_stats:
        out["track_stats"] = True
    return out


def _dense(t: Tensor) -> bool:
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _prepared_grads(grads, dtype, factor, keep, like=None):
    """The grads as the update uses them, never written in place: in ``dtype``, times
    ``factor`` (unscale and clip), and zeroed where ``keep`` is 0 (a GradScaler-skipped step:
    an inf/NaN grad times 0 would still be NaN). One flat buffer and O(1) ops per bucket.
    ``like`` gives the layouts the results must have (default: the grads')."""
    if factor is None and keep is None and all(g.dtype == dtype for g in grads):
        if like is None or all(g.stride() == t.stride() for g, t in zip(grads, like)):
            return grads
    flat = torch.cat([g.reshape(-1) for g in grads]).to(dtype)
    if factor is not None:
        flat = flat * factor.to(dtype)
    if keep is not None:
        flat = torch.where(keep.bool(), flat, 0)
    like = grads if like is None else like
    out = []
    for piece, t in zip(flat.split([g.numel() for g in grads]), like):
        piece = piece.view(t.shape)
        out.append(piece if t.is_contiguous() else torch.empty_like(t, dtype=dtype).copy_(piece))
    return out


# CPU only: a shape group's Newton-Schulz runs in batches of at most this many elements
# (1 Mi bf16 elements: 2 MiB, half an L2 of the Xeon measured). All 15 GEMMs of a batch then
# work in cache; one batch of eight 512 x 2048 matrices streams each iteration through memory
# and measured 25-35% slower than eight single ones, while small matrices (overhead-bound)
# gain from being batched. GPUs take each shape group in one batch.
CPU_BATCH_ELEMENTS = 1 << 20


def _cache_sized(bucket) -> list[list]:
    """``bucket`` cut into runs of whole entries of at most CPU_BATCH_ELEMENTS (at least one)."""
    parts, current, size = [], [], 0
    for e in bucket:
        n = e.local.numel()
        if current and size + n > CPU_BATCH_ELEMENTS:
            parts.append(current)
            current, size = [], 0
        current.append(e)
        size += n
    parts.append(current)
    return parts


def _split_like(stack: Tensor, run) -> list[Tensor]:
    """Splits a stack of matrices into one tensor per entry, in the param's shape."""
    out, at = [], 0
    for e in run:
        n = e.local.numel() // (stack.shape[1] * stack.shape[2])
        piece = stack[at:at + n]
        out.append(piece.view(e.local.shape) if piece.is_contiguous() else piece.reshape(e.local.shape))
        at += n
    return out


def _kahan_store(params, comps, works, keep) -> None:
    """The precision.h ``store_kahan`` on whole buckets (flat, O(1) ops): ``delta = (updated -
    old) + comp``, the param rounds ``old + delta`` to nearest, comp keeps what it dropped.
    Where ``keep`` is 0 (a skipped step) params and compensations keep their bits."""
    sizes = [p.numel() for p in params]
    old = torch.cat([p.reshape(-1) for p in params]).float()
    old_comp = torch.cat([c.reshape(-1) for c in comps])
    delta = (torch.cat([w.reshape(-1) for w in works]) - old).add_(old_comp.float())
    written = (old + delta).to(params[0].dtype)
    comp = (delta - (written.float() - old)).to(comps[0].dtype)
    if keep is not None:
        written = torch.where(keep.bool(), written, old.to(written.dtype))
        comp = torch.where(keep.bool(), comp, old_comp)
    torch._foreach_copy_(params, [x.view(p.shape) for x, p in zip(written.split(sizes), params)])
    torch._foreach_copy_(comps, [x.view(c.shape) for x, c in zip(comp.split(sizes), comps)])


_MASK32 = 0xFFFFFFFF


def _mix32(h: Tensor) -> Tensor:
    """A xorshift-multiply 32-bit integer hash on int64 tensors holding values < 2**32: the
    multipliers are < 2**31, so no product overflows."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x4C8CA68B) & _MASK32
    return h ^ (h >> 16)


def _stochastic_round_into(params, works, seeds, indices, steps, offsets=None):
    """Writes the fp32 ``works`` into the bf16 ``params`` with stochastic rounding whose random
    bits are a pure function of (seed, param index, step, element index), on the device and
    without a host sync: add 16 random bits below the bf16 mantissa, then truncate.
    ``offsets``: index in the full param of each local shard's first element (FSDP2), so a
    sharded run draws the bits of a single-process one."""
    device = params[0].device
    sizes = [w.numel() for w in works]
    flat = torch.cat([w.reshape(-1) for w in works])
    numels = torch.tensor(sizes, device=device)
    owner = torch.repeat_interleave(torch.arange(len(works), device=device), numels)
    first = torch.cumsum(numels, 0) - numels
    if offsets is not None:
        first = first - torch.tensor(offsets, device=device)
    element = torch.arange(flat.numel(), device=device) - first[owner]
    seed = torch.tensor([(s & _MASK32) ^ (s >> 32 & _MASK32) for s in seeds], device=device)
    key = _mix32(seed ^ _mix32(torch.tensor(indices, device=device)))
    key = _mix32(key ^ torch.stack(steps).to(device).long())
    bits = _mix32(key[owner] ^ _mix32(element & _MASK32)) & 0xFFFF
    as_int = flat.view(torch.int32).long()
    # Sign-magnitude: adding to the pattern rounds the magnitude up with probability
    # (dropped bits) / 2**16; the result stays within int32 for every finite float.
    rounded = torch.where(torch.isfinite(flat), (as_int + bits) & ~0xFFFF, as_int).to(torch.int32)
    result = rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
    torch._foreach_copy_(params, [piece.view(p.shape) for piece, p in zip(result.split(sizes), params)])


# ---- param groups for a model ----------------------------------------------------------------
def muon_param_groups(module: nn.Module, lr: float, weight_decay: float = 0.1, adamw_lr: float | None = None,
                      no_muon=(nn.Embedding,)) -> list[dict]:
    """Param groups that train a whole model with one :class:`Muon`.

    Matrices (params with >= 2 dims) go to Muon, except the params of modules of the
    ``no_muon`` classes and of the output layer: the ``nn.Linear`` whose weight is tied to an
    ``nn.Embedding`` if there is one, else the last ``nn.Linear`` in ``module.modules()``
    order. Everything else (biases, norms, embeddings, the head) goes to a ``use_muon=False``
    (AdamW) group at ``adamw_lr`` (default ``lr``). Params with more than 2 dims (conv kernels)
    get their own Muon group with ``shape_mode="flatten"``. Every trainable param appears once
    (tied params once); frozen ones are left out; empty groups are omitted.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    classes = (no_muon,) if isinstance(no_muon, type) else tuple(no_muon)
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    tied = [m for m in linears if id(m.weight) in embeddings]
    head = tied[0] if tied else (linears[-1] if linears else None)
    excluded = set()
    for m in module.modules():
        if isinstance(m, classes) or m is head:
            excluded.update(id(p) for p in m.parameters(recurse=False))
    matrices, kernels, rest = [], [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in excluded:
            rest.append(p)
        else:
            (matrices if p.ndim == 2 else kernels).append(p)
    groups = [
        dict(params=matrices, lr=lr, weight_decay=weight_decay),
        dict(params=kernels, lr=lr, weight_decay=weight_decay, shape_mode="flatten"),
        dict(params=rest, lr=lr if adamw_lr is None else adamw_lr, weight_decay=weight_decay, use_muon=False),
    ]
    return [g for g in groups if g["params"]]
