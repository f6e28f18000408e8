"""Sharpness and gradient-norm regularisation: the micro-batch gradient-norm penalty
(``penalized_backward``), Hessian probes (``top_hessian_eigenvalue``, ``hessian_trace``,
``preconditioned_sharpness``) and ``frozen_batchnorm`` for SAM's second pass.

The probes take a ``loss_fn`` closure (it returns a scalar loss) and use Hessian-vector
products by double backprop. They leave params, ``.grad``, optimizer state, the module's
train/eval mode and the global RNG state as they found them, and are deterministic for a seed:
their random vectors come from a local ``torch.Generator``, and ``loss_fn`` itself runs with
the global RNG seeded by ``seed`` inside a forked RNG state (so dropout masks, if any, depend
on the seed only). ``loss_fn`` runs in whatever mode the module is in; in train mode a
BatchNorm updates its running statistics unless the call is wrapped in ``frozen_batchnorm``.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

_TINY = 1e-12  # guards r / ||g|| and relative convergence checks at a zero gradient


# ---- helpers ---------------------------------------------------------------------------------
def _param_list(params, what: str = "params") -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError(f"{what}: got no tensors")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"{what}[{i}]: expected a tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise ValueError(f"{what}[{i}]: expected a floating-point tensor, got {p.dtype}")
    return params


def _check_count(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name} value: {value!r} (an int >= 1)")


def _check_tol(tol) -> None:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"Invalid tol value: {tol!r} (a finite number >= 0)")


def _by_device_dtype(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype): the lists a ``torch._foreach_*`` call takes."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    return list(groups.values())


def _pick(tensors, idx):
    return [tensors[i] for i in idx]


def _global_norm(tensors: Sequence[torch.Tensor], buckets: list[list[int]], device) -> torch.Tensor:
    """L2 norm over all tensors: one ``_foreach_norm`` per bucket, one stack; no host sync."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    parts = [torch.stack(torch._foreach_norm(_pick(tensors, idx), 2, dtype=torch.float32
                                             if tensors[idx[0]].dtype in (torch.float16, torch.bfloat16) else None))
             .to(device=device, dtype=dtype) for idx in buckets]
    return torch.linalg.vector_norm(parts[0] if len(parts) == 1 else torch.cat(parts))


@contextlib.contextmanager
def _seeded_rng(params: Sequence[torch.Tensor], seed: int):
    """Runs the body with the global CPU (and the params' CUDA) generators seeded by ``seed``,
    and puts their states back afterwards."""
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    if any(p.device.index is None for p in params if p.device.type == "cuda"):
        cuda = sorted(set(cuda) | {torch.cuda.current_device()})
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for d in cuda:
            torch.cuda.default_generators[d].manual_seed(seed)
        yield


class _Hessian:
    """Hessian-vector products of ``loss_fn`` at the current params by double backprop: one
    forward and backward with ``create_graph=True``, then one more backward per product."""

    def __init__(self, loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]):
        self.params = list(params)
        with torch.enable_grad():
            loss = loss_fn()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn: must return a scalar loss tensor")
            live = [i for i, p in enumerate(self.params) if p.requires_grad]
            grads = torch.autograd.grad(loss, _pick(self.params, live), create_graph=True, allow_unused=True) \
                if loss.requires_grad and live else []
        # A grad that is None or has no graph is constant: its Hessian rows are zero.
        self._outputs = [(i, g) for i, g in zip(live, grads) if g is not None and g.requires_grad]

    def __call__(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        hv = [None] * len(self.params)
        if self._outputs:
            with torch.enable_grad():
                got = torch.autograd.grad([g for _, g in self._outputs], self.params,
                                          grad_outputs=[v[i] for i, _ in self._outputs],
                                          retain_graph=True, allow_unused=True)
            hv = list(got)
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(self.params, hv)]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(x.double() * y.double()).sum().to(a[0].device) for x, y in zip(a, b)]).sum()


def _power_iteration(matvec, v: list[torch.Tensor], iters: int, tol: float) -> tuple[float, list[torch.Tensor]]:
    """Eigenvalue of largest magnitude of a symmetric operator, and its unit eigenvector.
    Stops when the Rayleigh quotient changes by at most ``tol`` relative to its size."""
    norm = math.sqrt(_dot(v, v).item())
    v = [x / norm for x in v]
    eig = None
    for _ in range(iters):
        hv = matvec(v)
        rayleigh = _dot(v, hv).item()
        hv_norm = math.sqrt(_dot(hv, hv).item())
        converged = eig is not None and abs(rayleigh - eig) <= tol * max(abs(eig), _TINY)
        eig = rayleigh
        if converged or hv_norm == 0.0:
            break
        v = [x / hv_norm for x in hv]
    return float(eig), v


def _random_like(params, gen: torch.Generator, rademacher: bool) -> list[torch.Tensor]:
    """Drawn on the CPU (same numbers on every device), then moved to each param."""
    out = []
    for p in params:
        if rademacher:
            r = torch.randint(0, 2, p.shape, generator=gen).to(torch.float64).mul_(2).sub_(1)
        else:
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        out.append(r.to(device=p.device, dtype=p.dtype))
    return out


# ---- public API ------------------------------------------------------------------------------
def top_hessian_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor], iters: int = 100,
                           tol: float = 1e-4, seed: int = 0) -> tuple[float, list[torch.Tensor]]:
    """The Hessian eigenvalue of largest magnitude (it may be negative) by power iteration on
    Hessian-vector products, and its unit eigenvector (one tensor per param; frozen params,
    ``requires_grad=False``, are constants and get zeros).

    ``loss_fn()`` returns a scalar loss; it is called once. Stops after ``iters`` products or
    when the estimate changes by at most ``tol`` (relative). Leaves params, ``.grad``, the
    module's mode and the global RNG as they were; deterministic for ``seed``.
    """
    params = _param_list(params)
    _check_count(iters, "iters")
    _check_tol(tol)
    gen = torch.Generator().manual_seed(seed)
    with _seeded_rng(params, seed):
        hessian = _Hessian(loss_fn, params)
        v0 = _random_like(params, gen, rademacher=False)
        for x, p in zip(v0, params):
            if not p.requires_grad:
                x.zero_()
        eig, vec = _power_iteration(hessian, v0, iters, tol)
    return eig, vec


def hessian_trace(loss_fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor], samples: int = 100,
                  seed: int = 0) -> float:
    """Hutchinson's estimate of the Hessian trace, ``mean(z^T H z)`` over ``samples``
    Rademacher vectors ``z`` (its variance is ``2 * sum_{i != j} H_ij^2 / samples``).
    Same guarantees as ``top_hessian_eigenvalue``."""
    params = _param_list(params)
    _check_count(samples, "samples")
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with _seeded_rng(params, seed):
        hessian = _Hessian(loss_fn, params)
        for _ in range(samples):
            z = _random_like(params, gen, rademacher=True)
            for x, p in zip(z, params):
                if not p.requires_grad:
                    x.zero_()
            total += _dot(z, hessian(z)).item()
    return total / samples


def preconditioned_sharpness(loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, iters: int = 100,
                             tol: float = 1e-4, seed: int = 0) -> float:
    """The eigenvalue of largest magnitude of ``P^-1 H`` for an Adam/AdamW optimizer after at
    least one step, ``P = diag(sqrt(v / (1 - beta2**step)) + eps)`` (``v`` = ``exp_avg_sq``, or
    ``max_exp_avg_sq`` with amsgrad): Adam's preconditioned sharpness, to compare with its
    stability threshold ``(2 + 2 * beta1) / ((1 - beta1) * lr)`` (38 / lr at beta1 = 0.9).

    Params with no ``exp_avg_sq`` yet are held fixed. Computed by power iteration on the
    symmetric ``P^-1/2 H P^-1/2``, which has the same eigenvalues. Reads the optimizer state
    only; same guarantees as ``top_hessian_eigenvalue``.
    """
    _check_count(iters, "iters")
    _check_tol(tol)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    params, inv_sqrt_p = [], []
    with torch.no_grad():
        for gi, group in enumerate(optimizer.param_groups):
            if "betas" not in group or "eps" not in group:
                raise ValueError(f"optimizer: param group {gi} has no betas/eps: needs an Adam or AdamW optimizer")
            beta2 = float(group["betas"][1])
            for j, p in enumerate(group["params"]):
                state = optimizer.state.get(p, {})
                key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
                if key not in state or "step" not in state:
                    continue
                v = state[key]
                if not v.is_floating_point() or v.shape != p.shape:
                    raise ValueError(f"optimizer: {key} of param {j} of group {gi} is {v.dtype} of shape "
                                     f"{tuple(v.shape)}; needs a plain floating-point moment of the param's shape")
                bias_correction = 1.0 - beta2 ** float(state["step"])
                denom = (v.to(torch.float64) / bias_correction).sqrt_().add_(float(group["eps"]))
                params.append(p)
                inv_sqrt_p.append(denom.rsqrt_().to(p.dtype))
    if not params:
        raise ValueError("optimizer: no param has Adam's exp_avg_sq state yet: needs an Adam/AdamW optimizer "
                         "after at least one step")
    gen = torch.Generator().manual_seed(seed)
    with _seeded_rng(params, seed):
        hessian = _Hessian(loss_fn, params)

        def matvec(u):
            return torch._foreach_mul(hessian(torch._foreach_mul(u, inv_sqrt_p)), inv_sqrt_p)

        eig, _ = _power_iteration(matvec, _random_like(params, gen, rademacher=False), iters, tol)
    return eig


def penalized_backward(params: Iterable[torch.Tensor], micro_batch_losses: Sequence[Callable[[], torch.Tensor]],
                       penalty: float, r: float = 1e-2) -> torch.Tensor:
    """Adds ``(1/k) * grad(L_i + penalty * ||grad L_i||**2)`` to the params' ``.grad`` for each
    of the ``k`` closures in ``micro_batch_losses`` (each returns the loss of one micro-batch)
    and returns the mean ``||grad L_i||**2`` as a 0-dim tensor.

    ``grad ||g||**2 = 2 H g`` is taken by a forward finite difference,
    ``H g ~ (g(w + h g) - g(w)) / h`` with ``h = r / ||g||`` (a step of length ``r``): two
    backward passes per micro-batch; the params are restored bit for bit after each. Its error
    is O(r) (plus rounding of order eps * ||g|| / r). The closures should be deterministic
    (the same dropout mask in both passes) and, with BatchNorm in train mode, are best run in
    ``frozen_batchnorm``. With labels sampled from the model's own predictions in the
    closures, the penalty is the Fisher-trace penalty.
    """
    params = _param_list(params)
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(f"params[{i}]: does not require grad")
    losses = list(micro_batch_losses)
    if not losses or not all(callable(f) for f in losses):
        raise ValueError("micro_batch_losses: expected a non-empty sequence of callables returning a loss")
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not (penalty >= 0 and math.isfinite(penalty)):
        raise ValueError(f"Invalid penalty value: {penalty!r} (a finite number >= 0)")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not (r > 0 and math.isfinite(r)):
        raise ValueError(f"Invalid r value: {r!r} (a finite number > 0)")
    k = len(losses)
    device = params[0].device
    buckets = _by_device_dtype(params)
    saved_w = [torch.empty_like(p) for p in params]  # reused by every micro-batch
    sq_norm_sum = torch.zeros((), device=device, dtype=torch.float64)

    def grads_of(loss_fn):
        with torch.enable_grad():
            loss = loss_fn()
            got = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]

    for loss_fn in losses:
        g = grads_of(loss_fn)
        norm = _global_norm(g, buckets, device)
        sq_norm_sum += norm.double().square()
        h = r / (norm + _TINY)           # the step along g, so that ||h g|| = r
        coeff = 2.0 * penalty / h / k    # (1/k) * 2 * penalty * (g+ - g) / h
        with torch.no_grad():
            for idx in buckets:
                ps, gs, ws = _pick(params, idx), _pick(g, idx), _pick(saved_w, idx)
                hb = h.to(device=ps[0].device, dtype=ps[0].dtype)
                torch._foreach_copy_(ws, ps)
                torch._foreach_add_(ps, torch._foreach_mul(gs, hb))
        try:
            g_plus = grads_of(loss_fn)
        finally:
            with torch.no_grad():
                for idx in buckets:
                    torch._foreach_copy_(_pick(params, idx), _pick(saved_w, idx))  # bit for bit
        with torch.no_grad():
            for idx in buckets:
                ps, gs, gp = _pick(params, idx), _pick(g, idx), _pick(g_plus, idx)
                cb = coeff.to(device=ps[0].device, dtype=ps[0].dtype)
                torch._foreach_sub_(gp, gs)
                torch._foreach_mul_(gp, cb)
                torch._foreach_add_(gp, gs, alpha=1.0 / k)  # now (1/k) (g + 2 penalty H g)
                have = [j for j, p in enumerate(ps) if p.grad is not None]
                if have:
                    torch._foreach_add_([ps[j].grad for j in have], [gp[j] for j in have])
                for j, p in enumerate(ps):
                    if p.grad is None:
                        p.grad = gp[j]
    return (sq_norm_sum / k).to(params[0].dtype if params[0].dtype == torch.float64 else torch.float32)


@contextlib.contextmanager
def frozen_batchnorm(module: nn.Module):
    """Keeps the running statistics of every BatchNorm in ``module`` unchanged in the body (for
    SAM's second pass, or a probe's forward) while the forward still normalises with batch
    statistics: momentum is set to 0 and the train/eval mode is kept; ``num_batches_tracked``
    is put back on exit. Momentum is restored on exit, also when the body raises."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"module: expected an nn.Module, got {type(module).__name__}")
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            tracked = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
            saved.append((m, m.momentum, tracked))
    try:
        for m, _, _ in saved:
            m.momentum = 0.0
        yield module
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
