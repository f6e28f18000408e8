"""The runs: which params and optimizer each uses, and the training loop shared by all.

Every run starts from the same fp32 init (cast to its param dtype), sees the same batches in
the same order and follows the same lr schedule; only the param dtype and the optimizer's
precision path differ."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

import fusedopt

from .data import Batches
from .model import GPTConfig, instantiate
from .schedule import make_wsd


@dataclass(frozen=True)
class RunSpec:
    name: str
    label: str
    param_dtype: torch.dtype
    optimizer: str                       # "fusedopt.AdamW" or "torch.optim.AdamW"
    precision: dict = field(default_factory=dict)


RUNS = {r.name: r for r in (
    RunSpec("fp32", "fp32 params, fusedopt AdamW (reference)", torch.float32, "fusedopt.AdamW"),
    # torch's single-tensor for-loop (foreach=False): every op of the update rounds to bf16,
    # and the moments are bf16 too (torch keeps state in the param dtype).
    RunSpec("bf16-naive", "bf16 params, torch.optim.AdamW(foreach=False)", torch.bfloat16,
            "torch.optim.AdamW"),
    RunSpec("bf16-sr", "bf16 params, fusedopt AdamW(stochastic_rounding=True)", torch.bfloat16,
            "fusedopt.AdamW", {"stochastic_rounding": True}),
    RunSpec("bf16-kahan", "bf16 params, fusedopt AdamW(kahan_summation=True)", torch.bfloat16,
            "fusedopt.AdamW", {"kahan_summation": True}),
    RunSpec("bf16-master", "bf16 params, fusedopt AdamW(master_weights=True)", torch.bfloat16,
            "fusedopt.AdamW", {"master_weights": True}),
)}


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float
    weight_decay: float
    warmup_steps: int
    cooldown_fraction: float
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    eval_every: int = 25
    seed: int = 0


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices (incl. the tied embedding), none on biases and LayerNorm weights."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


def make_optimizer(spec: RunSpec, model: torch.nn.Module, tc: TrainConfig):
    groups = param_groups(model, tc.weight_decay)
    kw = dict(lr=tc.lr, betas=tc.betas, eps=tc.eps)
    if spec.optimizer == "torch.optim.AdamW":
        return torch.optim.AdamW(groups, foreach=False, **kw)
    precision = dict(spec.precision)
    if precision.get("stochastic_rounding"):
        precision["seed"] = tc.seed
    return fusedopt.AdamW(groups, **kw, **precision)


def state_bytes(optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, master weights, Kahan
    compensation, step counters)."""
    return sum(v.numel() * v.element_size() for st in optimizer.state.values()
               for v in st.values() if torch.is_tensor(v))


def state_dtypes(optimizer) -> dict[str, str]:
    out: dict[str, set] = {}
    for st in optimizer.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                out.setdefault(k, set()).add(str(v.dtype).replace("torch.", ""))
    return {k: "/".join(sorted(v)) for k, v in sorted(out.items())}


@torch.no_grad()
def evaluate(model, batches: Batches) -> float:
    losses = [model.loss(x, y).item() for x, y in batches.val()]
    return sum(losses) / len(losses)


def train(spec: RunSpec, cfg: GPTConfig, init: dict, batches: Batches, tc: TrainConfig,
          on_step=None) -> dict:
    """One run; returns its curves and measurements. ``on_step(step, loss)`` after each step."""
    t_start = time.perf_counter()
    model = instantiate(cfg, init, spec.param_dtype)
    opt = make_optimizer(spec, model, tc)
    sched, sched_impl = make_wsd(opt, tc.warmup_steps, tc.steps, tc.cooldown_fraction)
    train_loss, lrs, val_step, val_loss = [], [], [], []
    train_s = 0.0

    def _eval(step):
        model.eval()
        val_step.append(step)
        val_loss.append(evaluate(model, batches))
        model.train()

    # Weights that no update moves during the whole cooldown: in bf16, updates below half an
    # ulp are rounded away unless the optimizer carries them (SR, Kahan, master weights).
    cooldown_start = tc.steps - round(tc.cooldown_fraction * tc.steps)
    at_cooldown = None

    _eval(0)
    for step in range(tc.steps):
        if step == cooldown_start:
            at_cooldown = [p.detach().clone() for p in model.parameters()]
        x, y = batches.train(step)
        t0 = time.perf_counter()
        lrs.append(float(opt.param_groups[0]["lr"]))
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = loss.item()
        train_s += time.perf_counter() - t0
        train_loss.append(value)
        if on_step is not None:
            on_step(step, value)
        if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
            _eval(step + 1)

    n_params = sum(p.numel() for p in model.parameters())
    p_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    s_bytes = state_bytes(opt)
    tail = train_loss[-min(10, len(train_loss)):]
    unchanged = None
    if at_cooldown is not None:
        same = sum(int((p.detach() == q).sum()) for p, q in zip(model.parameters(), at_cooldown))
        unchanged = same / n_params
    return dict(
        name=spec.name, label=spec.label, weight_decay=tc.weight_decay,
        param_dtype=str(spec.param_dtype).replace("torch.", ""), optimizer=spec.optimizer,
        precision=dict(spec.precision), state_dtypes=state_dtypes(opt), schedule=sched_impl,
        curves=dict(train_loss=train_loss, lr=lrs, val_step=val_step, val_loss=val_loss),
        final_train_loss=sum(tail) / len(tail), final_val_loss=val_loss[-1],
        unchanged_in_cooldown=unchanged,
        finite=all(math.isfinite(v) for v in train_loss + val_loss),
        tokens_per_s=tc.steps * batches.tokens_per_step / train_s if train_s > 0 else None,
        train_s=train_s, wall_s=time.perf_counter() - t_start,
        n_params=n_params, param_bytes=p_bytes, state_bytes=s_bytes,
        bytes_per_param=dict(param=p_bytes / n_params, state=s_bytes / n_params,
                             total=(p_bytes + s_bytes) / n_params),
    )
