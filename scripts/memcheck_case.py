"""A small workload for compute-sanitizer (run by scripts/gpu_test.sh): every CUDA kernel of
fusedopt once or twice, on odd-sized tensors that end mid-chunk, mid-block and mid-vector.

    compute-sanitizer --tool memcheck python3 scripts/memcheck_case.py

Covers: AdamW (fp32, amsgrad, tensor lr, AMP scalars, clipping, track_stats), Adam with bf16
stochastic rounding and bf16 moments, AdamW with fp16 master weights and bf16 Kahan summation,
SGD with and without momentum (first step and later steps, stochastic rounding), more
tensors than one launch holds, params that are not 16-byte aligned (the kernels' one-element
path), the sum-of-squares reduction and weight averaging (EMA).
Exits non-zero if a result is not finite or CUDA reports an error.
"""
from __future__ import annotations

import sys

import torch

import fusedopt
from fusedopt import _backend as B

SIZES = [1, 3, 7, 513, 2049, 65535, 65537, 131073]  # around 512 x 4 per block and 65536 per chunk


def params_of(dtype, sizes=SIZES, seed=0, misaligned=False):
    """Fresh params; `misaligned`: views one element into a larger storage, so no buffer of
    theirs is 16-byte aligned and the kernels take their one-element path."""
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(n, generator=gen).to(dtype).cuda() for n in sizes]
    if misaligned:
        values = [torch.empty(v.numel() + 1, dtype=dtype, device="cuda")[1:].copy_(v) for v in values]
    return [torch.nn.Parameter(v) for v in values]


def grads_for(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).cuda()


def run(make_opt, dtype, steps=2, sizes=SIZES, amp=False, misaligned=False):
    params = params_of(dtype, sizes, misaligned=misaligned)
    opt = make_opt(params)
    for k in range(steps):
        grads_for(params, 100 + k)
        if amp:
            opt.grad_scale = torch.tensor(4.0, device="cuda")
            opt.found_inf = torch.tensor(float(k == 1), device="cuda")  # the second step is skipped
        opt.step()
    torch.cuda.synchronize()
    bad = [i for i, p in enumerate(params) if not torch.isfinite(p.detach().float()).all()]
    if bad:
        raise SystemExit(f"non-finite params {bad} after {type(opt).__name__}")
    return opt


def main() -> int:
    if not torch.cuda.is_available():
        print("memcheck_case: no CUDA device", file=sys.stderr)
        return 2
    if not B.cuda_built():
        print("memcheck_case: fusedopt was built without its CUDA module", file=sys.stderr)
        return 2
    lr = torch.tensor(0.01, device="cuda")
    run(lambda ps: fusedopt.AdamW(ps, lr=lr, amsgrad=True, max_grad_norm=1.0, track_stats=True), torch.float32,
        amp=True)
    run(lambda ps: fusedopt.Adam(ps, lr=0.01, weight_decay=0.1, stochastic_rounding=True, seed=1,
                                 state_dtype=torch.bfloat16), torch.bfloat16)
    run(lambda ps: fusedopt.AdamW(ps, lr=0.01, master_weights=True), torch.float16)
    run(lambda ps: fusedopt.AdamW(ps, lr=0.01, kahan_summation=True), torch.bfloat16)
    run(lambda ps: fusedopt.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), torch.float32,
        steps=3)
    run(lambda ps: fusedopt.SGD(ps, lr=0.05, stochastic_rounding=True, seed=2, max_grad_norm=0.5), torch.bfloat16)
    run(lambda ps: fusedopt.SGD(ps, lr=0.05, momentum=0.5, dampening=0.1, track_stats=True), torch.float16,
        amp=True)
    # Params whose buffers are not 16-byte aligned: the one-element path of every step.
    run(lambda ps: fusedopt.AdamW(ps, lr=0.01, kahan_summation=True), torch.bfloat16, misaligned=True)
    run(lambda ps: fusedopt.SGD(ps, lr=0.05, momentum=0.9), torch.float32, misaligned=True)
    # More tensors than one launch (and one step-counter launch) holds.
    run(lambda ps: fusedopt.AdamW(ps, lr=0.01), torch.float32, sizes=[1 + i % 97 for i in range(500)])

    from fusedopt.averaging import EMA
    params = params_of(torch.bfloat16)
    ema = EMA(params, decay=0.9)
    with torch.no_grad():
        for p in params:
            p.add_(0.5)
    ema.update()
    with ema.average_parameters():
        pass
    torch.cuda.synchronize()
    print("memcheck_case: all kernels ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
