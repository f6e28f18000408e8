"""SAM optimizer-side benchmark: ``fusedopt.SAM(fusedopt.SGD)`` vs
``pytorch_optimizer.SAM(torch.optim.SGD(fused=True))`` on the same grads.

~41.7M fp32 params in 52 tensors (``fusedopt.bench.cases.GPT2_CPU``: GPT-2 widths, 4 blocks,
16k vocab), fixed random grads. One timed step is ``first_step()`` + ``second_step()``
(norm, save of w, perturbation, restore and the base SGD-momentum step); the forward and
backward passes are excluded since they are the same for both. Contenders alternate in
interleaved rounds (so drift on a shared machine hits both alike) and the median is reported.

Usage: ``python bench/sam_bench.py [--rounds 15] [--threads N] [--json bench/results/sam_cpu.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import torch  # noqa: E402

import fusedopt  # noqa: E402
from fusedopt.bench.cases import GPT2_CPU  # noqa: E402
from fusedopt.bench.machine import machine_info, versions  # noqa: E402

HYPER = dict(lr=1e-2, momentum=0.9)
RHO = 0.05


def make_params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


def contenders() -> dict:
    """name -> factory of the optimizer on a list of params."""
    import pytorch_optimizer
    return {
        "fusedopt.SAM(fusedopt.SGD)": lambda ps: fusedopt.SAM(ps, fusedopt.SGD, rho=RHO, **HYPER),
        "pytorch_optimizer.SAM(torch SGD fused)": lambda ps: pytorch_optimizer.SAM(
            ps, torch.optim.SGD, rho=RHO, fused=True, **HYPER),
    }


def timed_step(opt) -> float:
    t = time.perf_counter()
    opt.first_step()   # grads stay: the "second pass" grads are the same fixed grads
    opt.second_step()
    return (time.perf_counter() - t) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds per contender (default 15)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "sam_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_elems = sum(torch.Size(s).numel() for s in GPT2_CPU)
    # One param set per contender (same values and grads), so neither sees the other's state.
    opts = {name: make(make_params(GPT2_CPU)) for name, make in contenders().items()}
    names = list(opts)
    times = {name: [] for name in names}
    for _ in range(args.warmup):
        for name in names:
            timed_step(opts[name])
    for _ in range(args.rounds):
        for name in names:
            times[name].append(timed_step(opts[name]))
    med = {name: statistics.median(t) for name, t in times.items()}
    ours, ref = med[names[0]], med[names[1]]
    ratio = ref / ours
    print(f"SAM first_step + second_step, {len(GPT2_CPU)} fp32 tensors, {n_elems / 1e6:.1f}M params, "
          f"SGD momentum 0.9; {args.threads} thread(s); median of {args.rounds} interleaved rounds "
          f"(fusedopt ISA {versions().get('fusedopt_isa')})")
    for name in names:
        print(f"  {name:42s} {med[name]:9.2f} ms/step  (min {min(times[name]):.2f})")
    print(f"  pytorch_optimizer / fusedopt: {ratio:.2f}x")
    doc = dict(case=dict(shapes="fusedopt.bench.cases.GPT2_CPU", tensors=len(GPT2_CPU), params=n_elems,
                         dtype="float32", base="SGD", hyper=HYPER, rho=RHO,
                         timed="first_step() + second_step(), forward/backward excluded"),
               rounds=args.rounds, warmup=args.warmup, threads=args.threads,
               median_ms=med, times_ms=times, ratio_reference_over_fusedopt=ratio,
               machine=machine_info("cpu"), versions=versions())
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
