"""From the kernels' sums of squares to what users see: the clip factor and
``last_grad_norm`` of ``max_grad_norm``, and the per-group norms of ``track_stats``. Shared
by the eager step and the torch.compile path, so both do the same float64 arithmetic."""
from __future__ import annotations

import torch


def on_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """`t` on `device` (a non-blocking copy only when it lives elsewhere)."""
    if t is None:
        return None
    return t if t.device == device else t.to(device, non_blocking=True)


def clip_norm_and_factor(sum_sq: torch.Tensor, grad_scale: torch.Tensor | None, max_norm: float):
    """(global grad norm, clip factor) as 0-dim float32 tensors on `sum_sq`'s device, from the
    float64 sum of squares of the (still scaled) grads; torch's clip_grad_norm_ formula."""
    total = sum_sq.sqrt()
    if grad_scale is not None:
        total = total / on_device(grad_scale, total.device).double()
    norm = total.to(torch.float32)
    factor = torch.clamp(max_norm / (norm.double() + 1e-6), max=1.0).to(torch.float32)
    return norm, factor


def stats_from_sums(sums: torch.Tensor, grad_scale: torch.Tensor | None) -> list[dict]:
    """The per-group dicts of ``stats()`` from the (n_groups x 4) float64 sums the kernels
    add into (grad^2, p_after^2, (p_after - p_before)^2, p_before^2)."""
    roots = sums.sqrt()
    grad_norm = roots[:, 0]
    if grad_scale is not None:
        grad_norm = grad_norm / on_device(grad_scale, sums.device).double()
    ratio = roots[:, 2] / roots[:, 3]
    return [{"grad_norm": grad_norm[i].float(), "param_norm": roots[i, 1].float(), "update_ratio": ratio[i].float()}
            for i in range(sums.shape[0])]
