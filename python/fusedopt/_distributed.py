"""DTensor params (FSDP2 ``fully_shard``, tensor parallel): the step on each rank's local shard.

The kernels never see a DTensor. ``_build_plan`` puts the *local* tensors of params, grads and
state into the pointer table (a DTensor's own ``data_ptr()`` is 0: it has no storage), so a
bucket is still one kernel call. What has to be global stays global:

* **State** is created from the DTensor param (``torch.zeros_like(dtensor)``), so it is a
  DTensor with the param's mesh and placements, as torch.optim keeps it, and
  ``torch.distributed.checkpoint`` (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``)
  saves and reshards it. State that arrives as a plain tensor of the full shape (a
  non-distributed state dict) or with other placements is brought to the param's layout
  (:func:`adopt_state`), without communication for the plain case.
* **Norms** (``max_grad_norm``, ``track_stats``): each rank sums squares over its shards, and
  one ``all_reduce`` over the mesh makes the sums global (:func:`all_reduce_sums`). An element
  must be counted once: shards of a param that is ``Replicate`` on some mesh dim are counted
  only on the ranks at coordinate 0 of those dims, and plain (non-DTensor) params next to
  DTensor params are taken to be replicated (DDP/TP convention) and counted on the mesh's
  first rank. Rows this rank does not count go to a bucket of their own whose kernel call
  gets no stats buffer and whose grads the clipping norm skips (:func:`counted`); this split
  happens only when a norm is asked for and such rows exist (tensor parallel, HSDP).
* **Stochastic rounding** keys its bits by the element's index in the full param
  (``COL_RNG_OFFSET`` + index in the row). :func:`rng_offset` gives the global row-major index
  of the local shard's first element; that is exact when the shard is one contiguous range of
  the flattened param: ``Shard(0)`` (FSDP2, nested ``Shard(0)`` on several mesh dims, uneven
  shards included), ``Replicate``, and ``Shard(d)`` where all dims before ``d`` have size 1.
  Other layouts (``Shard(1)`` of a matrix, FSDP2+TP's ``_StridedShard``) are rejected with a
  clear error when stochastic rounding is on, and are fine otherwise.

Plain tensors never reach this module on the hot path: the reuse check of a plan with no
DTensor is the C ``refresh_grads`` loop as before. Buckets holding DTensors use
:func:`refresh_grads` here instead (the C loop would read the wrapper's null pointer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _backend as B

try:  # torch.distributed is optional in torch builds; DTensor is public from torch 2.5 on
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    try:
        import torch.distributed as dist
        from torch.distributed._tensor import DTensor, Replicate, Shard
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
    except ImportError:
        dist = None
        DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The local shard of a DTensor (sharing its storage), or ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


def _describe(k: int, p) -> str:
    return f"DTensor param {k} (global shape {tuple(p.shape)}, placements {tuple(p.placements)}, {p.dtype})"


@dataclass
class MeshInfo:
    """What a plan with DTensor params needs to make partial sums global."""
    mesh: object                # the DeviceMesh of every DTensor param
    group: object               # process group spanning the whole mesh (None: the default group)
    norms: bool                 # max_grad_norm or track_stats is on: rows are split by `counted`
    first_rank: bool            # this rank is at coordinate 0 of every mesh dim


def mesh_info(entries, defaults: dict) -> MeshInfo | None:
    """None when no param is a DTensor (the plan is the plain one). Otherwise checks every
    DTensor entry ``(group index, param index, param, grad, state dtype, precision)`` of
    ``_build_plan``'s first pass, before anything is changed, and says how this rank's partial
    norms become global. Raises when a norm is asked for and the DTensor params do not share
    one mesh: one collective could not cover them."""
    if DTensor is None:
        return None
    meshes = []
    for _, k, p, g, _, precision in entries:
        if isinstance(p, DTensor):
            _check(k, p, g, precision)
            if not any(m is p.device_mesh for m in meshes):
                meshes.append(p.device_mesh)
    if not meshes:
        return None
    mesh = meshes[0]
    norms = bool(defaults.get("max_grad_norm") or defaults.get("track_stats"))
    if norms and any(m != mesh for m in meshes[1:]):
        raise ValueError("max_grad_norm / track_stats with DTensor params on more than one device mesh is not "
                         f"supported (got meshes {meshes}); use one optimizer per mesh")
    coordinate = mesh.get_coordinate()
    return MeshInfo(mesh, _group(mesh) if norms else None, norms,
                    coordinate is not None and all(c == 0 for c in coordinate))


def _check(k: int, p, g, precision: int) -> None:
    if any(pl.is_partial() for pl in p.placements):
        raise ValueError(f"{_describe(k, p)}: a param with Partial placement is not supported")
    lp = p._local_tensor
    if not B.is_dense(lp.shape, lp.stride()):
        raise ValueError(f"{_describe(k, p)}: its local shard is a strided view (strides {lp.stride()}); "
                         "fusedopt needs the local shard dense in memory")
    if not is_dtensor(g):
        raise ValueError(f"{_describe(k, p)}: its grad is a plain {type(g).__name__} of shape {tuple(g.shape)}; "
                         "a DTensor param needs a DTensor grad")
    rng_offset(k, p, precision == B.STOCHASTIC)  # raises when stochastic rounding cannot be sharding-free


def _group(mesh):
    """A process group over all ranks of `mesh`, for the one all_reduce of a step."""
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return None  # the default group holds exactly the mesh's ranks
    if mesh.mesh_dim_names:
        return mesh._flatten().get_group()
    raise ValueError(f"max_grad_norm / track_stats need a group over the whole mesh {mesh}: give the mesh "
                     "mesh_dim_names (so it can be flattened) or make it span all ranks")


def counted(p, info: MeshInfo | None) -> bool:
    """Whether this rank's rows of `p` enter the global norms (each element once)."""
    if info is None or not info.norms:
        return True
    if not is_dtensor(p):
        return info.first_rank  # a plain param next to DTensors: replicated, counted once
    coordinate = p.device_mesh.get_coordinate()
    return all(c == 0 for c, pl in zip(coordinate, p.placements) if pl.is_replicate())


def local_param(k: int, p):
    """The local shard the kernel updates in place (dense in memory: checked by mesh_info)."""
    return p._local_tensor.detach()


def local_grad(k: int, p, g):
    """The grad's local shard laid out like the param's. A grad with other placements (e.g.
    Partial) is redistributed to the param's (a collective: every rank builds its plan in
    the same step)."""
    if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
        g = g.redistribute(p.device_mesh, p.placements)
    return g._local_tensor


def adopt_state(k: int, p, state: dict) -> None:
    """Brings loaded state to the param's mesh, placements and local strides: a plain tensor
    of the full shape is cut to this rank's shard (a copy, no communication), a DTensor with
    other placements is redistributed."""
    lp = p._local_tensor
    for key, t in list(state.items()):
        # (Tensors of another shape are not the kernel's: `_validate` has judged those it uses.)
        if key == "step" or not isinstance(t, torch.Tensor) or t.shape != p.shape:
            continue
        if not is_dtensor(t):
            if not _blocks(p.placements):
                raise ValueError(f"{_describe(k, p)}: state '{key}' is a plain tensor; for this layout load a "
                                 "state dict of DTensors (torch.distributed.checkpoint)")
            local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            block = t[tuple(slice(o, o + n) for o, n in zip(offset, local_shape))]
            state[key] = t = torch.empty_like(p.detach(), dtype=t.dtype)
            t._local_tensor.copy_(block)
        elif t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(p.placements):
            state[key] = t = t.redistribute(p.device_mesh, p.placements)
        lt = t._local_tensor
        if lt.shape != lp.shape or (lt.stride() != lp.stride() and lp.numel() > 1):
            state[key] = torch.empty_like(p.detach(), dtype=t.dtype).copy_(t)


def local_state(t, layout: torch.Tensor):
    """A state tensor's local shard, checked against the param's (the kernel walks both as one
    flat array)."""
    if t is None:
        return None
    lt = local(t)
    if lt.shape != layout.shape or (lt.stride() != layout.stride() and layout.numel() > 1):
        raise RuntimeError(f"fusedopt: local state shard {tuple(lt.shape)}/{lt.stride()} does not match the "
                           f"param's local shard {tuple(layout.shape)}/{layout.stride()}")
    return lt


def _blocks(placements) -> bool:
    """Plain Shard/Replicate placements (exact types: the _StridedShard of FSDP2 + TP is a Shard
    subclass in some torch versions): each rank's shard is then one block of the param."""
    return all(type(pl) is Shard or type(pl) is Replicate for pl in placements)


def rng_offset(k: int, p, required: bool) -> int:
    """Global (row-major) index of the first element of this rank's shard of `p`, so that
    stochastic rounding draws the same bits for an element however `p` is sharded. Raises
    when `required` (stochastic rounding on) and the shard is not one contiguous range of
    the flattened param; returns 0 then otherwise (the column is unused)."""
    shape = tuple(p.shape)
    if p._local_tensor.numel() == 0:
        return 0
    ok = _blocks(p.placements)
    if ok:
        local_shape, offset = compute_local_shape_and_global_offset(shape, p.device_mesh, p.placements)
        # Contiguous in the flattened param: dims before the first partial one hold a single
        # index, dims after it are whole.
        partial = [d for d in range(len(shape)) if local_shape[d] != shape[d]]
        first = partial[0] if partial else 0
        ok = all(local_shape[d] == 1 for d in range(first)) and all(d == first for d in partial)
        if ok:
            strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
            return sum(o * s for o, s in zip(offset, strides))
    if required:
        raise ValueError(f"{_describe(k, p)}: stochastic_rounding needs each rank's shard to be one contiguous "
                         "range of the flattened param (Shard(0) as FSDP2 does, or Replicate), so that its "
                         "random bits do not depend on the sharding")
    return 0


def all_reduce_sums(sums: torch.Tensor, info: MeshInfo | None) -> torch.Tensor:
    """Sums `sums` (a small float64 tensor holding every partial sum of the step) over the
    mesh in one collective; identity without DTensor params. No host sync on CUDA."""
    if info is None or not info.norms:
        return sums
    dist.all_reduce(sums.view(-1), op=dist.ReduceOp.SUM, group=info.group)
    return sums


def refresh_grads(bucket) -> bool:
    """The Python twin of ``_C.refresh_grads`` for buckets with DTensor rows: checks every
    param's local shard still has the address the plan recorded and that its grad is a
    contiguous local shard of the same placements, dtype and size, and fills the grad column.
    False sends the step to a full rebuild."""
    table = bucket.table
    dtype = bucket.param_dtype
    for i, p in enumerate(bucket.params):
        g = p.grad
        if g is None:
            return False
        if isinstance(p, DTensor):
            if (not isinstance(g, DTensor) or g.placements != p.placements or g.device_mesh != p.device_mesh
                    or p._local_tensor.data_ptr() != table[i, B.COL_PARAM]):
                return False
            g = g._local_tensor
        elif isinstance(g, DTensor) or p.data_ptr() != table[i, B.COL_PARAM]:
            return False
        if g.dtype != dtype or g.numel() != table[i, B.COL_NUMEL] or not g.is_contiguous():
            return False
        table[i, B.COL_GRAD] = g.data_ptr()
    return True
