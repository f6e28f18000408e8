"""The CPU kernels are compiled for several instruction sets and picked at import; every build
must give the same bits (no FMA contraction, IEEE divide and sqrt, the same integer rounding
code). Each ISA runs in its own process, capped by FUSEDOPT_CPU_ISA."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import hashlib, json, torch, fusedopt
from fusedopt import _C
torch.manual_seed(0)
out = {"isa": _C.isa()}
cases = {
    "adamw_fp32": (torch.float32, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "adamw_bf16": (torch.bfloat16, dict(lr=1e-2)),
    "adamw_bf16_sr": (torch.bfloat16, dict(lr=1e-3, stochastic_rounding=True, seed=7)),
    "adamw_bf16_kahan": (torch.bfloat16, dict(lr=1e-3, kahan_summation=True)),
    # bf16 moments: the stochastic rounding of states (both random streams) in the vector loop
    "adamw_bf16_sr_bf16state": (torch.bfloat16, dict(lr=1e-3, stochastic_rounding=True, seed=11,
                                                     state_dtype=torch.bfloat16, amsgrad=True)),
    "adamw_bf16_kahan_bf16state": (torch.bfloat16, dict(lr=1e-3, kahan_summation=True, state_dtype=torch.bfloat16)),
    "adamw_fp16_master": (torch.float16, dict(lr=1e-3, master_weights=True)),
    # The AVX2 build's hand loop for bf16 Adam (adam_bf16_avx2.h): its variants and precisions.
    "adam_bf16_coupled_amsgrad_maximize": (torch.bfloat16, dict(lr=1e-2, weight_decay=0.1, amsgrad=True,
                                                                maximize=True, state_dtype=torch.bfloat16)),
    "adamw_bf16_amsgrad": (torch.bfloat16, dict(lr=1e-2, amsgrad=True)),
    "adamw_bf16_sr_amsgrad": (torch.bfloat16, dict(lr=1e-3, stochastic_rounding=True, seed=5, amsgrad=True)),
    "adamw_bf16_kahan_amsgrad_bf16state": (torch.bfloat16, dict(lr=1e-3, kahan_summation=True, amsgrad=True,
                                                                state_dtype=torch.bfloat16)),
    "adamw_bf16_master": (torch.bfloat16, dict(lr=1e-3, master_weights=True, weight_decay=0.1)),
    "adamw_bf16_master_bf16state": (torch.bfloat16, dict(lr=1e-3, master_weights=True, state_dtype=torch.bfloat16)),
    # 8-bit moments (params >= 4096 elements): the AVX-512 build's register codec
    # (cpu/quantized_simd.h), nearest and stochastic codes, against the others' bucket tables
    "adamw_8bit": (torch.float32, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, state_dtype=torch.uint8)),
    "adamw_bf16_sr_8bit": (torch.bfloat16, dict(lr=1e-3, stochastic_rounding=True, seed=5, state_dtype=torch.uint8)),
    # Adam on fp32 params with 8-bit moments, no amsgrad: the AVX-512 build's fused block
    # pipeline (RegisterCodec::adam_blocks), decoupled and coupled weight decay, with grads
    # scaled (grad_scale below, maximize) and as they are (its loop without the grad multiply)
    "adamw_8bit_plain": (torch.float32, dict(lr=1e-2, weight_decay=0.1, state_dtype=torch.uint8)),
    "adam_8bit_coupled": (torch.float32, dict(lr=1e-2, weight_decay=0.1, maximize=True, state_dtype=torch.uint8)),
    "adamw_8bit_unscaled": (torch.float32, dict(lr=1e-2, weight_decay=0.1, state_dtype=torch.uint8)),
    "adam_8bit_coupled_unscaled": (torch.float32, dict(lr=1e-2, weight_decay=0.1, state_dtype=torch.uint8)),
    # Subnormal grads (times 1e-41): exp_avg's absmax is subnormal, so 1 / absmax overflows to
    # inf and the values to quantize are +-inf or NaN (exp_avg_sq underflows to 0): the fused
    # loop's search (no binade clamp there) must leave every such lane to the exact path.
    "adamw_8bit_subnormal": (torch.float32, dict(lr=1e-2, weight_decay=0.1, state_dtype=torch.uint8)),
}
tiny = {"adamw_8bit_subnormal": 1e-41}
# Cases stepped with GradScaler-style scaled grads (grad_scale), plus one skipped step (found_inf).
scaled = {"adam_bf16_coupled_amsgrad_maximize": 2.0 ** 10, "adamw_bf16_sr_bf16state": 2.0 ** 8,
          "adamw_8bit_plain": 2.0 ** 6}
for name, (dtype, kw) in cases.items():
    g = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in (1, 17, 40000, 100003)]
    opt = (fusedopt.Adam if name.startswith("adam_") else fusedopt.AdamW)(ps, **kw)
    for k in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype) * tiny.get(name, 1.0)
        if name in scaled:
            for p in ps:
                p.grad *= scaled[name]
            opt.grad_scale = torch.tensor(scaled[name])
            opt.found_inf = torch.tensor(1.0 if k == 1 else 0.0)
        opt.step()
    h = hashlib.sha256()
    for p in ps:
        for t in (p, *opt.state[p].values()):
            h.update(t.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    out[name] = h.hexdigest()
sgd_ps = [torch.nn.Parameter(torch.randn(5000).bfloat16())]
opt = fusedopt.SGD(sgd_ps, lr=0.1, momentum=0.9, nesterov=True, stochastic_rounding=True, seed=3)
for _ in range(3):
    sgd_ps[0].grad = torch.randn(5000).bfloat16()
    opt.step()
out["sgd_sr"] = hashlib.sha256(sgd_ps[0].detach().view(torch.uint8).numpy().tobytes()).hexdigest()
for name, make in (("sgd_8bit", lambda ps: fusedopt.SGD(ps, lr=0.1, momentum=0.9, state_dtype=torch.uint8)),
                   ("lion_8bit", lambda ps: fusedopt.Lion(ps, lr=1e-3, state_dtype=torch.uint8))):
    g = torch.Generator().manual_seed(2)
    ps = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (5000, 70001)]
    opt = make(ps)
    h = hashlib.sha256()
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    for p in ps:
        for t in (p, *opt.state[p].values()):
            h.update(t.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    out[name] = h.hexdigest()
print(json.dumps(out))
"""


def _run(isa: str | None) -> dict:
    env = dict(os.environ)
    env.pop("FUSEDOPT_CPU_ISA", None)
    if isa:
        env["FUSEDOPT_CPU_ISA"] = isa
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_every_isa_build_gives_the_same_bits():
    # None: the widest build the CPU runs (AVX-512 with VBMI byte permutes where it has them)
    runs = {isa: _run(isa) for isa in ("baseline", "avx2", "avx512", None)}
    isas = {k: v.pop("isa") for k, v in runs.items()}
    assert isas["baseline"] == "baseline"
    if len(set(isas.values())) < 2:
        pytest.skip(f"this CPU offers only the {isas[None]} build")
    base = runs["baseline"]
    for cap, run in runs.items():
        assert run == base, f"{isas[cap]} build differs from baseline: " + ", ".join(
            k for k in base if run[k] != base[k])
