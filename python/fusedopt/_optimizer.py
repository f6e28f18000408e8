"""The base class of fusedopt's optimizers: validation, lazy state, the pointer-table plan,
AMP and clipping, and state-dict fidelity. The algorithms (adam.py, sgd.py) only say which
state they keep, how a group maps to kernel scalars, and which kernel to call."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from . import _backend as B
from . import _compile
from . import _multi_tensor
from . import _quantization as Q
from . import _distributed as D
from . import _step_inputs as SI
from ._norms import clip_norm_and_factor, on_device, stats_from_sums
from ._plan import Bucket, Plan
from ._state import Generation, TrackedState

_PRECISION_KEYS = ("master_weights", "stochastic_rounding", "kahan_summation")
_IMPL_SWITCHES = ("foreach", "fused", "capturable", "differentiable")


def check_lr(lr) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr.dtype != torch.float32 and lr.device.type == "cuda":
            raise ValueError("Tensor lr on CUDA must be float32 (fusedopt reads it in the kernel)")
        lr_value = float(lr) if lr.device.type == "cpu" else 0.0
    else:
        lr_value = lr
    if not 0.0 <= lr_value:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_weight_decay(weight_decay) -> None:
    if not 0.0 <= float(weight_decay):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def precision_defaults(cls_name: str, master_weights=False, stochastic_rounding=False, kahan_summation=False,
                       state_dtype=None, max_grad_norm=None, seed=None, weight_decay_mode=None,
                       track_stats=False, **unknown) -> dict:
    """Validates the precision keywords; returns only those that are on, so a default
    optimizer's groups (and state dict) carry exactly torch's keys."""
    if unknown:
        raise TypeError(f"{cls_name}.__init__() got an unexpected keyword argument '{next(iter(unknown))}'")
    out: dict[str, Any] = {}
    modes = [k for k, v in zip(_PRECISION_KEYS, (master_weights, stochastic_rounding, kahan_summation)) if v]
    if len(modes) > 1:
        raise ValueError(f"{' and '.join(modes)} are mutually exclusive: choose one precision path")
    if modes:
        out[modes[0]] = True
    if state_dtype is not None:
        if state_dtype not in (torch.float32, torch.bfloat16, torch.uint8):
            raise ValueError(f"Invalid state_dtype: {state_dtype} (use None, torch.float32, torch.bfloat16 or "
                             "torch.uint8)")
        out["state_dtype"] = state_dtype
    if max_grad_norm is not None:
        if not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm} (a finite number > 0)")
        out["max_grad_norm"] = float(max_grad_norm)
    if stochastic_rounding:
        if seed is None:
            seed = torch.initial_seed()
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"Invalid seed value: {seed} (a non-negative int)")
        out["seed"] = seed % (1 << 63)
    elif seed is not None:
        raise ValueError("seed is only used with stochastic_rounding=True")
    if weight_decay_mode is not None:
        if weight_decay_mode not in B.WEIGHT_DECAY_MODES:
            raise ValueError(f"Invalid weight_decay_mode: {weight_decay_mode!r} "
                             f"(one of {', '.join(map(repr, B.WEIGHT_DECAY_MODES))})")
        out["weight_decay_mode"] = weight_decay_mode
    if track_stats:
        out["track_stats"] = True
    return out


class FusedOptimizer(torch.optim.Optimizer):
    """Shared machinery; see AdamW / Adam / SGD for the algorithms."""

    _algorithm = -1                   # id of csrc/fusedopt/algorithms.h (_backend: ADAM, SGD, ...)
    _state_from_param: tuple = ()     # state keys that start as a copy of the param (else zeros)
    _device_lr = True                 # a tensor lr on the params' GPU is read by the kernel itself
    _eager_only = False               # torch.compile runs the eager step (host-side group bookkeeping)
    _quantizable = False              # state_dtype=torch.uint8 offered (8-bit moments, _quantization.py)
    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf
    _init_group = _compile.init_group  # run eagerly by Dynamo when it traces step()

    def __init__(self, params, defaults: dict, impl: dict):
        if impl.get("differentiable"):
            raise ValueError("differentiable=True is not supported by fusedopt (its kernels are not autograd-aware)")
        self._gen = Generation()
        super().__init__(params, defaults)
        self._init_runtime()

    def _init_runtime(self) -> None:
        """What is not part of torch's pickled state (defaults, state, param_groups): the plan
        cache, the last norms and the state-dict hooks. Run by __init__ and again by
        __setstate__ (also reached from load_state_dict, between its hooks: only what is
        missing is set), so a deepcopy or an unpickled optimizer works like the original."""
        self._plan: Plan | None = None
        self._step_inputs = SI.Pending()  # restores and grad mixes the next step does (_step_inputs.py)
        self.__dict__.setdefault("last_grad_norm", None)
        self.__dict__.setdefault("_saved_state", None)
        hooks = (self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks,
                 self._optimizer_state_dict_post_hooks)
        for registry, register, hook in zip(
                hooks, (self.register_load_state_dict_pre_hook, self.register_load_state_dict_post_hook,
                        self.register_state_dict_post_hook),
                (FusedOptimizer._stash_saved_state, FusedOptimizer._after_load, FusedOptimizer._plain_state_dict)):
            if hook not in registry.values():
                register(hook)

    @property
    def state(self):
        """torch's per-param state; a container that invalidates the cached pointer table
        whenever anything in it is replaced. Restores still pending for the next step
        (_step_inputs.py) are done first, so the state read is always the real one."""
        if self.__dict__.get("_step_inputs"):
            self._flush_step_inputs()
        return self._state

    @state.setter
    def state(self, value):
        if self.__dict__.get("_step_inputs"):
            self._flush_step_inputs()
        if "_gen" not in self.__dict__:
            self._gen = Generation()
        self._gen.bump()
        tracked = isinstance(value, TrackedState) and value._generation is self._gen
        self._state = value if tracked else TrackedState(self._gen, value)

    def __setstate__(self, state):
        super().__setstate__(state)  # torch puts "state" into __dict__, past the property
        self.state = self.__dict__.pop("state", self.__dict__.get("_state", {}))
        self._init_runtime()

    # ---- algorithm hooks (overridden) ------------------------------------------------------
    def _moment_keys(self, group) -> tuple[str, ...]:
        raise NotImplementedError

    _keeps_step = True  # torch keeps a `step` in each param's state (Adam); False: SGD, Lion, ...

    def _uses_step(self, group) -> bool:
        # Stochastic rounding keys its random bits by a step, so it adds one where the
        # algorithm itself keeps none.
        return self._keeps_step or bool(group.get("stochastic_rounding"))

    def _variant(self, group) -> bool:
        raise NotImplementedError

    def _group_row(self, group, lr: float) -> list[float]:
        raise NotImplementedError

    def _default_weight_decay_mode(self, group) -> str:
        raise NotImplementedError

    def _begin_step(self) -> None:
        """Called once per step after every param was validated and before any kernel runs:
        where an algorithm advances per-group bookkeeping (schedule-free's step count)."""

    # ---- groups ----------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if "lr" in param_group:
            check_lr(param_group["lr"])
        self._check_group_precision(param_group)
        super().add_param_group(param_group)
        self._gen.bump()

    def _check_group_precision(self, group: dict) -> None:
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        get = lambda k: group.get(k, self.defaults.get(k, False))  # noqa: E731
        modes = [k for k in _PRECISION_KEYS if get(k)]
        if len(modes) > 1:
            raise ValueError(f"{' and '.join(modes)} are mutually exclusive: choose one precision path")
        if modes:
            allowed = (torch.bfloat16, torch.float16) if modes[0] == "master_weights" else (torch.bfloat16,)
            for p in params:
                t = p[1] if isinstance(p, tuple) else p
                if isinstance(t, torch.Tensor) and t.dtype not in allowed:
                    raise ValueError(f"{modes[0]}=True needs {' or '.join(map(str, allowed))} params, "
                                     f"got a {t.dtype} param of shape {tuple(t.shape)}")

    def weight_decay_mode(self, group) -> str:
        return group.get("weight_decay_mode") or self._default_weight_decay_mode(group)

    # ---- state dict ------------------------------------------------------------------------
    @staticmethod
    def _stash_saved_state(optimizer, state_dict):
        # bitsandbytes' 8-bit state dicts load as fusedopt's layout (codes and absmax kept).
        params = [p for g in optimizer.param_groups for p in g["params"]]
        converted = Q.from_bitsandbytes(state_dict, params)
        # A group saved without fusedopt's keys (a torch.optim or bitsandbytes state dict) keeps
        # this optimizer's precision configuration: loading fp32 moments into an 8-bit optimizer
        # quantizes them, a master-weights optimizer stays one.
        missing = [[k for k in current if k != "params" and k not in saved]
                   for saved, current in zip(converted["param_groups"], optimizer.param_groups)]
        if any(missing):
            if converted is state_dict:
                converted = dict(state_dict, param_groups=[dict(g) for g in state_dict["param_groups"]])
            for saved, current, keys in zip(converted["param_groups"], optimizer.param_groups, missing):
                saved.update({k: current[k] for k in keys})
        # torch's loader casts floating state to the param's dtype; remember what was saved.
        optimizer._saved_state = converted["state"]
        optimizer._saved_ids = [i for g in converted["param_groups"] for i in g["params"]]
        return None if converted is state_dict else converted

    @staticmethod
    def _plain_state_dict(optimizer, state_dict):
        # Plain dicts (torch.load(weights_only=True) refuses our tracked containers); a non-dict
        # value someone keeps in optimizer.state (a counter, say) passes through as torch does.
        state_dict["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in state_dict["state"].items()}
        return state_dict

    @staticmethod
    def _after_load(optimizer):
        saved, ids = optimizer._saved_state, optimizer._saved_ids
        optimizer._saved_state = optimizer._saved_ids = None
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid not in saved or p not in optimizer.state or not isinstance(saved[pid], dict):
                continue
            state = optimizer.state[p]
            for key, value in saved[pid].items():
                if not isinstance(value, torch.Tensor):
                    continue
                target = p.device if (key != "step" or p.device.type == "cuda") else value.device
                if key == "step":
                    state[key] = value.to(device=target, dtype=torch.float32)
                elif value.dtype != state[key].dtype or state[key].device != target:
                    state[key] = value.to(device=target)
        optimizer._gen.bump()
        optimizer._plan = None

    def _param_label(self, gi: int, j: int, p: torch.Tensor) -> str:
        names = self.param_groups[gi].get("param_names")
        name = f" '{names[j]}'" if names and j < len(names) else ""
        return f"param {j}{name} of group {gi} (shape {tuple(p.shape)}, {p.dtype}, {p.device})"

    # ---- the plan --------------------------------------------------------------------------
    def _state_dtype(self, group, p, state) -> torch.dtype:
        configured = group.get("state_dtype")
        if configured == torch.uint8 and p.dtype != torch.float64:
            # 8-bit moments for params of >= 4096 elements (fp32 moments loaded into an 8-bit
            # optimizer are quantized by _prepare_state); smaller ones keep fp32 moments.
            return torch.uint8 if p.numel() >= Q.MIN_NUMEL else torch.float32
        existing = [state[k] for k in self._moment_keys(group) if isinstance(state.get(k), torch.Tensor)]
        if existing:
            return existing[0].dtype
        if configured is not None:
            return configured
        if p.dtype == torch.float64:
            return torch.float64  # torch keeps float64 state for float64 params
        return torch.float32 if (p.dtype == torch.float32 or group.get("master_weights")) else p.dtype

    @staticmethod
    def _precision(group) -> int:
        if group.get("master_weights"):
            return B.MASTER
        if group.get("stochastic_rounding"):
            return B.STOCHASTIC
        if group.get("kahan_summation"):
            return B.KAHAN
        return B.PLAIN

    def _validate(self, gi, j, p, g, state, group):
        """Raises for anything the kernels cannot take; returns (state dtype, grad to use)."""
        label = self._param_label(gi, j, p)
        if p.is_complex():
            raise ValueError(f"{label}: complex params are not supported")
        if p.dtype not in B.TORCH_DTYPE_CODES:
            raise ValueError(f"{label}: params of dtype {p.dtype} are not supported (float32, float64, bfloat16, "
                             "float16)")
        if p.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{label}: device {p.device} is not supported (cpu, cuda)")
        if p.layout != torch.strided:
            raise ValueError(f"{label}: params must be strided (dense) tensors, got layout {p.layout}")
        if g.is_sparse or g.layout != torch.strided:
            raise ValueError(f"{label}: sparse gradients are not supported; use a dense grad")
        if g.dtype != p.dtype:
            raise ValueError(f"{label}: grad dtype {g.dtype} does not match the param dtype {p.dtype}")
        if g.device != p.device:
            raise ValueError(f"{label}: grad is on {g.device}, param on {p.device}")
        if g.shape != p.shape:
            raise ValueError(f"{label}: grad shape {tuple(g.shape)} does not match the param")
        sd = self._state_dtype(group, p, state)
        precision = self._precision(group)
        supported = {torch.float32: (torch.float32, torch.bfloat16), torch.bfloat16: (torch.float32, torch.bfloat16),
                     torch.float16: (torch.float32, torch.float16), torch.float64: (torch.float64,)}[p.dtype]
        if self._quantizable and p.dtype != torch.float64:
            supported += (torch.uint8,)
        if sd not in supported:
            raise ValueError(f"{label}: moments of dtype {sd} are not supported for {p.dtype} params"
                             + (f" by {type(self).__name__}" if sd == torch.uint8 else ""))
        if sd == torch.uint8 and D.is_dtensor(p):
            raise ValueError(f"{label}: 8-bit moments (state_dtype=torch.uint8) are not supported for DTensor params")
        if precision != B.PLAIN and p.dtype in (torch.float32, torch.float64):
            raise ValueError(f"{label}: precision keywords need bfloat16/float16 params")
        for k in self._moment_keys(group):
            t = state.get(k)
            if isinstance(t, torch.Tensor):
                if t.shape != p.shape:
                    raise ValueError(f"{label}: state '{k}' has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                if sd == torch.uint8 and t.dtype == torch.uint8:
                    a = state.get(k + Q.ABSMAX_SUFFIX)
                    if not (isinstance(a, torch.Tensor) and a.dtype == torch.float32
                            and a.shape == (Q.num_blocks(p.numel()),)):
                        raise ValueError(f"{label}: 8-bit state '{k}' needs '{k}{Q.ABSMAX_SUFFIX}', a float32 tensor "
                                         f"of {Q.num_blocks(p.numel())} block maxima")
                elif sd == torch.uint8 and t.is_floating_point():
                    pass  # fp32 moments loaded into an 8-bit optimizer: quantized by _prepare_state
                elif t.dtype != sd:
                    raise ValueError(f"{label}: state '{k}' has dtype {t.dtype}, but other moments are {sd}")
        extra = {B.MASTER: ("master_param", torch.float32), B.KAHAN: ("kahan_comp", p.dtype)}.get(precision)
        if extra and isinstance(state.get(extra[0]), torch.Tensor):
            t = state[extra[0]]
            if t.shape != p.shape or t.dtype != extra[1]:
                raise ValueError(f"{label}: state '{extra[0]}' has shape {tuple(t.shape)} and dtype {t.dtype}, "
                                 f"expected {tuple(p.shape)} and {extra[1]}")
        step = state.get("step")
        if step is not None and not isinstance(step, (int, float, torch.Tensor)):
            raise ValueError(f"{label}: state 'step' must be a number or a tensor, got {type(step).__name__}")
        if isinstance(step, torch.Tensor) and step.numel() != 1:
            raise ValueError(f"{label}: state 'step' must hold one value, got shape {tuple(step.shape)}")
        return sd, precision

    def _prepare_state(self, group, p, layout, state, sd, precision) -> bool:
        """Creates missing state and puts existing state in `layout`'s strides and device (the
        param itself, or its contiguous stand-in). Returns True when a momentum-like buffer
        was created now (SGD's first step)."""
        created = False
        for k in self._moment_keys(group):
            t = state.get(k)
            if sd == torch.uint8:
                created |= self._prepare_quantized(k, p, layout, state)
                continue
            if not isinstance(t, torch.Tensor):
                if k in self._state_from_param:
                    source = state["master_param"] if isinstance(state.get("master_param"), torch.Tensor) else layout
                    state[k] = torch.empty_like(layout, dtype=sd).copy_(source)
                else:
                    state[k] = torch.zeros_like(layout, dtype=sd, memory_format=torch.preserve_format)
                created = True
            elif t.stride() != layout.stride() or t.device != p.device:
                state[k] = torch.empty_like(layout, dtype=sd).copy_(t)
        if self._uses_step(group):
            step = state.get("step")
            if not isinstance(step, torch.Tensor) or step.dtype != torch.float32 or step.device != p.device:
                value = 0.0 if step is None else float(step)
                state["step"] = torch.tensor(value, dtype=torch.float32, device=p.device)
        if precision == B.MASTER and not isinstance(state.get("master_param"), torch.Tensor):
            state["master_param"] = torch.empty_like(layout, dtype=torch.float32).copy_(p.detach())
        if precision == B.KAHAN and not isinstance(state.get("kahan_comp"), torch.Tensor):
            state["kahan_comp"] = torch.zeros_like(layout, memory_format=torch.preserve_format)
        for k in ("master_param", "kahan_comp"):
            t = state.get(k)
            if isinstance(t, torch.Tensor) and (t.stride() != layout.stride() or t.device != p.device):
                state[k] = torch.empty_like(layout, dtype=t.dtype).copy_(t)
        return created

    @staticmethod
    def _prepare_quantized(key, p, layout, state) -> bool:
        """8-bit moment `key`: codes of 0.0 and zero absmax when missing (returns True), or the
        nearest codes of fp32 values loaded into an 8-bit optimizer; codes in the param's
        layout and device."""
        t = state.get(key)
        absmax_key = key + Q.ABSMAX_SUFFIX
        if not isinstance(t, torch.Tensor):
            state[key] = torch.full_like(layout, Q.zero_code(key), dtype=torch.uint8,
                                         memory_format=torch.preserve_format)
            state[absmax_key] = torch.zeros(Q.num_blocks(p.numel()), dtype=torch.float32, device=p.device)
            return True
        if t.dtype != torch.uint8:
            codes, absmax = Q.quantize(t.to(p.device).contiguous(), key)
            state[key] = torch.empty_like(layout, dtype=torch.uint8).copy_(codes)
            state[absmax_key] = absmax
            return False
        if t.stride() != layout.stride() or t.device != p.device:
            state[key] = torch.empty_like(layout, dtype=torch.uint8).copy_(t)
        a = state[absmax_key]
        if a.device != p.device or not a.is_contiguous():
            state[absmax_key] = a.to(p.device).contiguous()
        return False

    def _structure(self, group) -> tuple:
        """What of a group shapes the plan (a change rebuilds it); scalars like lr do not."""
        lr = group["lr"]
        lr_kind = (lr.device, lr.dtype) if isinstance(lr, torch.Tensor) else None
        betas = group.get("betas")
        if isinstance(betas, tuple) and isinstance(betas[0], torch.Tensor):
            lr_kind = (lr_kind, tuple((b.device, b.dtype) for b in betas))
        return (self._variant(group), self._precision(group), group.get("state_dtype"), self._uses_step(group),
                lr_kind, group.get("seed", 0))

    def _walk_params(self):
        """(group index, position in the group, index over all groups, param, grad) of every
        param, in order; the middle index keys stochastic rounding."""
        k = 0
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                yield gi, j, k, p, p.grad
                k += 1

    def _build_plan(self) -> Plan:
        entries = []
        without_grad = []
        # Pass 1: validate everything; nothing is changed until every param passed. A group's
        # lr may have been replaced since the constructor checked it.
        for gi, group in enumerate(self.param_groups):
            try:
                check_lr(group["lr"])
            except ValueError as e:
                raise ValueError(f"group {gi}: {e}") from None
        for gi, j, k, p, g in self._walk_params():
            if g is None:
                without_grad.append(p)
                continue
            sd, precision = self._validate(gi, j, p, g, self.state.get(p, {}), self.param_groups[gi])
            entries.append((gi, k, p, g, sd, precision))
        # DTensor params (FSDP2, tensor parallel): None when there are none (_distributed.py).
        mesh = D.mesh_info(entries, self.defaults)  # (checks DTensor entries before any change)
        # Pass 2: lazy state and the tables.
        buckets: dict[tuple, Bucket] = {}
        reusable = True
        for gi, k, p, g, sd, precision in entries:
            group = self.param_groups[gi]
            lp = p  # the tensor the kernel walks: the param, or a DTensor's local shard
            if mesh is not None and D.is_dtensor(p):
                lp, g = D.local_param(k, p), D.local_grad(k, p, g)
            # A param with gaps or overlap in memory (a strided view) is updated through a
            # contiguous stand-in, copied back after the kernel; its state is contiguous.
            staged = not B.is_dense(lp.shape, lp.stride())
            layout = lp.detach().contiguous() if staged else lp.detach()
            if g.stride() != layout.stride() and layout.numel() > 1:
                g = torch.empty_like(layout).copy_(g)  # the param's layout, for this step only
            state = self.state.get(p)
            fresh = state is None
            state = {} if fresh else state
            if lp is not p:  # DTensor: state is a DTensor in the param's layout, as torch.optim keeps it
                D.adopt_state(k, p, state)
            first = self._prepare_state(group, p, layout if lp is p else p.detach(), state, sd, precision)
            if fresh and state:
                self.state[p] = state  # torch keeps no entry for a param without state
                state = self.state[p]
            variant = self._variant(group)
            counted = mesh is None or D.counted(p, mesh)  # False: another rank counts it in norms
            key = (p.device, p.dtype, sd, precision, variant, counted)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(p.device, p.dtype, sd, precision, variant, counted=counted)
            moments = [state[m] for m in self._moment_keys(group)]
            extra = state.get("master_param") if precision == B.MASTER else (
                state.get("kahan_comp") if precision == B.KAHAN else None)
            step = state.get("step") if self._uses_step(group) else None
            if lp is not p:  # DTensor: the local shards of its state
                moments, extra = [D.local_state(t, layout) for t in moments], D.local_state(extra, layout)
            row = [0] * B.TABLE_COLUMNS
            row[B.COL_PARAM] = layout.data_ptr()
            row[B.COL_GRAD] = g.data_ptr()
            for col, t in zip((B.COL_STATE0, B.COL_STATE1, B.COL_STATE2), moments):
                row[col] = t.data_ptr()
            if sd == torch.uint8:
                for col, m in zip((B.COL_ABSMAX0, B.COL_ABSMAX1, B.COL_ABSMAX2), self._moment_keys(group)):
                    absmax = state[m + Q.ABSMAX_SUFFIX]
                    row[col] = absmax.data_ptr()
                    b.keepalive.append(absmax)
            row[B.COL_EXTRA] = extra.data_ptr() if extra is not None else 0
            row[B.COL_STEP] = step.data_ptr() if step is not None else 0
            row[B.COL_NUMEL] = lp.numel()
            row[B.COL_GROUP] = gi
            row[B.COL_PARAM_INDEX] = k
            row[B.COL_FLAGS] = B.FLAG_FIRST_STEP if first else 0
            row[B.COL_SEED] = group.get("seed", 0)
            if lp is not p:  # DTensor: index of the shard's first element in the full param (SR bits)
                row[B.COL_RNG_OFFSET] = D.rng_offset(k, p, precision == B.STOCHASTIC)
                b.dtensor = True
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and lr.device == p.device and p.device.type == "cuda" and self._device_lr:
                b.lr_rows.append((len(b.params), gi))
            if _device_betas(group, p.device) is not None:
                b.beta_rows.append((len(b.params), gi))
            if staged:
                b.writebacks.append((p, layout))
                reusable = False
            # Dense non-contiguous rows (channels_last) are refreshed in Python (Bucket.refresh);
            # a grad copied into the param's layout for this step only makes the plan one-off.
            reusable = reusable and (g is p.grad or lp is not p)
            b.strided.append(not lp.is_contiguous() and not staged)
            b.params.append(p)
            b.rows.append(row)
            b.keepalive += [layout, g, *moments, extra, step]
        for b in buckets.values():
            b.freeze()
        return Plan(self._gen.value, self.state, [self._structure(g) for g in self.param_groups],
                    [g["params"] for g in self.param_groups], [tuple(g["params"]) for g in self.param_groups],
                    list(buckets.values()), without_grad, reusable, mesh=mesh)

    def _current_plan(self) -> Plan:
        plan = self._plan
        if plan is not None and plan.still_valid(self) and all(b.refresh() for b in plan.buckets):
            return plan
        self._plan = None
        plan = self._build_plan()
        self._plan = plan
        return plan

    # ---- one-step inputs (_step_inputs.py) --------------------------------------------------
    def _defer_copies(self, pairs, *, params: bool = True) -> list:
        """Hands ``(dst, src)`` copies into this optimizer's params (when ``params``) or their
        moments / master / Kahan buffers to the next step, which does them inside its pass;
        returns the pairs it did not take, for the caller to copy now."""
        return SI.defer_copies(self, pairs, self._step_inputs, params=params)

    def _defer_saves(self, pairs) -> list:
        """Hands ``(dst, src)`` copies out of this optimizer's moments / master / Kahan buffers to
        the next step, which saves the values from before its update into dst inside its pass;
        returns the pairs it did not take, for the caller to copy now."""
        return SI.defer_saves(self, pairs, self._step_inputs)

    def _defer_grad_mix(self, params, mixes, weight: float) -> list:
        """Hands ``p.grad.lerp_(mix, weight)`` to the next step; returns the ``(param, mix)``
        pairs it did not take."""
        return SI.defer_grad_mix(self._step_inputs, params, mixes, weight)

    def _flush_step_inputs(self) -> None:
        pending, self._step_inputs = self._step_inputs, SI.Pending()
        SI.flush(pending)

    # ---- the step --------------------------------------------------------------------------
    def _group_rows(self, device: torch.device) -> np.ndarray:
        """The group table for the buckets on `device`. A tensor lr on that CUDA device is read
        by the kernel itself (table column COL_LR); anywhere else its value is needed here,
        which costs a sync only when it sits on a GPU and the bucket does not."""
        rows = []
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                lr = 0.0 if (lr.device.type == "cuda" and lr.device == device and self._device_lr) else float(lr)
            betas = group.get("betas")
            if isinstance(betas, tuple) and any(isinstance(b, torch.Tensor) for b in betas):
                # Tensor betas on this GPU are read by the kernel (COL_BETA1/2): no host sync.
                on_gpu = _device_betas(group, device) is not None
                group = dict(group, betas=tuple(0.0 if on_gpu else float(b) for b in betas))
            rows.append(self._group_row(group, lr))
        return np.asarray(rows, dtype=np.float64).reshape(-1, B.GROUP_FIELDS)

    def _clip_coefficients(self, plan: Plan, grad_scale) -> dict:
        """Global L2 norm of all grads (all groups and devices) and the clip factor per
        device, as device tensors: no host sync on CUDA."""
        max_norm = self.defaults.get("max_grad_norm")
        sums = []
        for b in plan.buckets:
            if not b.counted:  # DTensor shards another rank counts (replicas, _distributed.py)
                sums.append(torch.zeros((), dtype=torch.float64, device=b.device))
                continue
            ptrs = np.ascontiguousarray(b.table[:, B.COL_GRAD])
            numels = np.ascontiguousarray(b.table[:, B.COL_NUMEL])
            if b.device.type == "cpu":
                sums.append(_multi_tensor.cpu_sum_squares(ptrs, numels, b.param_dtype))
            else:
                sums.append(_cuda_sum_squares(b, ptrs, numels, B.TORCH_DTYPE_CODES[b.param_dtype]))
        home = plan.buckets[0].device
        total = torch.stack([s.to(home, dtype=torch.float64) for s in sums]).sum()
        total = D.all_reduce_sums(total, plan.mesh)  # DTensor shards: sum over the mesh
        self.last_grad_norm, coef = clip_norm_and_factor(total, grad_scale, max_norm)
        return {b.device: on_device(coef, b.device) for b in plan.buckets}

    @torch.no_grad()
    def step(self, closure=None):
        if torch.compiler.is_compiling():  # torch.compile: the custom-op path (_compile.py)
            if self._step_inputs:
                self._flush_step_inputs()
            return _compile.compiled_step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending, self._step_inputs = self._step_inputs, SI.Pending()
        if not pending:
            return self._step(loss, None)
        try:
            return self._step(loss, pending)
        finally:
            SI.flush(pending)  # (what a failed step left; nothing after a kernel took it)

    def _step(self, loss, pending):
        for gi, group in enumerate(self.param_groups):  # a float lr may have been replaced by hand
            lr = group["lr"]
            if not isinstance(lr, torch.Tensor) and not lr >= 0.0:
                raise ValueError(f"group {gi}: Invalid learning rate: {lr}")
        self._refuse_capturing_a_first_step()
        plan = self._current_plan()
        self._begin_step()
        if not plan.buckets:
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        inputs_in, keep = [], []
        if pending:
            if found_inf is not None:  # a skipped step must still leave everything restored
                SI.flush(pending)
            else:
                inputs_in, keep = SI.attach(pending, plan, mix_allowed=not self.defaults.get("max_grad_norm"))
        try:
            self._run_kernels(plan, grad_scale, found_inf)
        finally:
            SI.detach(inputs_in)
        return loss

    def _run_kernels(self, plan: Plan, grad_scale, found_inf) -> None:
        clip = self._clip_coefficients(plan, grad_scale) if self.defaults.get("max_grad_norm") else {}
        group_rows = {}
        stats = self._stats_buffers(plan) if self.defaults.get("track_stats") else {}
        keep = []  # device copies of the AMP scalars must outlive the kernel calls
        for b in plan.buckets:
            mod = B.module_for(b.device)
            gs, fi, cc = on_device(grad_scale, b.device), on_device(found_inf, b.device), clip.get(b.device)
            keep += [gs, fi, cc]
            for row, gi in b.lr_rows:
                b.table[row, B.COL_LR] = self.param_groups[gi]["lr"].data_ptr()
            for row, gi in b.beta_rows:
                beta1, beta2 = self.param_groups[gi]["betas"]
                b.table[row, B.COL_BETA1], b.table[row, B.COL_BETA2] = beta1.data_ptr(), beta2.data_ptr()
            groups = group_rows.get(b.device)
            if groups is None:
                groups = group_rows[b.device] = self._group_rows(b.device)
            kwargs = dict(grad_scale=_ptr(gs), found_inf=_ptr(fi), clip_coef=_ptr(cc))
            if b.state_dtype == torch.uint8:
                kwargs["qmaps"] = Q.maps(b.device).data_ptr()
            if b.device in stats and b.counted:  # (replicas another rank counts add nothing)
                kwargs["stats"] = stats[b.device].data_ptr()
            kwargs.update(B.launch_kwargs(b.device))
            mod.step(self._algorithm, b.table, groups, B.TORCH_DTYPE_CODES[b.param_dtype],
                     B.STATE_DTYPE_CODES[b.state_dtype], b.precision, b.variant, **kwargs)
            for p, stand_in in b.writebacks:
                p.copy_(stand_in)
            # A skipped (found_inf) first step leaves the new buffers for the next real step;
            # reading the flag syncs once on CUDA, and only while first-step rows exist.
            if b.first_step_rows and not (fi is not None and bool(fi)):
                b.clear_first_step()
        if stats:
            self._finish_stats(stats, grad_scale)

    def _refuse_capturing_a_first_step(self) -> None:
        """A step that builds the plan creates state (host-to-device copies) and, on a first
        step, reads found_inf and clears the first-step flags on the host: none of that can be
        captured in a CUDA graph, and a captured SGD first step would reset the momentum on
        every replay. Such a step raises before anything changes; capture after an eager step,
        as torch's CUDA-graph recipe does with its warm-up iterations."""
        if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return
        plan = self._plan
        if plan is None or not plan.still_valid(self) or any(b.first_step_rows for b in plan.buckets):
            raise RuntimeError(
                "fusedopt: this step would create optimizer state (a first step, or the first after params, "
                "groups or state changed), which cannot be captured in a CUDA graph; run it eagerly before "
                "capturing (e.g. torch's warm-up iterations on a side stream)")

    # ---- telemetry (track_stats) -----------------------------------------------------------
    def _stats_buffers(self, plan: Plan) -> dict:
        """One zeroed (n_groups x 4) float64 sum buffer per device; the kernels add into it."""
        n = len(self.param_groups)
        return {dev: torch.zeros((n, 4), dtype=torch.float64, device=dev) for dev in {b.device for b in plan.buckets}}

    def _finish_stats(self, sums: dict, grad_scale) -> None:
        devices = list(sums)
        home = devices[0]
        total = sums[home] if len(devices) == 1 else torch.stack([s.to(home) for s in sums.values()]).sum(0)
        total = D.all_reduce_sums(total, self._plan.mesh)  # DTensor shards: sum over the mesh, one call
        self._last_stats = stats_from_sums(total, grad_scale)

    def stats(self) -> list[dict]:
        """Per param group, from the last step: ``grad_norm`` (L2 of the grads as used, after
        unscaling and before clipping), ``param_norm`` (L2 of the params after the step) and
        ``update_ratio`` (||p_after - p_before|| / ||p_before||), as 0-dim float32 tensors on
        the params' device; no host sync. Needs ``track_stats=True``."""
        if not self.defaults.get("track_stats"):
            raise RuntimeError("stats() needs the optimizer to be built with track_stats=True")
        stats = getattr(self, "_last_stats", None)
        if stats is None:
            raise RuntimeError("stats() is available after the first step()")
        return stats


def _device_betas(group: dict, device: torch.device):
    """The group's tensor betas when the CUDA kernel on `device` reads them itself (float32 0-dim
    tensors on that GPU), else None."""
    betas = group.get("betas")
    if (device.type == "cuda" and isinstance(betas, tuple) and len(betas) == 2
            and all(isinstance(b, torch.Tensor) and b.device == device and b.dtype == torch.float32 for b in betas)):
        return betas
    return None


def _ptr(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    if t.dtype != torch.float32:
        raise ValueError(f"AMP/clip scalars must be float32 tensors, got {t.dtype}")
    return t.data_ptr()


def _cuda_sum_squares(bucket: Bucket, ptrs, numels, code) -> torch.Tensor:
    """The bucket's grads' sum of squares as a 0-dim float64 tensor on its device (float64 like
    the CPU's: the grads may still carry the GradScaler's scale, whose square times the sum
    leaves float32's range). The kernel's workspace comes from the caching allocator per
    call, so it is never shared by two calls in flight (another optimizer on another stream):
    the allocator hands a freed block back only to work on the same stream."""
    dev = bucket.device
    mod = B.module_for(dev)
    workspace = torch.empty(mod.sum_squares_workspace_size(), dtype=torch.float64, device=dev)
    out = torch.empty((), dtype=torch.float64, device=dev)
    mod.sum_squares(ptrs, numels, code, out.data_ptr(), workspace.data_ptr(), **B.launch_kwargs(dev))
    return out
