"""Weight-decay / no-decay param groups for any torch optimizer."""
from __future__ import annotations

import math
import numbers

from torch import nn

__all__ = ["param_groups"]


def param_groups(module: nn.Module, weight_decay: float, no_decay=()) -> list[dict]:
    """Split ``module``'s trainable params into two optimizer param groups:

    ``[{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]``

    * every trainable param appears exactly once (tied params once, in ``module.parameters()``
      order; params with ``requires_grad=False`` are left out);
    * params with fewer than 2 dims (biases, norm weights and biases) have no decay;
    * so have the params of every module whose class is in ``no_decay`` (a class or a tuple of
      classes, matched with ``isinstance``, e.g. ``(nn.Embedding,)``). A param tied between
      such a module and another one (a tied embedding / lm_head) has no decay.

    Both groups are always returned (one may be empty); the dicts hold only ``params`` and
    ``weight_decay``, so they work with any optimizer.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if (isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real)
            or not math.isfinite(weight_decay) or weight_decay < 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    classes = (no_decay,) if isinstance(no_decay, type) else tuple(no_decay)
    for c in classes:
        if not isinstance(c, type):
            raise TypeError(f"no_decay must hold module classes (e.g. nn.Embedding), got {c!r}")

    exempt = set()
    if classes:
        for m in module.modules():
            if isinstance(m, classes):
                exempt.update(id(p) for p in m.parameters(recurse=False))

    decay, plain = [], []
    for p in module.parameters():  # deduplicates tied params
        if not p.requires_grad:
            continue
        (plain if p.dim() < 2 or id(p) in exempt else decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": plain, "weight_decay": 0.0}]
