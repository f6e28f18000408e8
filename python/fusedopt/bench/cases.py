"""Benchmark cases: which tensors, which optimizer, and how many bytes a step must move.

A case is a list of parameter shapes, a param dtype, an optimizer with its hyper-parameters and
a bytes-per-parameter model: the memory traffic an ideal single-pass implementation of that step
has to do. GB/s in the report is ``model bytes * params / time``, an *effective* bandwidth that
is comparable with the machine's measured streaming bandwidth.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import torch

# GPT-2 (HF naming, Conv1D weights stored (in, out)). One transformer block, in
# ``named_parameters()`` order.
_WIDTH = 768


def _gpt2_block(d: int = _WIDTH) -> list[tuple[int, ...]]:
    return [
        (d,), (d,),                  # ln_1.weight, ln_1.bias
        (d, 3 * d), (3 * d,),        # attn.c_attn.weight, .bias
        (d, d), (d,),                # attn.c_proj.weight, .bias
        (d,), (d,),                  # ln_2.weight, ln_2.bias
        (d, 4 * d), (4 * d,),        # mlp.c_fc.weight, .bias
        (4 * d, d), (d,),            # mlp.c_proj.weight, .bias
    ]


def gpt2_shapes(vocab: int, layers: int, context: int = 1024, d: int = _WIDTH) -> list[tuple[int, ...]]:
    """wte, wpe, ``layers`` blocks, ln_f: ``2 + 12 * layers + 2`` tensors."""
    return [(vocab, d), (context, d)] + _gpt2_block(d) * layers + [(d,), (d,)]


# GPT-2 small exactly: 124,439,808 params in 148 tensors.
GPT2_SMALL = gpt2_shapes(vocab=50257, layers=12)
# CPU-sized GPT-2: same widths, 4 blocks, 16k vocab: 41,722,368 params in 52 tensors.
GPT2_CPU = gpt2_shapes(vocab=16384, layers=4)
MANY_SMALL = [(1024,)] * 2000


def block_matrices(layers: int, d: int = _WIDTH) -> list[tuple[int, ...]]:
    """The 2-D weights of ``layers`` GPT-2 blocks (what Muon orthogonalizes; embeddings, biases
    and norms go to AdamW in Muon training): 4 matrices, 7.08M params per block at d=768."""
    return [s for s in _gpt2_block(d) if len(s) == 2] * layers


def adam_bytes(param: int, grad: int, state: int, master: int = 0, extra_read: int = 0) -> int:
    """Bytes per param of one Adam(W) step: param read+write, grad read, two moments read+write,
    an fp32 master copy read+write (then the param is only written), plus extra reads
    (e.g. the grad-norm pass of clipping)."""
    if master:
        return param + grad + 4 * state + 2 * master + extra_read
    return 2 * param + grad + 4 * state + extra_read


def sgd_bytes(param: int, grad: int, state: int) -> int:
    """Bytes per param of one SGD-with-momentum step: param r/w, grad r, buffer r/w."""
    return 2 * param + grad + 2 * state


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    optimizer: str                      # fusedopt class name ("AdamW", "Lion", ...) or "EMA" / "SAM" / "Snapshot"
    param_dtype: torch.dtype
    cpu_shapes: tuple
    cuda_shapes: tuple
    hyper: dict                         # hyper-parameters every contender gets
    bytes_per_param: int                # model for the case's own param dtype
    bytes_model: str                    # human-readable breakdown
    fusedopt_kwargs: dict = field(default_factory=dict)   # precision keywords (only fusedopt)
    precision: bool = False             # run only if fusedopt accepts ``fusedopt_kwargs``
    torch_variants: tuple = ("torch-forloop", "torch-foreach", "torch-fused")
    fp32_reference: bool = False        # add torch-fused on fp32 copies of the params
    grad_clip: float | None = None      # torch contenders clip with clip_grad_norm_(foreach=True)
    peers: bool = True                  # peer libraries take part
    fusedopt_baseline: bool = False     # also time fusedopt without fusedopt_kwargs ("fusedopt-plain")
    # The torch.optim class (and its hyper-parameters) the torch contenders run, where torch has
    # no such optimizer: the step that moves the same bytes (the ratio then compares speed at
    # equal memory traffic). Empty: the case's own optimizer and hyper.
    torch_optimizer: str = ""
    torch_hyper: dict | None = None
    # Ratios are to this contender's time (torch's fused step unless torch has none).
    baseline: str = "torch-fused"
    # When fusedopt lacks the case's class or keywords: False skips the whole case (nothing to
    # compare with), True still runs torch and the peers, with fusedopt's row saying why not.
    run_without_fusedopt: bool = False
    # Correctness guard: the torch.optim class (and its hyper-parameters) whose one step, run
    # with foreach=False on fp32 copies, the contenders that do the same math must match.
    # Empty: the case's torch optimizer when it is the case's own optimizer, else none.
    reference: str = ""
    reference_hyper: dict | None = None
    # Tensors of at most this many dims take part (Muon orthogonalizes matrices only).
    max_dims: int | None = None
    # The fusedopt contender runs extra work around this contender's step (e.g. a snapshot and
    # restore around an AdamW step): the case then also reports that work's cost,
    # fusedopt - this, and its ratio to this contender's step.
    overhead_of: str = ""
    # How many of overhead_of's steps one call of the fusedopt contender runs (the work around
    # them is fusedopt - overhead_steps x this).
    overhead_steps: int = 1

    def shapes(self, device: str, scale: float = 1.0) -> list[tuple[int, ...]]:
        base = self.cuda_shapes if device == "cuda" else self.cpu_shapes
        return scale_shapes(base, scale)

    def reference_optimizer(self) -> tuple[str, dict] | None:
        """``(torch.optim class name, hyper)`` of the guard's reference step, or None."""
        if self.reference:
            return self.reference, dict(self.reference_hyper if self.reference_hyper is not None else self.hyper)
        if self.optimizer in ("AdamW", "Adam", "SGD") and not self.torch_optimizer:
            return self.optimizer, dict(self.hyper)
        return None


def scale_shapes(shapes, scale: float) -> list[tuple[int, ...]]:
    """Multiply the param count by ``scale``, scaling each shape's first dim (min 1)."""
    if scale == 1.0:
        return [tuple(s) for s in shapes]
    return [(max(1, round(s[0] * scale)),) + tuple(s[1:]) for s in shapes]


def numel(shapes) -> int:
    return sum(prod(s) for s in shapes)


_ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
_ADAM = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)   # coupled (L2) decay
_SGD = dict(lr=1e-2, momentum=0.9)

_F32, _BF16 = torch.float32, torch.bfloat16
_GPT = dict(cpu_shapes=tuple(GPT2_CPU), cuda_shapes=tuple(GPT2_SMALL))

CASES: dict[str, Case] = {c.name: c for c in [
    Case("adamw_fp32", "AdamW, fp32 params/grads/states, GPT-2 shapes", "AdamW", _F32, hyper=_ADAMW,
         bytes_per_param=adam_bytes(4, 4, 4),
         bytes_model="p 4r+4w, g 4r, m 4r+4w, v 4r+4w = 28", **_GPT),
    Case("adamw_bf16", "AdamW, bf16 params/grads, bf16 moments (torch keeps the param dtype)",
         "AdamW", _BF16, hyper=_ADAMW, bytes_per_param=adam_bytes(2, 2, 2),
         bytes_model="p 2r+2w, g 2r, m 2r+2w, v 2r+2w = 14", **_GPT),
    Case("sgd_momentum_fp32", "SGD momentum=0.9, fp32, GPT-2 shapes", "SGD", _F32, hyper=_SGD,
         bytes_per_param=sgd_bytes(4, 4, 4),
         bytes_model="p 4r+4w, g 4r, buf 4r+4w = 20", **_GPT),
    Case("adam_fp32", "Adam with coupled (L2) weight decay 1e-2, fp32, GPT-2 shapes", "Adam", _F32,
         hyper=_ADAM, bytes_per_param=adam_bytes(4, 4, 4),
         bytes_model="p 4r+4w, g 4r, m 4r+4w, v 4r+4w = 28", **_GPT),
    Case("many_small", "AdamW fp32, 2,000 tensors of 1,024 elements (launch/loop overhead)",
         "AdamW", _F32, cpu_shapes=tuple(MANY_SMALL), cuda_shapes=tuple(MANY_SMALL), hyper=_ADAMW,
         bytes_per_param=adam_bytes(4, 4, 4),
         bytes_model="p 4r+4w, g 4r, m 4r+4w, v 4r+4w = 28"),
    Case("adamw_bf16_sr_bf16state",
         "AdamW on bf16 params with stochastic rounding and bf16 moments (fusedopt) vs torch "
         "fused on bf16 params and on fp32 params", "AdamW", _BF16, hyper=_ADAMW,
         fusedopt_kwargs=dict(stochastic_rounding=True, state_dtype=torch.bfloat16),
         precision=True, torch_variants=("torch-fused",), fp32_reference=True,
         bytes_per_param=adam_bytes(2, 2, 2),
         bytes_model="p 2r+2w, g 2r, m 2r+2w, v 2r+2w = 14 (torch-fused-fp32: 28)", **_GPT),
    Case("adamw_master",
         "AdamW on bf16 params with fp32 master weights and fp32 moments (fusedopt) vs torch "
         "fused on bf16 params and on fp32 params", "AdamW", _BF16, hyper=_ADAMW,
         fusedopt_kwargs=dict(master_weights=True), precision=True,
         torch_variants=("torch-fused",), fp32_reference=True,
         bytes_per_param=adam_bytes(2, 2, 4, master=4),
         bytes_model="p 2w, master 4r+4w, g 2r, m 4r+4w, v 4r+4w = 28 "
                     "(torch-fused on bf16: 14, torch-fused-fp32: 28)", **_GPT),
    Case("adamw_clip",
         "AdamW fp32 with global grad-norm clipping at 1.0: fusedopt max_grad_norm=1.0 vs "
         "torch clip_grad_norm_(foreach=True) + step", "AdamW", _F32, hyper=_ADAMW,
         fusedopt_kwargs=dict(max_grad_norm=1.0), precision=True, grad_clip=1.0,
         torch_variants=("torch-foreach", "torch-fused"),
         bytes_per_param=adam_bytes(4, 4, 4, extra_read=4),
         bytes_model="norm pass g 4r, then p 4r+4w, g 4r, m 4r+4w, v 4r+4w = 32", **_GPT),
    Case("adamw_kahan",
         "AdamW on bf16 params with Kahan-compensated updates (bf16 compensation buffer) vs torch "
         "fused on bf16 params and on fp32 params", "AdamW", _BF16, hyper=_ADAMW,
         fusedopt_kwargs=dict(kahan_summation=True), precision=True,
         torch_variants=("torch-fused",), fp32_reference=True,
         bytes_per_param=adam_bytes(2, 2, 2) + 4,
         bytes_model="p 2r+2w, comp 2r+2w, g 2r, m 2r+2w, v 2r+2w = 18 (torch-fused-fp32: 28)", **_GPT),
    Case("adamw_stats",
         "AdamW fp32 with in-step telemetry (track_stats=True: per-group grad/param/update norms) "
         "vs the same step without it (fusedopt-plain): the telemetry's cost", "AdamW", _F32,
         hyper=_ADAMW, fusedopt_kwargs=dict(track_stats=True), precision=True, fusedopt_baseline=True,
         torch_variants=("torch-fused",), bytes_per_param=adam_bytes(4, 4, 4),
         bytes_model="p 4r+4w, g 4r, m 4r+4w, v 4r+4w = 28 (the norms read nothing extra)", **_GPT),
    Case("lion_fp32",
         "Lion fp32 (one moment) vs lion-pytorch and optimi (foreach); torch has no Lion: its fused "
         "SGD with momentum moves the same 20 bytes/param", "Lion", _F32,
         hyper=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1), torch_variants=("torch-fused",),
         torch_optimizer="SGD", torch_hyper=_SGD, reference="Lion", bytes_per_param=sgd_bytes(4, 4, 4),
         bytes_model="p 4r+4w, g 4r, m 4r+4w = 20 (torch-fused: SGD momentum, same 20)", **_GPT),
    Case("schedulefree_adamw_fp32",
         "AdamWScheduleFree fp32 (train mode) vs schedulefree (foreach); torch has none: its fused "
         "AdamW moves the same 28 bytes/param", "AdamWScheduleFree", _F32,
         hyper=dict(lr=2.5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), torch_variants=("torch-fused",),
         torch_optimizer="AdamW", torch_hyper=_ADAMW, bytes_per_param=adam_bytes(4, 4, 4),
         bytes_model="y 4r+4w, g 4r, z 4r+4w, v 4r+4w = 28 (torch-fused: AdamW, same 28)", **_GPT),
    Case("adamw_8bit",
         "AdamW fp32 params with 8-bit blockwise moments: fusedopt state_dtype=torch.uint8 vs "
         "bitsandbytes and torchao AdamW8bit, and torch fused with fp32 moments",
         "AdamW", _F32, hyper=_ADAMW, fusedopt_kwargs=dict(state_dtype=torch.uint8), precision=True,
         torch_variants=("torch-fused",), run_without_fusedopt=True,
         bytes_per_param=adam_bytes(4, 4, 1) + 2 * 4 / 256,
         bytes_model="p 4r+4w, g 4r, m 1r+1w, v 1r+1w (+ fp32 absmax per 256) = 16 "
                     "(torch-fused: 28)", **_GPT),
    Case("muon",
         "Muon on the 2-D weights of GPT-2 blocks (5 Newton-Schulz steps, compute-bound): "
         "fusedopt.Muon vs torch.optim.Muon", "Muon", _F32,
         hyper=dict(lr=2e-2, weight_decay=0.1, momentum=0.95, nesterov=True),
         torch_variants=("torch",), baseline="torch", reference="Muon",
         cpu_shapes=tuple(block_matrices(1)), cuda_shapes=tuple(block_matrices(12)), max_dims=2,
         bytes_per_param=sgd_bytes(4, 4, 4),
         bytes_model="p 4r+4w, g 4r, buf 4r+4w = 20 (plus the Newton-Schulz matmuls' traffic)"),
    Case("sam_sgd",
         "SAM (rho 0.05) around SGD momentum, optimizer side only (first_step + second_step; the "
         "second backward is not timed, the grads stay): fusedopt.SAM(fusedopt.SGD) vs "
         "pytorch_optimizer.SAM(torch SGD fused); torch-fused = the base SGD step alone",
         "SAM", _F32, hyper=dict(rho=0.05, **_SGD), torch_variants=("torch-fused",),
         torch_optimizer="SGD", torch_hyper=_SGD, reference="SGD", reference_hyper=_SGD,
         bytes_per_param=4 + 16 + sgd_bytes(4, 4, 4),
         bytes_model="norm g 4r; perturb, w saved in the same pass: p 4r+4w, g 4r, w 4w; SGD step "
                     "restoring w in its pass: w 4r (for p's 4r), p 4w, g 4r, buf 4r+4w = 40 "
                     "(torch-fused: the SGD step, 20)", **_GPT),
    Case("snapshot_restore",
         "LossAdaptiveLR's snapshot + restore of params and AdamW state as a search does them: take "
         "the snapshot, one trial AdamW step, restore, the next step (m and v are saved by the "
         "trial step's pass and restored by the next step's) vs two steps alone (fusedopt-plain, "
         "torch-fused); the snapshot + restore cost is the difference",
         "Snapshot", _F32,
         hyper=_ADAMW, torch_variants=("torch-fused",), torch_optimizer="AdamW", torch_hyper=_ADAMW,
         reference="AdamW", reference_hyper=_ADAMW, fusedopt_baseline=True, peers=False,
         overhead_of="fusedopt-plain", overhead_steps=2, bytes_per_param=8 + 28 + 8 + 8 + 28 + 8,
         bytes_model="take p 4r+4w; trial step 28 + m, v saved 8w; restore p 4r+4w; step 28 + m, v "
                     "read from the snapshot 8 = 88 per two steps (two steps alone: 56)", **_GPT),
    Case("ema_update",
         "EMA of fp32 weights (decay 0.999): fusedopt.averaging.EMA.update vs torch._foreach_lerp_ "
         "(what AveragedModel's EMA does) and a per-tensor lerp_ loop", "EMA", _F32,
         hyper=dict(decay=0.999), torch_variants=("torch-forloop", "torch-foreach"), peers=False,
         bytes_per_param=12, bytes_model="avg 4r+4w, p 4r = 12", **_GPT),
]}

DEFAULT_CASES = list(CASES)


def select(names: str | None) -> list[Case]:
    """Cases named in a comma-separated list (all when ``names`` is empty)."""
    if not names:
        return [CASES[n] for n in DEFAULT_CASES]
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    return [CASES[n] for n in dict.fromkeys(wanted)]
