"""Schedule-Free AdamW and SGD (Defazio et al. 2024): no learning-rate schedule, with the math,
defaults, group keys (``k``, ``train_mode``, ``weight_sum``, ``lr_max``, ``scheduled_lr``) and
state (``z``, ``exp_avg_sq``) of the ``schedulefree`` package 1.4, so checkpoints move between the
two libraries in both directions. The element math is csrc/fusedopt/schedule_free.h: one fused
pass per bucket reads g, y, z (and v) and writes y, z (and v); unlike schedulefree, ``p.grad``
is never written.

The params hold y (where grads are taken) while training; ``eval()`` moves them to x (the
averaged point to evaluate and save) and ``train()`` back, one ``torch._foreach_lerp_`` per
(device, dtype) bucket. A new optimizer is in eval mode, as in schedulefree: call
``optimizer.train()`` before the first step.

Differences from fusedopt's other optimizers, all from schedulefree's host-side bookkeeping of
the averaging weights (``k``, ``weight_sum``, ``lr_max``): a tensor lr is read on the host each
step (a sync when it lives on a GPU); under ``torch.compile`` the eager step runs; GradScaler
unscales the grads itself and skips inf steps (``_step_supports_amp_scaling`` is False).
``kahan_summation`` and ``weight_decay_mode`` are not offered (ValueError).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from . import _backend as B
from ._optimizer import FusedOptimizer, check_lr, check_weight_decay, precision_defaults

_EVAL_MODE_ERROR = ("Optimizer was not in train mode when step is called. Call optimizer.train() before "
                    "training steps and optimizer.eval() before evaluating or saving (schedule-free "
                    "optimizers keep different points for the two).")


class _ScheduleFree(FusedOptimizer):
    _state_from_param = ("z",)
    _device_lr = False
    _eager_only = True
    _keeps_step = False  # the step count is the group's `k`
    _step_supports_amp_scaling = False

    def __init__(self, params, defaults: dict, precision: dict):
        if precision.get("weight_decay_mode") is not None:
            raise ValueError(f"weight_decay_mode is not offered by {type(self).__name__}: its weight decay is "
                             "schedulefree's (applied at y)")
        if precision.get("kahan_summation"):
            raise ValueError(f"kahan_summation is not offered by {type(self).__name__}: the train()/eval() "
                             "interpolation would have to carry the compensation; use stochastic_rounding=True "
                             "or master_weights=True for bf16 params")
        warmup_steps = defaults["warmup_steps"]
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps value: {warmup_steps}")
        defaults.update(k=0, train_mode=False, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0)
        defaults.update(precision_defaults(type(self).__name__, **precision))
        self._rows: dict = {}
        super().__init__(params, defaults, {})

    # ---- algorithm hooks ----------------------------------------------------------------------
    def _variant(self, group) -> bool:
        return False

    def _default_weight_decay_mode(self, group) -> str:
        return "coupled"  # not read: the kernels apply schedulefree's decay at y

    def _y_coefficient(self, group, lr: float, ckp1: float) -> float:
        raise NotImplementedError

    def _bias_correction2(self, group, k: int) -> float:
        return 1.0

    def _begin_step(self) -> None:
        """schedulefree's per-group bookkeeping, in its order: warmup factor, scheduled lr,
        lr_max, the weight of this step in the average and ckp1 = weight / weight_sum."""
        self._rows = {}
        for group in self.param_groups:
            k = group["k"]
            sched = (k + 1) / group["warmup_steps"] if k < group["warmup_steps"] else 1.0
            lr = float(group["lr"]) * sched
            group["scheduled_lr"] = lr
            lr_max = group["lr_max"] = max(lr, group["lr_max"])
            weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
            weight_sum = group["weight_sum"] = group["weight_sum"] + weight
            ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
            self._rows[id(group)] = B.group_row(lr, beta2=self._beta2(group), eps=group.get("eps", 0.0),
                                         weight_decay=group["weight_decay"],
                                         aux=(ckp1, self._y_coefficient(group, lr, ckp1),
                                              self._bias_correction2(group, k)))
            group["k"] = k + 1

    def _beta2(self, group) -> float:
        return 0.0

    def _group_row(self, group, lr):
        return self._rows[id(group)]  # (by identity: dict equality would compare the params' tensors)

    # ---- train / eval -----------------------------------------------------------------------
    def _interpolation_weight(self, group, to_train: bool) -> float:
        raise NotImplementedError

    @torch.no_grad()
    def _swap(self, to_train: bool) -> None:
        """Moves every param that has a z between y (train) and x (eval): p = lerp(p, z, w),
        on the fp32 master copy under master_weights (then rounded to the param)."""
        buckets = defaultdict(lambda: ([], [], []))
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue  # already there (schedulefree's train()/eval() are no-ops then too)
            w = self._interpolation_weight(group, to_train)
            for p in group["params"]:
                state = self.state.get(p, {})
                z = state.get("z") if isinstance(state, dict) else None
                if not isinstance(z, torch.Tensor):
                    continue
                master = state.get("master_param")
                target = master if isinstance(master, torch.Tensor) else p.detach()
                targets, zs, params = buckets[(w, target.device, target.dtype, z.dtype)]
                targets.append(target)
                zs.append(z)
                params.append(p if isinstance(master, torch.Tensor) else None)  # rounded from the master
        for (w, _, tdtype, zdtype), (targets, zs, params) in buckets.items():
            if tdtype == zdtype:
                torch._foreach_lerp_(targets, zs, w)
            else:  # low-precision y with fp32 z: interpolate in fp32, round once
                work = [t.float() for t in targets]
                torch._foreach_lerp_(work, [z.float() for z in zs], w)
                torch._foreach_copy_(targets, work)
            masters = [(p, t) for p, t in zip(params, targets) if p is not None]
            if masters:
                torch._foreach_copy_([p.detach() for p, _ in masters], [t for _, t in masters])
        for group in self.param_groups:
            group["train_mode"] = to_train

    def train(self) -> None:
        """Puts the params at y (where training takes grads); a no-op when already training."""
        self._swap(True)

    def eval(self) -> None:
        """Puts the params at x (the average to evaluate and save); a no-op when already in eval."""
        self._swap(False)

    @torch.no_grad()
    def step(self, closure=None):
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(_EVAL_MODE_ERROR)
        return super().step(closure)


class AdamWScheduleFree(_ScheduleFree):
    """Drop-in for ``schedulefree.AdamWScheduleFree`` (1.4): Adam's normalisation of the grad,
    schedule-free averaging instead of a schedule. State: ``z``, ``exp_avg_sq``."""

    _algorithm = B.SCHEDULE_FREE_ADAMW

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0, foreach=None, **precision):
        check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, b in enumerate(betas):
            if not 0.0 <= float(b) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        check_weight_decay(weight_decay)
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps, r=r, warmup_steps=warmup_steps,
                        weight_lr_power=weight_lr_power, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults, precision)

    def _moment_keys(self, group):
        return ("z", "exp_avg_sq")

    def _beta2(self, group) -> float:
        return group["betas"][1]

    def _bias_correction2(self, group, k: int) -> float:
        return 1.0 - group["betas"][1] ** (k + 1)

    def _y_coefficient(self, group, lr, ckp1):
        return lr * (group["betas"][0] * (1.0 - ckp1) - 1.0)

    def _interpolation_weight(self, group, to_train):
        beta1 = group["betas"][0]
        return 1.0 - beta1 if to_train else 1.0 - 1.0 / beta1


class SGDScheduleFree(_ScheduleFree):
    """Drop-in for ``schedulefree.SGDScheduleFree`` (1.4). State: ``z``."""

    _algorithm = B.SCHEDULE_FREE_SGD

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0, warmup_steps=0, r=0.0, weight_lr_power=2.0,
                 foreach=None, **precision):
        check_lr(lr)
        check_weight_decay(weight_decay)
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"Momentum must be between 0 and 1 exclusive: {momentum}")
        defaults = dict(lr=lr, momentum=momentum, r=r, warmup_steps=warmup_steps, weight_lr_power=weight_lr_power,
                        weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults, precision)

    def _moment_keys(self, group):
        return ("z",)

    def _y_coefficient(self, group, lr, ckp1):
        return lr * (group["momentum"] * (1.0 - ckp1) - 1.0)

    def _interpolation_weight(self, group, to_train):
        momentum = group["momentum"]
        return 1.0 - momentum if to_train else 1.0 - 1.0 / momentum

