"""Adam and AdamW: torch.optim's signatures and state, one fused kernel call per bucket."""
from __future__ import annotations

import torch

from . import _backend as B
from ._optimizer import FusedOptimizer, check_lr, check_weight_decay, precision_defaults


def _as_float(x):
    return float(x) if isinstance(x, torch.Tensor) else x


def _check_betas(betas):
    """torch's rules for tensor betas: both floats or both 1-element tensors (kept as 0-dim
    tensors). On a CPU bucket they are read on the host each step; a float32 pair on the
    params' GPU is read by the CUDA kernel itself (no host sync, capturable in a CUDA graph)."""
    if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, b in enumerate(betas):
        if isinstance(b, torch.Tensor) and b.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if isinstance(b, torch.Tensor) and b.device.type == "cuda" and b.dtype != torch.float32:
            raise ValueError(f"Tensor betas[{i}] on CUDA must be float32 (fusedopt reads it in the kernel)")
    return tuple(b.reshape(()) if isinstance(b, torch.Tensor) else b for b in betas)


class Adam(FusedOptimizer):
    """Drop-in for :class:`torch.optim.Adam` (coupled L2 decay unless
    ``decoupled_weight_decay=True``), plus fusedopt's precision keywords (see API.md)."""

    _quantizable = True  # state_dtype=torch.uint8
    _algorithm = B.ADAM

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, **precision):
        check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= _as_float(betas[0]) < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= _as_float(betas[1]) < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        check_weight_decay(weight_decay)
        betas = _check_betas(betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        defaults.update(precision_defaults(type(self).__name__, **precision))
        super().__init__(params, defaults, dict(differentiable=differentiable))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", isinstance(self, AdamW))

    def _moment_keys(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _variant(self, group) -> bool:
        return bool(group["amsgrad"])

    def _default_weight_decay_mode(self, group) -> str:
        return "decoupled" if group.get("decoupled_weight_decay") else "coupled"

    def _group_row(self, group, lr):
        beta1, beta2 = (_as_float(b) for b in group["betas"])
        return B.group_row(lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                           wd_mode=B.WEIGHT_DECAY_MODES[self.weight_decay_mode(group)], maximize=group["maximize"])


class AdamW(Adam):
    """Drop-in for :class:`torch.optim.AdamW` (decoupled decay, ``weight_decay=1e-2``)."""

    def __setstate__(self, state):
        super().__setstate__(state)
        # As torch's AdamW: an Adam state dict loaded here keeps AdamW's decoupled decay.
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, **precision):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, **precision)
