"""Functional multi-tensor updates for trainers that own their storage: lists of CPU/CUDA
torch tensors or CPU NumPy arrays, updated in place, one kernel call per (device, dtype)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from . import _backend as B


def _describe(x) -> tuple:
    """(device, dtype code, address, shape, strides-in-elements) of a tensor or array."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in B.TORCH_DTYPE_CODES:
            raise ValueError(f"dtype {x.dtype} is not supported (float32, float64, bfloat16, float16)")
        if x.layout != torch.strided:
            raise ValueError("sparse tensors are not supported")
        return (x.device, B.TORCH_DTYPE_CODES[x.dtype], x.data_ptr(), tuple(x.shape), x.stride(), x.numel())
    if isinstance(x, np.ndarray):
        if x.dtype not in B.NUMPY_DTYPE_CODES:
            raise ValueError(f"NumPy dtype {x.dtype} is not supported (float32, float64, float16)")
        if not x.flags.c_contiguous:
            raise ValueError("NumPy arrays must be C-contiguous")
        return (torch.device("cpu"), B.NUMPY_DTYPE_CODES[x.dtype], x.__array_interface__["data"][0], x.shape,
                tuple(s // x.itemsize for s in x.strides), x.size)
    raise TypeError(f"expected torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _writable(x, what, i):
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        raise ValueError(f"{what}[{i}] is read-only")


def _run(algorithm: int, lists: dict, group_row: list, variant: bool, flags: int, step: int | None):
    """Validates every list against `params`, then one kernel call per (device, dtype)."""
    names = list(lists)
    params = lists["params"]
    n = len(params)
    for name in names:
        if len(lists[name]) != n:
            raise ValueError(f"{name} has {len(lists[name])} entries, params has {n}")
    rows = defaultdict(list)
    for i in range(n):
        dp = _describe(params[i])
        device, code, _, shape, strides, numel = dp
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"params[{i}]: device {device} is not supported")
        if not B.is_dense(shape, strides):
            raise ValueError(f"params[{i}]: must be dense in memory (contiguous or a permutation of it)")
        row = [0] * B.TABLE_COLUMNS
        for name, col in zip(names, (B.COL_PARAM, B.COL_GRAD, B.COL_STATE0, B.COL_STATE1)):
            d = _describe(lists[name][i])
            if d[0] != device or d[3] != shape or d[4] != strides:
                raise ValueError(f"{name}[{i}] must match params[{i}] in device, shape and layout "
                                 f"(got {d[0]}, {d[3]}; params[{i}] is {device}, {shape})")
            if d[1] != code:
                raise ValueError(f"{name}[{i}] must have the dtype of params[{i}]")
            if name != "grads":
                _writable(lists[name][i], name, i)
            row[col] = d[2]
        row[B.COL_NUMEL] = numel
        row[B.COL_PARAM_INDEX] = i
        row[B.COL_FLAGS] = flags
        rows[(device, code)].append(row)
    groups = np.asarray([group_row], dtype=np.float64)
    for (device, code), r in rows.items():
        table = np.asarray(r, dtype=np.int64)
        steps = None
        if step is not None:
            # The kernels advance a per-tensor counter before using it: start one below.
            steps = torch.full((len(r),), float(step - 1), dtype=torch.float32, device=device)
            table[:, B.COL_STEP] = steps.data_ptr() + 4 * np.arange(len(r), dtype=np.int64)
        mod = B.module_for(device)
        mod.step(algorithm, table, groups, code, code, B.PLAIN, variant, **B.launch_kwargs(device))
        if steps is not None and device.type == "cuda":
            steps = None  # the kernel has been enqueued; the caching allocator keeps the block stream-ordered


def _check_adam(step, lr, beta1, beta2, eps, weight_decay):
    if not (isinstance(step, int) and step >= 1):
        raise ValueError(f"Invalid step: {step} (the step number after this update, starting at 1)")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _adam(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, maximize, mode):
    _check_adam(step, lr, beta1, beta2, eps, weight_decay)
    row = B.group_row(lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, wd_mode=mode,
                      maximize=maximize)
    lists = dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    _run(B.ADAM, lists, row, False, 0, step)


def adamw_(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay, maximize=False):
    """AdamW (decoupled decay) in place; `step` is the step number after this update (>= 1)."""
    _adam(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, maximize, B.DECOUPLED)


def adam_(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay, maximize=False):
    """Adam (L2 decay added to the grad) in place; same arguments as :func:`adamw_`."""
    _adam(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, maximize, B.COUPLED)


def sgd_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize=False,
         first_step):
    """SGD in place. With momentum, `first_step=True` sets the buffers to the (decayed) grad,
    as torch does when it creates them; `momentum_buffers` may be None when momentum == 0."""
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    row = B.group_row(lr, beta1=momentum, beta2=dampening, weight_decay=weight_decay, wd_mode=B.COUPLED,
                      maximize=maximize, nesterov=nesterov)
    lists = dict(params=params, grads=grads)
    if momentum != 0:
        if momentum_buffers is None:
            raise ValueError("momentum_buffers is required when momentum != 0")
        lists["momentum_buffers"] = momentum_buffers
    _run(B.SGD, lists, row, momentum != 0, B.FLAG_FIRST_STEP if first_step else 0, None)
