"""Correctness guard: a contender whose step is broken must show as a failed row, not a fast one.

After a contender's first step (from the case's seeded params and grads):

- its params are finite and every tensor moved, or, for a step that must not touch them
  (snapshot + restore, EMA), they are bit for bit what they were;
- where it does the case's math, its params match one step of the case's reference: the
  ``torch.optim`` class (``foreach=False`` where it has the switch) run on fp32 copies of the
  same start (rounded to the contender's param dtype first) and grads, or for Lion the few
  lines of plain torch below. Muon is compared by its update, as a whole (see ``_UPDATE_TOL``);
  the other cases element by element (see ``_TOLERANCE``).

Later, around its last warm-up step, a contender that should move must still move: an
optimizer that consumes ``p.grad`` (sets it to None) would otherwise time an empty step.
"""
from __future__ import annotations

import inspect

import torch

from .cases import Case

# Element-wise |p - ref| <= atol + rtol * |ref| after one step from the same start. The params
# are ~N(0, 0.02) and one step moves them by ~lr = 1e-3 (Adam's first update is ~lr * sign(g)).
# fp32: different but correct orders of the same fp32 operations differ by a few ulps of the
# update (~1e-10) and of the param (ulp(0.08) = 7.5e-9); 1e-7 + 1e-6 |ref| is ten times that
# and still below the smallest real term, weight decay (lr * wd * |p| ~ 2e-7). bf16: the
# contender rounds its result to bf16 (nearest: 1/2 ulp, stochastic: < 1 ulp, an ulp being at
# most 2^-7 |p|), and torch's bf16 path computes the update itself in bf16 (a few roundings
# of 2^-8 each: measured 1.1e-5 here): 2^-7 |ref| + 3e-5, still 1/30 of the update.
_TOLERANCE = {
    torch.float32: (1e-7, 1e-6),
    torch.bfloat16: (3e-5, 2.0 ** -7),
    torch.float16: (3e-5, 2.0 ** -10),
}
# Where g (or Adam's g + wd * p) cancels to ~eps, g / (|g| + eps) turns on the last bits of g,
# and correct implementations (with or without an FMA) differ there by up to lr: at most this
# fraction of the elements may be outside the tolerance (a broken step is off almost everywhere;
# on the tests' tiny sizes this allows none).
_OUTLIER_FRACTION = 1e-5
# Muon: torch orthogonalizes in bf16, so implementations that do the same math still differ
# by bf16 rounding in 5 Newton-Schulz iterations; a broken one is off by O(1). Relative error
# of the whole update (||d - d_ref|| / ||d_ref||) below 5%.
_UPDATE_TOL = {"Muon": 0.05}


def _lion_step(params, grads, lr, betas=(0.9, 0.99), weight_decay=0.0):
    """One Lion step from zero momentum, in plain torch: c = lerp(m, g, 1 - beta1) with m = 0,
    p *= 1 - lr * wd, p -= lr * sign(c)."""
    beta1 = betas[0]
    for p, g in zip(params, grads):
        c = g * (1.0 - beta1)
        p.mul_(1.0 - lr * weight_decay).add_(torch.sign(c), alpha=-lr)


def reference_step(case: Case, src_params, src_grads, dtype: torch.dtype):
    """fp32 params after one reference step from the sources rounded to ``dtype``, or None
    when the case has no reference."""
    ref = case.reference_optimizer()
    if ref is None:
        return None
    name, hyper = ref
    # clone: for fp32 sources .to().float() would return the source itself
    params = [torch.nn.Parameter(p.to(dtype).float().clone()) for p in src_params]
    grads = [g.to(dtype).float().clone() for g in src_grads]
    for p, g in zip(params, grads):
        p.grad = g
    if case.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, case.grad_clip, foreach=False)
    with torch.no_grad():
        if name == "Lion":
            _lion_step(params, [p.grad for p in params], **hyper)
        else:
            cls = getattr(torch.optim, name)
            if "foreach" in inspect.signature(cls.__init__).parameters:
                hyper = dict(hyper, foreach=False)
            cls(params, **hyper).step()
    return [p.detach() for p in params]


def check_first_step(case: Case, contender, runner, src_params, reference, before=None) -> str | None:
    """None when the contender's first step passed, else what is wrong. ``reference``: the
    output of :func:`reference_step` for the runner's dtype (or None); ``before``: the params
    before the step, for a contender that must leave them unchanged."""
    params = [p.detach() for p in runner.params]
    for i, p in enumerate(params):
        if not torch.isfinite(p).all():
            return f"guard: non-finite params after one step (tensor {i}, shape {list(p.shape)})"
    if not contender.moves:
        if before is None:
            return None
        for i, (p, b) in enumerate(zip(params, before)):
            if not torch.equal(p, b):
                return f"guard: the step changed params it must leave as they were (tensor {i})"
        runner.guard = "params unchanged (bit for bit)"
        return None
    starts = (s.to(runner.param_dtype) for s in src_params)
    for i, (p, s) in enumerate(zip(params, starts)):
        if torch.equal(p, s.to(p.device)):
            return f"guard: params did not move in one step (tensor {i}, shape {list(p.shape)})"
    if reference is None or not contender.matches_reference:
        runner.guard = "moves"
        return None
    ref_name = case.reference_optimizer()[0]
    what = "plain-torch Lion" if ref_name == "Lion" else f"torch.optim.{ref_name}(foreach=False)"
    if ref_name in _UPDATE_TOL:
        num = den = 0.0
        for p, r, s in zip(params, reference, src_params):
            start = s.to(runner.param_dtype).float()
            d, d_ref = p.float() - start, r - start
            num += float((d - d_ref).square().sum())
            den += float(d_ref.square().sum())
        err = (num / den) ** 0.5 if den > 0 else float("inf")
        if not err <= _UPDATE_TOL[ref_name]:
            return f"guard: update differs from {what} by {err:.3g} (relative L2; tolerance {_UPDATE_TOL[ref_name]:g})"
        runner.guard = f"matches {what} (update within {err:.1e})"
        return None
    atol, rtol = _TOLERANCE.get(runner.param_dtype, _TOLERANCE[torch.float32])
    outside, worst, total = 0, 0.0, 0
    for p, r in zip(params, reference):
        excess = (p.float() - r).abs() - rtol * r.abs()
        outside += int((excess > atol).sum())
        worst = max(worst, float(excess.max()))
        total += r.numel()
    allowed = int(_OUTLIER_FRACTION * total)
    if outside > allowed:
        return (f"guard: after one step differs from {what}: {outside} of {total} elements outside "
                f"|p - ref| <= {atol:g} + {rtol:.2g}|ref| (worst excess {worst:.3g})")
    runner.guard = f"matches {what}" + (f" ({outside} of {total} elements at cancellation differ)" if outside else "")
    return None


class StillMoving:
    """Around a later step: per-tensor sums before and after; a contender that should move
    and changed no tensor has stopped stepping (e.g. it consumed the grads)."""

    def __init__(self, contenders: dict):
        self.contenders = contenders

    def before(self, runner):
        c = self.contenders.get(runner.name)
        if c is None or not c.moves:
            return None
        return [float(p.detach().sum(dtype=torch.float64)) for p in runner.params]

    def after(self, runner, sums) -> str | None:
        if sums is None:
            return None
        now = [float(p.detach().sum(dtype=torch.float64)) for p in runner.params]
        if now == sums:
            return "guard: params stopped moving after the first step (grads consumed or step skipped?)"
        return None
