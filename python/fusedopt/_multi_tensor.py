"""Multi-tensor helpers outside the optimizer step (weight averaging, norms): validate, bucket
by (device, dtype), one kernel call per bucket."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from . import _backend as B


def average_(avgs: list[torch.Tensor], srcs: list[torch.Tensor], weight: float) -> None:
    """avg += weight * (src - avg) for each pair; avgs are float32, srcs float32/bf16/fp16, of
    the same shape, device and memory layout (contiguous or the same dense permutation)."""
    if len(avgs) != len(srcs):
        raise ValueError(f"avgs has {len(avgs)} tensors, srcs has {len(srcs)}")
    buckets = defaultdict(lambda: ([], [], []))
    for i, (a, s) in enumerate(zip(avgs, srcs)):
        if a.dtype != torch.float32:
            raise ValueError(f"avgs[{i}] must be float32, got {a.dtype}")
        if s.dtype not in B.AVERAGE_SOURCE_DTYPES:
            raise ValueError(f"srcs[{i}] has unsupported dtype {s.dtype}")
        if a.shape != s.shape or a.device != s.device or a.stride() != s.stride():
            raise ValueError(f"avgs[{i}] and srcs[{i}] must have the same shape, device and layout")
        if not B.is_dense(a.shape, a.stride()):
            raise ValueError(f"avgs[{i}] must be dense in memory")
        ptrs_a, ptrs_s, numels = buckets[(a.device, s.dtype)]
        ptrs_a.append(a.data_ptr())
        ptrs_s.append(s.data_ptr())
        numels.append(a.numel())
    for (device, dtype), (pa, ps, n) in buckets.items():
        args = (np.asarray(pa, np.int64), np.asarray(ps, np.int64), np.asarray(n, np.int64),
                B.TORCH_DTYPE_CODES[dtype], float(weight))
        B.module_for(device).average(*args, **B.launch_kwargs(device))



def cpu_sum_squares(ptrs: np.ndarray, numels: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Sum of squares (float64, a 0-dim CPU tensor) of dense CPU tensors of one dtype given by
    their addresses and element counts: one multi-threaded pass of the CPU kernels, the same
    bits for any thread count."""
    return torch.tensor(B._C.sum_squares(ptrs, numels, B.TORCH_DTYPE_CODES[dtype], B.num_threads()),
                        dtype=torch.float64)


def copy_(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """dst.copy_(src) for each pair of the same shape, dtype, device and dense layout (contiguous
    or the same permutation of it); bit for bit. CPU pairs go through one call of the CPU
    module (all threads over all pairs, streaming stores where the instruction set has them);
    others through torch._foreach_copy_, one call per device."""
    if len(dsts) != len(srcs):
        raise ValueError(f"dsts has {len(dsts)} tensors, srcs has {len(srcs)}")
    cpu, other = ([], [], []), defaultdict(lambda: ([], []))
    for i, (d, s) in enumerate(zip(dsts, srcs)):
        if d.shape != s.shape or d.dtype != s.dtype or d.device != s.device or d.stride() != s.stride():
            raise ValueError(f"dsts[{i}] and srcs[{i}] must have the same shape, dtype, device and layout")
        if d.device.type == "cpu" and B.is_dense(d.shape, d.stride()):
            cpu[0].append(d.data_ptr())
            cpu[1].append(s.data_ptr())
            cpu[2].append(d.numel() * d.element_size())
        else:
            other[d.device][0].append(d)
            other[d.device][1].append(s)
    if cpu[0]:
        B._C.copy(*(np.asarray(x, np.int64) for x in cpu), B.num_threads())
    for d, s in other.values():
        torch._foreach_copy_(d, s)


def sam_perturb_(params: list[torch.Tensor], saved: list[torch.Tensor], grads: list[torch.Tensor], scale: float,
                 adaptive: bool) -> None:
    """SAM's first step on CPU tensors of one dtype (fusedopt/sam.h): ``saved = p`` bit for bit,
    then ``p += scale * (p**2 if adaptive else 1) * g``, in one pass. Same shape, dtype and dense
    layout for the three lists; one call of the CPU kernels."""
    if not (len(params) == len(saved) == len(grads)):
        raise ValueError(f"params, saved and grads have {len(params)}, {len(saved)} and {len(grads)} tensors")
    dtype = params[0].dtype if params else torch.float32
    for i, (p, w, g) in enumerate(zip(params, saved, grads)):
        for name, t in (("saved", w), ("grads", g)):
            if t.shape != p.shape or t.dtype != dtype or t.device.type != "cpu" or t.stride() != p.stride():
                raise ValueError(f"{name}[{i}] must have params[{i}]'s shape, dtype ({dtype}) and layout, on the CPU")
        if p.device.type != "cpu" or p.dtype != dtype or not B.is_dense(p.shape, p.stride()):
            raise ValueError(f"params[{i}] must be a dense CPU tensor of dtype {dtype}")
    if not params:
        return
    ptrs = [np.asarray([t.data_ptr() for t in ts], np.int64) for ts in (params, saved, grads)]
    numels = np.asarray([p.numel() for p in params], np.int64)
    B._C.sam_perturb(*ptrs, numels, B.TORCH_DTYPE_CODES[dtype], float(scale), bool(adaptive), B.num_threads())
