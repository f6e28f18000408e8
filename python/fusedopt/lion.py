"""Lion (Chen et al. 2023): sign of an interpolated momentum, half of AdamW's state. The math is
csrc/fusedopt/lion.h; this class only declares hyper-parameters, state and the group row."""
from __future__ import annotations

from . import _backend as B
from ._optimizer import FusedOptimizer, check_lr, check_weight_decay, precision_defaults


class Lion(FusedOptimizer):
    """Drop-in for ``lion_pytorch.Lion`` / ``optimi.Lion`` (decoupled decay ``p *= 1 - lr*wd``;
    the sign is taken of ``lerp(m, g, 1 - beta1)`` before ``m = lerp(m, g, 1 - beta2)``), plus
    fusedopt's precision keywords. State: ``exp_avg``.

    In bf16 every Lion update has magnitude exactly ``lr``: below half a bf16 ulp of a weight
    larger than ~256 * lr, where naive bf16 rounds it away. Use ``stochastic_rounding=True``
    (no extra memory) or ``kahan_summation=True`` for bf16 params."""

    _quantizable = True  # state_dtype=torch.uint8
    _algorithm = B.LION
    _keeps_step = False  # as lion-pytorch and optimi

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, foreach=None,
                 **precision):
        check_lr(lr)
        for i, b in enumerate(betas):
            if not 0.0 <= float(b) <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        check_weight_decay(weight_decay)
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), weight_decay=weight_decay, maximize=maximize,
                        foreach=foreach)
        defaults.update(precision_defaults(type(self).__name__, **precision))
        super().__init__(params, defaults, {})

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # (lion-pytorch's groups have no maximize)
            group.setdefault("maximize", False)

    def _moment_keys(self, group):
        return ("exp_avg",)

    def _variant(self, group) -> bool:
        return False

    def _default_weight_decay_mode(self, group) -> str:
        return "decoupled"

    def _group_row(self, group, lr):
        beta1, beta2 = group["betas"]
        return B.group_row(lr, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                           wd_mode=B.WEIGHT_DECAY_MODES[self.weight_decay_mode(group)], maximize=group["maximize"])
