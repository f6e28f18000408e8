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

