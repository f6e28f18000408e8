"""Muon step benchmark: fusedopt.Muon vs torch.optim.Muon on the matrices of a GPT block stack.

Each case holds the hidden matrices of ``--layers`` GPT blocks of width ``--d-model``
(``c_attn [3d, d]``, ``attn_proj [d, d]``, ``c_fc [4d, d]``, ``mlp_proj [d, 4d]`` per block,
as nn.Linear stores them) with fixed random fp32 grads, and times ``optimizer.step()`` alone.
Rounds interleave the two optimizers (so drift in machine load hits both alike); each round
times ``--steps`` steps of each; the reported time is the median over rounds of ms/step, and
the ratio is torch / fusedopt. Each timing is taken twice: wall clock and the process's CPU
time (``time.process_time``, all threads): on a CPU shared with other jobs the wall clock also
counts the time this process waited for a core, the CPU time does not (with one thread it is
the work itself; with several it also counts OpenMP's waiting). Also reported, as shares of
fusedopt's step: ``newton_schulz_only`` (the step's batched NS on the same stacks and
workspaces, normalisation included) and ``matmul_only`` (just its bf16 ``bmm``/``baddbmm``
calls, with their operand layouts and ``out=`` buffers; a ``baddbmm`` includes the copy of its
input into ``out`` that it starts from). The load average is recorded before and after.

Usage: ``python bench/muon_bench.py [--threads 1,2] [--json bench/results/muon_cpu.json]``.
Runs two configurations: the issue's 4-layer d=256 stack (3.1M params) and an 8-layer d=512
stack (25M params), once per thread count. ``--device cuda`` runs it on a GPU (with synchronisation around each timing).
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


def timed(fn, steps, device) -> tuple[float, float]:
    """(wall ms, process CPU ms) per call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3, (time.process_time() - cpu) / steps * 1e3


def bench_config(layers, d, rounds, steps, device) -> dict:
    shapes = gpt_matrices(layers, d)
    n_params = sum(r * c for r, c in shapes)
    torch_params, fused_params = make_params(shapes, device), make_params(shapes, device)
    opts = {"torch.optim.Muon": torch.optim.Muon(torch_params, lr=0.02),
            "fusedopt.Muon": fusedopt.Muon(fused_params, lr=0.02)}
    # The NS share: fusedopt's stacks (one per shape; on the CPU, cut to its cache-sized
    # batches as the step does, each with its kept workspace).
    stacks = {}
    for p in fused_params:
        stacks.setdefault(tuple(p.shape), []).append(p.grad)
    stacks = [torch.stack(v).bfloat16() for v in stacks.values()]
    if device.type == "cpu":
        per = [max(1, fusedopt.muon.CPU_BATCH_ELEMENTS // (s.shape[1] * s.shape[2])) for s in stacks]
        stacks = [part.contiguous() for s, n in zip(stacks, per) for part in s.split(n)]
        work = [fusedopt.muon._Workspace(*s.shape, device) for s in stacks]
    else:
        work = [None] * len(stacks)
    coefficients = (3.4445, -4.775, 2.0315)

    def ns_only():
        for s, w in zip(stacks, work):
            if w is None:
                newton_schulz(s, coefficients, 5, 1e-7)
            else:
                w.stack.copy_(s)
                newton_schulz(w.stack, coefficients, 5, 1e-7, w)

    record = []  # the NS's GEMM calls, replayed by matmul_only

    def recording(name):
        original = getattr(torch, name)

        def call(*args, **kwargs):
            record.append((original, args, kwargs))
            return original(*args, **kwargs)
        return call

    saved = torch.bmm, torch.baddbmm
    torch.bmm, torch.baddbmm = recording("bmm"), recording("baddbmm")
    try:
        ns_only()
    finally:
        torch.bmm, torch.baddbmm = saved

    def matmul_only():
        for fn, args, kwargs in record:
            fn(*args, **kwargs)

    for opt in opts.values():  # warm-up: lazy state, allocator, oneDNN primitive caches
        opt.step()
    ns_only()
    fns = {**{name: opt.step for name, opt in opts.items()}, "newton_schulz_only": ns_only,
           "matmul_only": matmul_only}
    times = {name: [] for name in fns}
    cpu_times = {name: [] for name in fns}
    load_before = os.getloadavg()
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu = timed(fn, steps, device)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    med = {name: statistics.median(v) for name, v in times.items()}
    cpu_med = {name: statistics.median(v) for name, v in cpu_times.items()}
    result = {
        "layers": layers, "d_model": d, "matrices": len(shapes), "params": n_params,
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "ms_per_step": med, "ms_per_step_min": {name: min(v) for name, v in times.items()},
        "cpu_ms_per_step": cpu_med, "cpu_ms_per_step_min": {name: min(v) for name, v in cpu_times.items()},
        "ms_per_step_all_rounds": times, "cpu_ms_per_step_all_rounds": cpu_times,
        "ratio_torch_over_fusedopt": med["torch.optim.Muon"] / med["fusedopt.Muon"],
        "ratio_torch_over_fusedopt_cpu_time": cpu_med["torch.optim.Muon"] / cpu_med["fusedopt.Muon"],
        "newton_schulz_share_of_fusedopt_step": med["newton_schulz_only"] / med["fusedopt.Muon"],
        "matmul_share_of_fusedopt_step": med["matmul_only"] / med["fusedopt.Muon"],
        "matmul_share_of_fusedopt_step_cpu_time": cpu_med["matmul_only"] / cpu_med["fusedopt.Muon"],
    }
    print(f"{layers} layers, d={d} ({n_params / 1e6:.1f}M params, {len(shapes)} matrices), "
          f"{torch.get_num_threads()} thread(s): torch {med['torch.optim.Muon']:.2f} ms, fusedopt "
          f"{med['fusedopt.Muon']:.2f} ms, ratio {result['ratio_torch_over_fusedopt']:.2f}x "
          f"(CPU time: {cpu_med['torch.optim.Muon']:.2f} / {cpu_med['fusedopt.Muon']:.2f} ms, "
          f"{result['ratio_torch_over_fusedopt_cpu_time']:.2f}x); NS "
          f"{100 * result['newton_schulz_share_of_fusedopt_step']:.0f}%, its matmuls "
          f"{100 * result['matmul_share_of_fusedopt_step']:.0f}% "
          f"({100 * result['matmul_share_of_fusedopt_step_cpu_time']:.0f}% of CPU time) of fusedopt's step; "
          f"load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", default=None,
                    help="torch intra-op threads, comma-separated to run each (default: torch's)")
    ap.add_argument("--configs", default="4x256,8x512", help="comma-separated LAYERSxD_MODEL")
    ap.add_argument("--json", default=None, help="default: bench/results/muon_<device>.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    results = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        results += [bench_config(layers, d, args.rounds, args.steps, device) for layers, d in configs]
    out = {
        "benchmark": "muon_step", "device": str(device),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "fusedopt": fusedopt.__version__, "torch_threads": thread_counts,
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
