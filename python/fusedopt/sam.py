"""Sharpness-aware minimization (SAM, ASAM) with the gradient-norm-penalty mix of Zhao et al.
(2022), around any base optimizer: the ``davda54/sam`` interface, with the vector work done
per (device, dtype) bucket by ``torch._foreach_*`` calls and the saved copies of ``w`` (and of
``g(w)``) kept in buffers that are reused from step to step (copied by ``_multi_tensor.copy_``:
on the CPU one call of the kernels with streaming stores). With a fusedopt base optimizer on
the CPU, the restore of ``w`` and the grad mix are done by the base step itself, inside its
pass over memory (_step_inputs.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import _backend as B
from . import _multi_tensor

_NORM_EPS = 1e-12  # davda54's guard in rho / (||g|| + eps)
_SAM_KEYS = ("rho", "adaptive", "alpha")


def _check_rho(rho) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"Invalid rho value: {rho} (a finite number >= 0)")


def _check_alpha(alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"Invalid alpha value: {alpha} (0 < alpha <= 1; 1 is plain SAM)")


def _check_adaptive(adaptive) -> None:
    if not isinstance(adaptive, bool):
        raise ValueError(f"Invalid adaptive value: {adaptive!r} (True or False)")


def _fused_perturb(b) -> bool:
    """Whether the bucket's first step runs as one pass of the CPU kernels: dense CPU params
    whose grads share their layout (else torch's foreach ops)."""
    return all(p.device.type == "cpu" and B.is_dense(p.shape, p.stride()) and g.stride() == p.stride()
               and g.dtype == p.dtype for p, g in zip(b.params, b.grads))


@dataclass
class _Bucket:
    """The params of one (device, dtype, rho, adaptive, alpha) that had a grad at the first step,
    with their saved ``w`` (and ``g(w)`` when alpha < 1)."""
    rho: float
    adaptive: bool
    alpha: float
    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    saved_w: list = field(default_factory=list)
    saved_g: list = field(default_factory=list)


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around a base optimizer (``davda54/sam`` interface).

    ``SAM(params, base_optimizer, rho=0.05, adaptive=False, alpha=1.0, **kwargs)`` builds
    ``base_optimizer(self.param_groups, **kwargs)`` (a fusedopt or torch optimizer class) and
    shares its param groups, so an LR scheduler on the SAM object moves the base lr, and its
    state: between steps ``state_dict()`` is the base optimizer's.

    Usage, with the grads at ``w`` already computed::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)      # w -> w + e
        loss_fn(model(x), y).backward()     # grads at w + e
        opt.second_step(zero_grad=True)     # back to w exactly, then the base step

    or ``opt.step(closure)`` with a closure that does the second forward and backward.
    ``e = rho * (p**2 if adaptive else 1) * g / (||(|p| if adaptive else 1) * g|| + 1e-12)``, the
    norm over all params that have a grad; ``.grad_norm`` holds that norm as a 0-dim tensor
    (no host sync). The base step sees the grad ``(1 - alpha) * g(w) + alpha * g(w + e)``
    (``alpha=1``: SAM; ``0 < alpha < 1``: the gradient-norm penalty of Zhao et al. 2022).
    ``rho``, ``adaptive`` and ``alpha`` may be set per param group. Params whose ``.grad`` is
    None at the first step are neither perturbed nor restored.
    """

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, alpha=1.0, **kwargs):
        _check_rho(rho)
        _check_alpha(alpha)
        _check_adaptive(adaptive)
        if isinstance(base_optimizer, torch.optim.Optimizer) or not callable(base_optimizer):
            raise ValueError(f"Invalid base_optimizer: {base_optimizer!r} (pass an optimizer class, e.g. "
                             "fusedopt.SGD or torch.optim.SGD, not an instance)")
        self.base_optimizer = None
        super().__init__(params, dict(rho=rho, adaptive=adaptive, alpha=alpha, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.grad_norm: torch.Tensor | None = None
        # param -> reused buffer for w (and for g(w) when alpha < 1); not optimizer state.
        self._w_buffers: dict[torch.Tensor, torch.Tensor] = {}
        self._g_buffers: dict[torch.Tensor, torch.Tensor] = {}
        self._pending: list[_Bucket] | None = None  # set by first_step, consumed by second_step

    # ---- groups and state ------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Adds a group to the shared list (through the base optimizer once it exists, so the
        group also gets the base's defaults)."""
        for key, check in zip(_SAM_KEYS, (_check_rho, _check_adaptive, _check_alpha)):
            if key in param_group:
                check(param_group[key])
        if self.base_optimizer is None:
            super().add_param_group(param_group)
            return
        for key in _SAM_KEYS:
            param_group.setdefault(key, self.defaults[key])
        self.base_optimizer.add_param_group(param_group)

    def state_dict(self):
        """The base optimizer's state dict (SAM keeps no state of its own between steps)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        """Loads into the base optimizer and shares its (new) groups and state again."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    # ---- the two passes --------------------------------------------------------------------
    def _buckets(self) -> list[_Bucket]:
        buckets: dict[tuple, _Bucket] = {}
        for group in self.param_groups:
            rho, adaptive, alpha = (group.get(k, self.defaults[k]) for k in _SAM_KEYS)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"SAM does not support sparse grads (param of shape {tuple(p.shape)})")
                key = (p.device, p.dtype, rho, adaptive, alpha)
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = _Bucket(rho, adaptive, alpha)
                b.params.append(p)
                b.grads.append(p.grad)
        return list(buckets.values())

    @staticmethod
    def _buffer(store: dict, p: torch.Tensor) -> torch.Tensor:
        buf = store.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device \
                or buf.stride() != p.stride():
            buf = store[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return buf

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Saves ``w`` (and ``g(w)`` when alpha < 1) and moves the params to ``w + e``."""
        if self._pending is not None:
            raise RuntimeError("SAM.first_step() called twice without second_step(): the params are "
                               "already at w + e")
        buckets = self._buckets()
        if not buckets:
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            self.grad_norm = torch.zeros((), device=device)
            self._pending = []
            if zero_grad:
                self.zero_grad()
            return
        device = buckets[0].params[0].device
        norm_dtype = torch.float64 if any(b.params[0].dtype == torch.float64 for b in buckets) else torch.float32
        # |p| * g of adaptive buckets, kept for the perturbation below.
        abs_params = [torch._foreach_abs(b.params) if b.adaptive else None for b in buckets]
        weighted = [torch._foreach_mul(a, b.grads) if b.adaptive else b.grads for a, b in zip(abs_params, buckets)]
        # Sums of squares per bucket, in float64: dense CPU grads (not ASAM's |p| * g) by one
        # multi-threaded pass of the CPU kernels (torch's CPU _foreach_norm reads at a fraction
        # of the bandwidth), the rest by torch's norms.
        fused = [_fused_perturb(b) for b in buckets]
        sums = []
        for b, vectors, one_pass in zip(buckets, weighted, fused):
            if not b.adaptive and one_pass:
                ptrs = np.asarray([g.data_ptr() for g in b.grads], np.int64)
                numels = np.asarray([g.numel() for g in b.grads], np.int64)
                sums.append(_multi_tensor.cpu_sum_squares(ptrs, numels, b.params[0].dtype))
                continue
            low = b.params[0].dtype in (torch.float16, torch.bfloat16)
            norms = torch.stack(torch._foreach_norm(vectors, 2, dtype=torch.float32 if low else None))
            sums.append(norms.to(device=device, dtype=torch.float64).square().sum())
        total = sums[0] if len(sums) == 1 else torch.stack([x.to(device) for x in sums]).sum()
        grad_norm = total.to(device).sqrt().to(norm_dtype)
        self.grad_norm = grad_norm

        for b, absp, wg, one_pass in zip(buckets, abs_params, weighted, fused):
            b.saved_w = [self._buffer(self._w_buffers, p) for p in b.params]
            if b.alpha < 1.0:
                b.saved_g = [self._buffer(self._g_buffers, p) for p in b.params]
                _multi_tensor.copy_(b.saved_g, b.grads)
            scale = (b.rho / (grad_norm + _NORM_EPS)).to(device=b.params[0].device, dtype=b.params[0].dtype)
            if one_pass:
                # One pass: save w and move to w + e (the CPU kernels; the scale is a CPU tensor
                # here, so reading it costs no sync).
                _multi_tensor.sam_perturb_(b.params, b.saved_w, b.grads, float(scale), b.adaptive)
                b.grads = []
                continue
            _multi_tensor.copy_(b.saved_w, b.params)
            if b.adaptive:
                # e = (|p| g) * (|p| scale) = scale p^2 g
                torch._foreach_mul_(absp, scale)
                torch._foreach_addcmul_(b.params, wg, absp)
            elif b.params[0].device.type == "cpu":
                # One pass per tensor (CPU foreach ops run per tensor anyway; the 0-dim scale
                # broadcasts), no temporary.
                torch._foreach_addcmul_(b.params, b.grads, [scale] * len(b.params))
            else:
                torch._foreach_add_(b.params, torch._foreach_mul(b.grads, scale))
            b.grads = []  # the grads at w are not needed any more (and may be freed by zero_grad)
        self._pending = buckets
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def _restore(self) -> list[_Bucket]:
        buckets, self._pending = self._pending, None
        for b in buckets:
            _multi_tensor.copy_(b.params, b.saved_w)  # bit for bit
        return buckets

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restores ``w`` exactly, mixes the grads when alpha < 1, and runs the base step."""
        if self._pending is None:
            raise RuntimeError("SAM.second_step() called without first_step()")
        buckets, self._pending = self._pending, None
        base = self.base_optimizer
        # A fusedopt base step takes the restore of w and the grad mix into its own pass
        # (_step_inputs.py); what it cannot take, and everything for other bases, is done here.
        fused = hasattr(base, "_defer_copies")
        pairs = [(p, w) for b in buckets for p, w in zip(b.params, b.saved_w)]
        rest = base._defer_copies(pairs) if fused else pairs
        if rest:
            _multi_tensor.copy_(*map(list, zip(*rest)))  # bit for bit
        for b in buckets:
            if b.alpha >= 1.0:
                continue
            # g(w+e) + (1 - alpha) (g(w) - g(w+e)) = (1 - alpha) g(w) + alpha g(w+e)
            mixes = [(p, g_w) for p, g_w in zip(b.params, b.saved_g) if p.grad is not None]
            if fused:
                mixes = base._defer_grad_mix([p for p, _ in mixes], [m for _, m in mixes], 1.0 - b.alpha)
            if mixes:
                torch._foreach_lerp_([p.grad for p, _ in mixes], [m for _, m in mixes], 1.0 - b.alpha)
        base.step()
        self._opt_called = True  # an LR scheduler on this object then knows a step happened
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        """first_step, the closure (forward and backward at ``w + e``), second_step; the grads
        at ``w`` must already be there. Returns the closure's loss. If the closure raises, the
        params are put back to ``w`` and nothing is stepped."""
        if closure is None:
            raise ValueError("closure: SAM.step needs a closure that does the forward and backward "
                             "pass at the perturbed params (or call first_step / second_step)")
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self._restore()
            raise
        self.second_step()
        return loss
