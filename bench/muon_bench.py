"""Muon step benchmark: fusedopt.Muon vs torch.optim.Muon on the matrices of a GPT block stack.

Each case holds the hidden matrices of ``--layers`` GPT blocks of width ``--d-model``
(``c_attn [3d, d]``, ``attn_proj [d, d]``, ``c_fc [4d, d]``, ``mlp_proj [d, 4d]`` per block,
as nn.Linear stores them) with fixed random fp32 grads, and times ``optimizer.step()`` alone.
Rounds interleave the two optimizers (so drift in machine load hits both alike); each round
times ``--steps`` steps of each; the reported time is the median over rounds of ms/step, and
the ratio is torch / fusedopt. Also reported: the share of fusedopt's step spent in the
Newton-Schulz matmuls (the same batched NS timed alone on the same stacks).

Usage: ``python bench/muon_bench.py [--json bench/results/muon_cpu.json]``. Runs two
configurations: the issue's 4-layer d=256 stack (3.1M params) and an 8-layer d=512 stack
(25M params). ``--device cuda`` runs it on a GPU (with synchronisation around each timing).
On a CPU shared with other jobs, ``--threads 1`` avoids OpenMP stragglers (a parallel region
waits for its slowest thread, which a busy core delays by whole scheduler slices).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import torch  # noqa: E402

import fusedopt  # noqa: E402
from fusedopt.muon import newton_schulz  # noqa: E402


def gpt_matrices(layers: int, d: int) -> list[tuple[int, int]]:
    return [shape for _ in range(layers) for shape in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))]


def make_params(shapes, device):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).mul_(0.02).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    return params


def timed(fn, steps, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3


def bench_config(layers, d, rounds, steps, device) -> dict:
    shapes = gpt_matrices(layers, d)
    n_params = sum(r * c for r, c in shapes)
    torch_params, fused_params = make_params(shapes, device), make_params(shapes, device)
    opts = {"torch.optim.Muon": torch.optim.Muon(torch_params, lr=0.02),
            "fusedopt.Muon": fusedopt.Muon(fused_params, lr=0.02)}
    # The NS share: fusedopt's stacks (one per shape; on the CPU, cut to its cache-sized
    # batches as the step does), orthogonalised alone.
    stacks = {}
    for p in fused_params:
        stacks.setdefault(tuple(p.shape), []).append(p.grad)
    stacks = [torch.stack(v) for v in stacks.values()]
    if device.type == "cpu":
        per = [max(1, fusedopt.muon.CPU_BATCH_ELEMENTS // (s.shape[1] * s.shape[2])) for s in stacks]
        stacks = [part for s, n in zip(stacks, per) for part in s.split(n)]

    def ns_only():
        for s in stacks:
            newton_schulz(s, (3.4445, -4.775, 2.0315), 5, 1e-7)

    for opt in opts.values():  # warm-up: lazy state, allocator, oneDNN primitive caches
        opt.step()
    ns_only()
    times = {name: [] for name in [*opts, "newton_schulz_only"]}
    for _ in range(rounds):
        for name, opt in opts.items():
            times[name].append(timed(opt.step, steps, device))
        times["newton_schulz_only"].append(timed(ns_only, steps, device))
    med = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "layers": layers, "d_model": d, "matrices": len(shapes), "params": n_params,
        "ms_per_step": med, "ms_per_step_min": {name: min(v) for name, v in times.items()},
        "ms_per_step_all_rounds": times,
        "ratio_torch_over_fusedopt": med["torch.optim.Muon"] / med["fusedopt.Muon"],
        "newton_schulz_share_of_fusedopt_step": med["newton_schulz_only"] / med["fusedopt.Muon"],
    }
    print(f"{layers} layers, d={d} ({n_params / 1e6:.1f}M params, {len(shapes)} matrices): "
          f"torch {med['torch.optim.Muon']:.2f} ms, fusedopt {med['fusedopt.Muon']:.2f} ms, "
          f"ratio {result['ratio_torch_over_fusedopt']:.2f}x; NS matmuls "
          f"{100 * result['newton_schulz_share_of_fusedopt_step']:.0f}% of fusedopt's step", flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--configs", default="4x256,8x512", help="comma-separated LAYERSxD_MODEL")
    ap.add_argument("--json", default=None, help="default: bench/results/muon_<device>.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    results = [bench_config(layers, d, args.rounds, args.steps, device) for layers, d in configs]
    out = {
        "benchmark": "muon_step", "device": str(device),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "fusedopt": fusedopt.__version__, "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "rounds": args.rounds, "steps_per_round": args.steps, "results": results,
    }
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"muon_{device.type}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
