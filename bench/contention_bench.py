"""The CPU step on a machine whose other cores are busy: per-step time (median, p90) of
fusedopt builds and of torch's fused step, with and without a busy loop on one core.

A parallel step that ends in a join barrier (an OpenMP region) waits for its slowest thread,
and on a machine with every core taken a thread the OS has descheduled comes back only at a
scheduler tick: a ~1 ms step then takes several. fusedopt's worker pool lets the calling
thread finish chunks no worker has claimed (csrc/cpu/worker_pool.h); this measures it.

Each contender runs in its own process (so two fusedopt builds can be compared: name each
with ``--build LABEL=PYTHONPATH``, e.g. an OpenMP build of an older commit), in interleaved
rounds, each timing every step on its own. The busy loop is a separate process spinning in
Python for as long as a "busy" sample runs.

Usage: ``python bench/contention_bench.py [--case step_2m|many_small] [--threads 2]
[--build new=python --build old=/tmp/old/python] [--rounds 3] [--steps 200] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

CASES = {
    # ~1 ms per step on 2 threads: where a scheduler tick of waiting shows most.
    "step_2m": dict(description="AdamW fp32, 8 tensors of 262,144 elements", shapes=[(262144,)] * 8),
    "many_small": dict(description="AdamW fp32, 2,000 tensors of 1,024 elements", shapes=[(1024,)] * 2000),
}


def _worker(args) -> None:
    """One sample, in a fresh process: prints the per-step milliseconds as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in CASES[args.case]["shapes"]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    if args.contender == "torch-fused":
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    else:
        import fusedopt

        opt = fusedopt.AdamW(params, lr=1e-3, weight_decay=0.01)
    for _ in range(10):
        opt.step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        opt.step()
        times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps(times))


def _spin(stop) -> None:
    while not stop.is_set():
        for _ in range(10000):
            pass


def _sample(contender: str, pythonpath: str | None, args) -> list[float]:
    env = dict(os.environ)  # (OMP_WAIT_POLICY included: it changes how OpenMP threads wait)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, __file__, "--worker", "--contender", contender, "--case", args.case,
           "--threads", str(args.threads), "--steps", str(args.steps)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _stats(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=10)
    return dict(median=statistics.median(ms), p90=q[8], mean=statistics.fmean(ms), steps=len(ms))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), default="step_2m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--build", action="append", default=[], metavar="LABEL=PYTHONPATH",
                    help="a fusedopt build to time (repeatable); default: the one on sys.path")
    ap.add_argument("--no-torch", action="store_true", help="do not time torch's fused AdamW")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per sample")
    ap.add_argument("--json", default=None, metavar="PATH")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--contender", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args)

    contenders = [(label, path) for label, _, path in (b.partition("=") for b in args.build)]
    contenders = contenders or [("fusedopt", None)]
    if not args.no_torch:
        contenders.append(("torch-fused", None))
    samples = {(label, busy): [] for label, _ in contenders for busy in (False, True)}
    loads = []
    for r in range(args.rounds):
        for busy in (False, True):
            stop = mp.Event()
            spinner = mp.Process(target=_spin, args=(stop,), daemon=True) if busy else None
            try:
                if spinner:
                    spinner.start()
                    time.sleep(0.2)
                order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
                for label, path in order:
                    kind = "torch-fused" if label == "torch-fused" else "fusedopt"
                    samples[(label, busy)] += _sample(kind, path, args)
            finally:
                if spinner:
                    stop.set()
                    spinner.join()
            loads.append(os.getloadavg()[0])

    rows = []
    print(f"{CASES[args.case]['description']}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps; "
          f"1-min load average during the run {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"{'contender':<14} {'busy loop':<10} {'median ms':>10} {'p90 ms':>8} {'mean ms':>8}")
    for (label, busy), ms in samples.items():
        s = _stats(ms)
        rows.append(dict(contender=label, busy_loop=busy, **s))
        print(f"{label:<14} {'yes' if busy else 'no':<10} {s['median']:>10.3f} {s['p90']:>8.3f} {s['mean']:>8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(case=args.case, description=CASES[args.case]["description"], threads=args.threads,
                           rounds=args.rounds, steps=args.steps, builds=dict(contenders), load_average=loads,
                           omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                           cpus=os.cpu_count(), results=rows), f, indent=1)


if __name__ == "__main__":
    main()
