"""Cost of LossAdaptiveLR's snapshot: snapshot + restore vs one fused AdamW step.

On the CPU-sized GPT-2 shapes (``fusedopt.bench.cases.GPT2_CPU``: 41.7M fp32 params in 52
tensors) a ``fusedopt.AdamW`` takes one step (so its state exists), then each round times, in
this order, one ``optimizer.step()`` and one snapshot + restore of the controller's snapshot
(params, exp_avg, exp_avg_sq, step: the copies a search makes per candidate). The medians over
the rounds and their ratio are printed and written as JSON. Target (issue 16): snapshot +
restore <= 2x one fused AdamW step.

Usage: ``python bench/snapshot_bench.py [--rounds 15] [--warmup 3] [--json PATH]``.
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


def main(argv=None) -> int:
    import fusedopt
    from fusedopt.bench.cases import GPT2_CPU
    from fusedopt.bench.machine import cpu_model
    from fusedopt.schedules import LossAdaptiveLR

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15, at least 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "snapshot_cpu.json"))
    args = p.parse_args(argv)
    if args.rounds < 10:
        p.error("--rounds must be >= 10")
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in GPT2_CPU]
    for q in params:
        q.grad = torch.randn(q.shape, generator=g) * 1e-3
    n_params = sum(q.numel() for q in params)
    opt = fusedopt.AdamW(params, lr=1e-3)
    opt.step()  # creates the state
    snapshot = LossAdaptiveLR(opt)._snapshot

    def time_it(fn):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def snap_and_restore():
        snapshot.take(opt)
        snapshot.restore(opt)

    step_ms, snap_ms = [], []
    for i in range(args.warmup + args.rounds):
        s, c = time_it(opt.step), time_it(snap_and_restore)
        if i >= args.warmup:
            step_ms.append(s)
            snap_ms.append(c)
    step_med, snap_med = statistics.median(step_ms), statistics.median(snap_ms)
    ratio = snap_med / step_med
    copied = sum(b.numel() * b.element_size() for b in snapshot._buffers)
    result = dict(
        case="GPT2_CPU", n_params=n_params, n_tensors=len(params), param_dtype="float32",
        optimizer="fusedopt.AdamW", rounds=args.rounds, warmup=args.warmup,
        adamw_step_ms_median=step_med, snapshot_restore_ms_median=snap_med, ratio=ratio, target_ratio=2.0,
        meets_target=ratio <= 2.0, snapshot_bytes=copied,
        snapshot_restore_gb_per_s=4 * copied / (snap_med * 1e-3) / 1e9,  # read + write, both ways
        adamw_step_ms=step_ms, snapshot_restore_ms=snap_ms,
        machine=dict(cpu=cpu_model(), platform=platform.platform(), torch_threads=torch.get_num_threads(),
                     cpu_isa=fusedopt._config.config()["cpu_isa"],
                     load_avg_1min=os.getloadavg()[0]),
        versions=dict(torch=torch.__version__, fusedopt=fusedopt.__version__, python=platform.python_version()),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"{n_params:,} fp32 params in {len(params)} tensors; snapshot {copied / 2**20:.0f} MiB "
          f"(params, exp_avg, exp_avg_sq, step)")
    print(f"fusedopt.AdamW step      median {step_med:8.1f} ms over {args.rounds} rounds")
    print(f"snapshot + restore       median {snap_med:8.1f} ms  ({result['snapshot_restore_gb_per_s']:.1f} GB/s)")
    print(f"ratio {ratio:.2f}x (target <= 2x): {'met' if ratio <= 2.0 else 'NOT met'}; wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
