"""Who runs in a case: fusedopt, torch.optim's three implementations and any installed peer.

A :class:`Contender` knows how to turn a case's seeded source tensors into a :class:`Runner`
(its own params and grads, an optimizer, a ``step()`` callable). Peers are found at run time
with importlib and are never required; one that is missing, fails to import, construct or step
is reported with its reason and the run goes on.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cases import Case, adam_bytes, sgd_bytes

TORCH_FLAGS = {
    "torch": {},                                # torch's one implementation (e.g. Muon)
    "torch-forloop": dict(foreach=False),
    "torch-foreach": dict(foreach=True),
    "torch-fused": dict(fused=True),
}
BASELINE = "torch-fused"   # ratios are time(torch-fused) / time(contender)


class Skip(Exception):
    """A contender that cannot take part; the message is the reason shown in the report."""


@dataclass
class Runner:
    name: str
    params: list
    optimizer: object
    step: Callable[[], None]
    bytes_per_param: float
    param_dtype: torch.dtype
    detail: str
    numel: int = 0
    inner: int = 1                              # steps per timed sample
    warm_s: float | None = None                 # duration of the last warm-up step
    first_step_s: float | None = None           # the first step (compilation included)
    max_samples: int | None = None              # slow contenders: fewer timing rounds
    guard: str | None = None                    # what the correctness guard found (passed)
    samples: list = field(default_factory=list)  # seconds per step, one per sample

    def __post_init__(self):
        self.numel = sum(p.numel() for p in self.params)


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str                                   # "fusedopt" | "torch" | "peer"
    detail: str                                 # what exactly runs, for the JSON
    param_dtype: torch.dtype
    bytes_per_param: float
    make: Callable                              # make(params) -> optimizer
    grad_clip: float | None = None
    clip_foreach: bool = True
    # Guard: after the first step the params match the case's reference step (when it has
    # one and this contender does its math); ``moves=False``: the step must leave the params
    # bit for bit as they were (snapshot + restore, EMA).
    matches_reference: bool = True
    moves: bool = True
    compiles: bool = False                      # torch.compile inside: first step reported apart
    reattach_grads: bool = False                # the optimizer sets p.grad = None in its step

    def build(self, src_params, src_grads) -> Runner:
        params = []
        for p, g in zip(src_params, src_grads):
            q = torch.nn.Parameter(p.to(self.param_dtype, copy=True))
            q.grad = g.to(self.param_dtype, copy=True)
            params.append(q)
        try:
            opt = self.make(params)
        except Skip:
            raise
        except Exception as e:  # noqa: BLE001 - any construction failure is a reason to skip
            raise Skip(f"construction failed: {short_error(e)}") from e
        if self.reattach_grads:
            grads = [p.grad for p in params]
            opt_step = opt.step

            def step():
                for p, g in zip(params, grads):
                    p.grad = g
                opt_step()
        elif self.grad_clip is None:
            step = opt.step
        else:
            clip, max_norm, foreach = torch.nn.utils.clip_grad_norm_, self.grad_clip, self.clip_foreach

            def step():
                clip(params, max_norm, foreach=foreach)
                opt.step()
        return Runner(self.name, params, opt, step, self.bytes_per_param, self.param_dtype, self.detail)


def short_error(e: BaseException, limit: int = 160) -> str:
    msg = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def task_bytes(case: Case, dtype: torch.dtype, state_size: float | None = None) -> float:
    """Bytes/param of the case's step done by a contender whose params (and, unless given,
    states) have ``dtype``."""
    s = dtype.itemsize
    st = s if state_size is None else state_size
    if (case.torch_optimizer or case.optimizer) in ("SGD", "Muon"):  # one moment (Lion: SGD's bytes)
        return sgd_bytes(s, s, st)
    return adam_bytes(s, s, st, extra_read=s if case.grad_clip else 0)


# --------------------------------------------------------------------------- fusedopt

def load_fusedopt():
    """``(module, None)`` or ``(None, reason)``."""
    try:
        mod = importlib.import_module("fusedopt")
    except Exception as e:  # noqa: BLE001
        return None, f"import fusedopt failed: {short_error(e)}"
    if not all(hasattr(mod, n) for n in ("AdamW", "Adam", "SGD")):
        return None, "fusedopt has no AdamW/Adam/SGD (package incomplete)"
    return mod, None


# What each kind of case needs from fusedopt, beyond the class named by ``case.optimizer``.
_NEEDS = {"EMA": ("averaging.EMA",), "SAM": ("SAM", "SGD"), "Snapshot": ("AdamW", "schedules.LossAdaptiveLR")}


def _lookup(mod, dotted: str):
    obj = mod
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def fusedopt_support(mod, case: Case, device: str) -> str | None:
    """None when this fusedopt build has the case's class(es) and accepts its keywords, else
    why not ("not supported by this fusedopt build: ..."). Keywords are tried by constructing
    on a tiny param, catching the ValueError/TypeError an unsupported keyword raises."""
    if mod is None:
        return "fusedopt is not available"
    missing = [n for n in _NEEDS.get(case.optimizer, (case.optimizer,)) if _lookup(mod, n) is None]
    if missing:
        return ("not supported by this fusedopt build: no " + ", ".join(f"fusedopt.{n}" for n in missing)
                + f" (fusedopt {getattr(mod, '__version__', '?')})")
    if not case.fusedopt_kwargs:
        return None
    cls = getattr(mod, case.optimizer)
    shape = (64, 64) if case.max_dims == 2 else (8,)
    p = torch.nn.Parameter(torch.zeros(shape, dtype=case.param_dtype, device=device))
    try:
        cls([p], **case.hyper, **case.fusedopt_kwargs)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        kw = ", ".join(f"{k}={_fmt_kw(v)}" for k, v in case.fusedopt_kwargs.items())
        return f"not supported by this fusedopt build: fusedopt.{case.optimizer}({kw}): {short_error(e)}"
    return None


def _fmt_kw(v) -> str:
    return dtype_name(v) if isinstance(v, torch.dtype) else repr(v)


def _kw(d: dict) -> str:
    return ", ".join(f"{k}={_fmt_kw(v)}" for k, v in d.items())


class _EMAStep:
    """Weight averaging as a contender: ``step()`` folds the params into an fp32 average."""

    def __init__(self, params, decay: float, kind: str, fusedopt_mod=None):
        self.params = list(params)
        self.state = {}
        if kind == "fusedopt":
            self._ema = fusedopt_mod.averaging.EMA(self.params, decay=decay)
            self.step = self._ema.update
            return
        self.avgs = [p.detach().float().clone() for p in self.params]
        weight = 1.0 - decay
        if kind == "torch-foreach":
            self.step = lambda: torch._foreach_lerp_(self.avgs, [p.detach() for p in self.params], weight)
        else:
            self.step = lambda: [a.lerp_(p.detach(), weight) for a, p in zip(self.avgs, self.params)]


class _SAMStep:
    """SAM's optimizer side as a contender: ``step()`` is ``first_step()`` + ``second_step()``
    on fixed grads (the second backward, the same for every implementation, is not timed)."""

    def __init__(self, sam):
        self.sam = sam
        self.state = sam.state

    def step(self):
        self.sam.first_step()
        self.sam.second_step()


def _sam_hyper(case: Case) -> tuple[float, dict]:
    h = dict(case.hyper)
    return h.pop("rho"), h


class _SnapshotStep:
    """LossAdaptiveLR's snapshot + restore of a fusedopt.AdamW that has taken one step (so its
    state exists), as a search with one-step trials does them: ``step()`` takes the snapshot
    (params copied, moments handed to the next step), runs the trial step (which saves the
    moments), restores (params copied, moments handed to the next step) and runs the next
    step (which restores them): two AdamW steps (Case.overhead_steps)."""

    def __init__(self, params, fusedopt_mod, hyper):
        self.optimizer = fusedopt_mod.AdamW(params, **hyper)
        self.optimizer.step()
        self.state = self.optimizer.state
        self._snapshot = fusedopt_mod.schedules.LossAdaptiveLR(self.optimizer)._snapshot

    def step(self):
        self._snapshot.take(self.optimizer)
        self.optimizer.step()
        self._snapshot.restore(self.optimizer)
        self.optimizer.step()


def fusedopt_contender(mod, case: Case, plain: bool = False) -> Contender:
    if case.optimizer == "EMA":
        decay = case.hyper["decay"]
        return Contender("fusedopt", "fusedopt", f"fusedopt.averaging.EMA(decay={decay}).update()",
                         case.param_dtype, case.bytes_per_param,
                         lambda params: _EMAStep(params, decay, "fusedopt", mod), moves=False)
    if case.optimizer == "SAM":
        rho, base = _sam_hyper(case)
        return Contender("fusedopt", "fusedopt", f"fusedopt.SAM(fusedopt.SGD, rho={rho}, {_kw(base)}): "
                         "first_step() + second_step()", case.param_dtype, case.bytes_per_param,
                         lambda params: _SAMStep(mod.SAM(params, mod.SGD, rho=rho, **base)))
    if case.optimizer == "Snapshot":
        if plain:
            return Contender("fusedopt-plain", "fusedopt", f"fusedopt.AdamW({_kw(case.hyper)}).step()",
                             case.param_dtype, task_bytes(case, case.param_dtype),
                             lambda params: mod.AdamW(params, **case.hyper))
        return Contender("fusedopt", "fusedopt", "LossAdaptiveLR snapshot take(), a trial step(), "
                         f"restore() of a fusedopt.AdamW({_kw(case.hyper)}) (params, exp_avg, exp_avg_sq, "
                         "step), then its step()", case.param_dtype, case.bytes_per_param,
                         lambda params: _SnapshotStep(params, mod, case.hyper), matches_reference=False)
    cls = getattr(mod, case.optimizer)
    kw = {**case.hyper, **({} if plain else case.fusedopt_kwargs)}
    if hasattr(cls, "train"):  # schedule-free: steps only in train mode
        cls = _in_train_mode(cls)
    if plain:
        return Contender("fusedopt-plain", "fusedopt", f"fusedopt.{case.optimizer}(" + ", ".join(
            f"{k}={_fmt_kw(v)}" for k, v in kw.items()) + ")", case.param_dtype, case.bytes_per_param,
            lambda params: cls(params, **kw))
    detail = f"fusedopt.{case.optimizer}({', '.join(f'{k}={_fmt_kw(v)}' for k, v in kw.items())})"
    return Contender("fusedopt", "fusedopt", detail, case.param_dtype, case.bytes_per_param,
                     lambda params: cls(params, **kw))


# --------------------------------------------------------------------------- torch.optim

def torch_contender(case: Case, name: str, dtype: torch.dtype | None = None, label: str | None = None) -> Contender:
    if case.optimizer == "EMA":
        decay = case.hyper["decay"]
        what = "torch._foreach_lerp_" if name == "torch-foreach" else "per-tensor lerp_"
        return Contender(name, "torch", f"{what}(avgs, params, {1 - decay:g}) on fp32 averages",
                         case.param_dtype, case.bytes_per_param, lambda params: _EMAStep(params, decay, name),
                         moves=False)
    torch_name = case.torch_optimizer or case.optimizer
    cls = getattr(torch.optim, torch_name)
    flags = TORCH_FLAGS[name]
    dtype = dtype or case.param_dtype
    kw = {**(case.torch_hyper if case.torch_hyper is not None else case.hyper), **flags}
    detail = f"torch.optim.{torch_name}({', '.join(f'{k}={v!r}' for k, v in kw.items())}) on {dtype_name(dtype)}"
    if case.grad_clip is not None:
        foreach = flags.get("foreach", True) is not False
        detail = f"clip_grad_norm_({case.grad_clip}, foreach={foreach}) + " + detail
    ref = case.reference_optimizer()
    same_math = ref is not None and ref[0] == torch_name
    return Contender(label or name, "torch", detail, dtype, task_bytes(case, dtype),
                     lambda params: cls(params, **kw), grad_clip=case.grad_clip,
                     clip_foreach=flags.get("foreach", True) is not False, matches_reference=same_math)


# --------------------------------------------------------------------------- peers

def _adamw_hyper(case: Case) -> dict:
    h = case.hyper
    return dict(lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"])


@dataclass(frozen=True)
class PeerVariant:
    """One optimizer of a peer library. ``factory(module, case, params)`` builds it;
    ``applies(case)`` says in which cases it does the same job; ``bytes(case)`` is the model
    of what it moves per param. ``same_math``: its first step must match the case's reference
    (False: the guard only checks that it moves the params; ``note`` says why)."""
    label: str
    module: str
    factory: Callable
    applies: Callable[[Case], bool]
    bytes: Callable[[Case], float]
    detail: str
    same_math: bool = True
    compiles: bool = False
    reattach_grads: bool = False
    note: str = ""


def _attr(mod, *paths):
    """First attribute found among dotted ``paths`` under ``mod`` (submodules imported)."""
    errors = []
    for path in paths:
        parts = path.split(".")
        try:
            obj = mod
            for i, part in enumerate(parts):
                if not hasattr(obj, part) and i < len(parts) - 1:
                    importlib.import_module(".".join([mod.__name__] + parts[: i + 1]))
                obj = getattr(obj, part)
            return obj
        except (ImportError, AttributeError) as e:
            errors.append(f"{path}: {short_error(e, 80)}")
    raise Skip(f"{mod.__name__} has none of {', '.join(paths)} ({'; '.join(errors)})")


def _optimi(**extra):
    def make(mod, case, params):
        return _attr(mod, case.optimizer)(params, **case.hyper, **extra)
    return make


def _bnb(name):
    def make(mod, case, params):
        return _attr(mod, f"optim.{name}")(params, **_adamw_hyper(case))
    return make


_TORCHAO_PATHS = ("optim.{}", "prototype.low_bit_optim.{}")


def _torchao(name, **extra):
    def make(mod, case, params):
        cls = _attr(mod, *(p.format(name) for p in _TORCHAO_PATHS))
        return cls(params, **_adamw_hyper(case), **extra)
    return make


def _heavyball(**extra):
    def make(mod, case, params):
        return _attr(mod, "AdamW", "ForeachAdamW")(params, **_adamw_hyper(case), **extra)
    return make


def _in_train_mode(cls):
    """A factory of ``cls`` optimizers put in train mode (schedule-free ones step only there)."""
    def make(params, **kw):
        opt = cls(params, **kw)
        opt.train()
        return opt
    return make


def _schedulefree(mod, case, params):
    return _in_train_mode(_attr(mod, case.optimizer))(params, **case.hyper)


def _lion_pytorch(mod, case, params):
    return _attr(mod, "Lion")(params, **case.hyper)


def _pytorch_optimizer_sam(mod, case, params):
    rho, base = _sam_hyper(case)
    return _SAMStep(_attr(mod, "SAM")(params, torch.optim.SGD, rho=rho, fused=True, **base))


def _case_is(*names):
    return lambda c: c.name in names


def _p(case: Case) -> int:
    return case.param_dtype.itemsize


# Which peer does the same job in which case. Plain AdamW on fp32 params (and the many small
# tensors): optimi, torchao's _AdamW, heavyball. bf16 params: optimi and torchao without
# extras; with stochastic rounding: torchao (bf16_stochastic_round) and heavyball (it rounds
# bf16 params stochastically; bf16 storage asked for, as fusedopt's bf16 states); Kahan:
# optimi. 8-bit moments: bitsandbytes and torchao AdamW8bit.
_ADAMW_FP32 = ("adamw_fp32", "many_small")
PEERS: list[PeerVariant] = [
    PeerVariant("optimi", "optimi", _optimi(),
                lambda c: not c.precision and c.optimizer in ("AdamW", "Adam", "SGD", "Lion")
                and c.param_dtype == torch.float32,
                lambda c: task_bytes(c, c.param_dtype), "optimi.<same optimizer>(foreach)"),
    PeerVariant("optimi", "optimi", _optimi(kahan_sum=False), _case_is("adamw_bf16"),
                lambda c: task_bytes(c, c.param_dtype), "optimi.AdamW(kahan_sum=False) on bf16 params"),
    PeerVariant("optimi-kahan", "optimi", _optimi(kahan_sum=True), _case_is("adamw_kahan"),
                lambda c: adam_bytes(2, 2, 2) + 4,
                "optimi.AdamW(kahan_sum=True): bf16 params, moments and compensation"),
    PeerVariant("torchao-adamw", "torchao", _torchao("_AdamW"), _case_is(*_ADAMW_FP32, "adamw_bf16"),
                lambda c: task_bytes(c, c.param_dtype), "torchao.optim._AdamW (torch.compile per param)",
                compiles=True),
    PeerVariant("torchao-adamw-bf16sr", "torchao", _torchao("_AdamW", bf16_stochastic_round=True),
                _case_is("adamw_bf16_sr_bf16state"), lambda c: adam_bytes(2, 2, 2),
                "torchao.optim._AdamW(bf16_stochastic_round=True), bf16 moments", compiles=True),
    # Not in many_small: compiling heavyball's foreach step over 2,000 tensors had not finished
    # after 3 minutes on the 2-core CPU machine.
    PeerVariant("heavyball-adamw", "heavyball", _heavyball(), _case_is("adamw_fp32"),
                lambda c: task_bytes(c, c.param_dtype), "heavyball.AdamW (torch.compile, foreach)",
                compiles=True, reattach_grads=True, same_math=False,
                note="eps placement differs from torch's: the guard checks that it moves"),
    PeerVariant("heavyball-adamw-bf16", "heavyball", _heavyball(storage_dtype="bfloat16"),
                _case_is("adamw_bf16_sr_bf16state"), lambda c: adam_bytes(2, 2, 2),
                "heavyball.AdamW(storage_dtype='bfloat16'): stochastic rounding of bf16 params",
                compiles=True, reattach_grads=True, same_math=False,
                note="eps placement differs from torch's: the guard checks that it moves"),
    PeerVariant("bnb-adamw8bit", "bitsandbytes", _bnb("AdamW8bit"), _case_is("adamw_8bit"),
                lambda c: adam_bytes(_p(c), _p(c), 1), "bitsandbytes.optim.AdamW8bit (blockwise 8-bit moments)"),
    PeerVariant("torchao-adamw8bit", "torchao", _torchao("AdamW8bit"), _case_is("adamw_8bit"),
                lambda c: adam_bytes(_p(c), _p(c), 1), "torchao.optim.AdamW8bit (blockwise 8-bit moments, "
                "torch.compile per param)", compiles=True),
    PeerVariant("schedulefree", "schedulefree", _schedulefree, lambda c: c.optimizer == "AdamWScheduleFree",
                lambda c: task_bytes(c, c.param_dtype), "schedulefree.<same optimizer>(foreach=True), train mode",
                same_math=False, note="no torch reference of the same math: the guard checks that it moves"),
    PeerVariant("lion-pytorch", "lion_pytorch", _lion_pytorch, lambda c: c.optimizer == "Lion",
                lambda c: task_bytes(c, c.param_dtype), "lion_pytorch.Lion"),
    PeerVariant("pytorch_optimizer-sam", "pytorch_optimizer", _pytorch_optimizer_sam,
                lambda c: c.optimizer == "SAM", lambda c: c.bytes_per_param,
                "pytorch_optimizer.SAM(torch.optim.SGD, fused=True): first_step() + second_step()"),
]


def _import_module(name: str):
    return importlib.import_module(name)


def detect_peers(variants: list[PeerVariant] | None = None):
    """``(available, missing)``: the peer variants whose library imports, with the module, and
    ``{library: reason}`` for the others. Never raises."""
    variants = PEERS if variants is None else variants
    modules, missing = {}, {}
    for name in dict.fromkeys(v.module for v in variants):
        try:
            modules[name] = _import_module(name)
        except ModuleNotFoundError as e:
            missing[name] = "not installed" if e.name in (None, name) else f"import failed: {short_error(e)}"
        except Exception as e:  # noqa: BLE001 - a broken peer must not stop the run
            missing[name] = f"import failed: {short_error(e)}"
    available = [(v, modules[v.module]) for v in variants if v.module in modules]
    return available, missing


def _version(mod) -> str:
    v = getattr(mod, "__version__", None)
    if v is None:
        try:
            from importlib.metadata import version
            v = version({"optimi": "torch-optimi", "lion_pytorch": "lion-pytorch",
                         "pytorch_optimizer": "pytorch_optimizer"}.get(mod.__name__, mod.__name__))
        except Exception:  # noqa: BLE001 - the version is informative only
            v = "?"
    return v


def peer_contenders(case: Case, available) -> list[Contender]:
    out = []
    for v, mod in available:
        if not case.peers or not v.applies(case):
            continue
        detail = f"{v.detail} ({v.module} {_version(mod)})" + (f"; {v.note}" if v.note else "")
        out.append(Contender(v.label, "peer", detail, case.param_dtype, v.bytes(case),
                             lambda params, v=v, mod=mod, case=case: v.factory(mod, case, params),
                             matches_reference=v.same_math, compiles=v.compiles,
                             reattach_grads=v.reattach_grads))
    return out


# --------------------------------------------------------------------------- the line-up

def contenders_for(case: Case, fusedopt_mod, peers_available) -> list[Contender]:
    """fusedopt first, then torch (for-loop, foreach, fused, fused on fp32), then peers."""
    out = []
    if fusedopt_mod is not None:
        out.append(fusedopt_contender(fusedopt_mod, case))
        if case.fusedopt_baseline:
            out.append(fusedopt_contender(fusedopt_mod, case, plain=True))
    out += [torch_contender(case, name) for name in case.torch_variants]
    if case.fp32_reference:
        out.append(torch_contender(case, "torch-fused", dtype=torch.float32, label="torch-fused-fp32"))
    out += peer_contenders(case, peers_available)
    return out


def state_bytes(optimizer) -> int:
    """Bytes held in ``optimizer.state`` tensors (tensor subclasses counted by their inner
    tensors)."""
    total = 0

    def visit(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
                names, _ = obj.__tensor_flatten__()
                for n in names:
                    visit(getattr(obj, n))
            else:
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(getattr(optimizer, "state", {}))
    return total
