"""SGD with momentum, dampening and Nesterov: torch.optim.SGD's signature and state."""
from __future__ import annotations

from . import _backend as B
from ._optimizer import FusedOptimizer, check_lr, check_weight_decay, precision_defaults


class SGD(FusedOptimizer):
    """Drop-in for :class:`torch.optim.SGD`, plus fusedopt's precision keywords."""

    _quantizable = True  # state_dtype=torch.uint8
    _algorithm = B.SGD
    _keeps_step = False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, capturable=False, **precision):
        check_lr(lr)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        check_weight_decay(weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        defaults.update(precision_defaults(type(self).__name__, **precision))
        super().__init__(params, defaults, dict(differentiable=differentiable))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    def _moment_keys(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _variant(self, group) -> bool:
        return group["momentum"] != 0

    def _default_weight_decay_mode(self, group) -> str:
        return "coupled"

    def _group_row(self, group, lr):
        return B.group_row(lr, beta1=float(group["momentum"]), beta2=float(group["dampening"]),
                           weight_decay=group["weight_decay"], wd_mode=B.WEIGHT_DECAY_MODES[self.weight_decay_mode(group)],
                           maximize=group["maximize"], nesterov=group["nesterov"])
