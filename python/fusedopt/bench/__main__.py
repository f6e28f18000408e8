"""``python -m fusedopt.bench`` / ``fusedopt-bench``: fusedopt vs torch.optim (for-loop, foreach,
fused) and installed peer libraries; table on stdout, JSON and PNG on disk."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .._cli import positive_float, positive_int
from . import cases as _cases
from .progress import Progress
from .report import format_table, render_markdown, write_json, write_plot
from .suite import Settings, run_suite

DEFAULT_JSON = "bench_results.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusedopt-bench",
        description="Benchmark fusedopt against torch.optim (for-loop, foreach, fused) and any "
                    "installed peer library (torch-optimi, bitsandbytes, torchao, heavyball, "
                    "lion-pytorch, schedulefree, pytorch-optimizer) in every case where one does "
                    "the same job. Every contender's first step is checked against a torch "
                    "reference step (a broken one is a FAILED row); compile time is reported "
                    "apart; slow contenders get fewer rounds. Prints ms/step, effective GB/s and "
                    "% of the measured streaming bandwidth; writes JSON and a PNG of the speed "
                    "relative to torch's step (log scale).",
        epilog="cases: " + ", ".join(_cases.CASES))
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--cases", default=None,
                   help="comma-separated case names (default: all; see --list-cases)")
    p.add_argument("--scale", type=positive_float, default=1.0,
                   help="multiply every case's param count (first dim of each shape, min 1)")
    p.add_argument("--quick", action="store_true",
                   help="5 rounds, 1 warm-up step, >= 5 ms samples, 5 bandwidth samples, "
                        "120 s time budget (same tensor sizes)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="interleaved timing rounds (default 20, --quick 5)")
    p.add_argument("--warmup", type=positive_int, default=None,
                   help="untimed steps per contender before timing (default 3, --quick 1)")
    p.add_argument("--json", default=DEFAULT_JSON, metavar="PATH",
                   help=f"where to write the results (default {DEFAULT_JSON})")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="PNG of each contender's speed relative to the case's torch step, log scale "
                        "(default: the JSON path with .png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop each case's timing rounds (after 3) when its share of S seconds is "
                        "spent (--quick: 120; 0 = no budget)")
    p.add_argument("--no-peers", action="store_true", help="do not look for peer libraries")
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    p.add_argument("--bandwidth-mib", type=positive_float, default=None,
                   help="size of the bandwidth probe tensor (default 256 MiB on CPU, 1024 on "
                        "CUDA, times --scale when < 1, min 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of params and grads")
    p.add_argument("--list-cases", action="store_true", help="list the cases and exit")
    p.add_argument("--markdown", metavar="JSON", default=None,
                   help="print the README results table made from a results JSON and exit")
    return p


def _list_cases(device: str) -> str:
    rows = []
    for c in _cases.CASES.values():
        shapes = c.shapes(device)
        rows.append(f"{c.name:<26} {_cases.numel(shapes) / 1e6:7.2f}M params {len(shapes):5d} tensors "
                    f"{c.bytes_per_param:3g} B/param  {c.description}")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.markdown:
        sys.stdout.write(render_markdown(args.markdown))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.list_cases:
        print(_list_cases(device))
        return 0
    if device == "cuda" and not torch.cuda.is_available():
        print("fusedopt-bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    try:
        selected = _cases.select(args.cases)
    except ValueError as e:
        print(f"fusedopt-bench: {e}", file=sys.stderr)
        return 2
    st = Settings.make(device=device, cases=[c.name for c in selected], scale=args.scale,
                       quick=args.quick, repeats=args.repeats, warmup=args.warmup,
                       peers=not args.no_peers, seed=args.seed, bandwidth_mib=args.bandwidth_mib,
                       time_budget_s=args.time_budget)
    progress = Progress(total=st.repeats * len(selected), enabled=not args.no_progress)
    progress.note(f"fusedopt-bench on {device}: {len(selected)} case(s); {st.describe()}")
    t0 = time.perf_counter()
    try:
        doc = run_suite(st, progress)
    finally:
        progress.close()
    doc["command"] = " ".join(["fusedopt-bench"] + list(sys.argv[1:] if argv is None else argv))
    doc["elapsed_s"] = time.perf_counter() - t0

    plot_path, plot_reason = (None, "disabled (--no-plot)")
    if not args.no_plot:
        plot_path, plot_reason = write_plot(doc, args.plot or _png_for(args.json))
    doc["plot"] = dict(path=plot_path, reason=plot_reason)
    write_json(doc, args.json)

    print(format_table(doc))
    print(f"\nJSON: {args.json}")
    print(f"PNG:  {plot_path}" if plot_path else f"PNG:  none ({plot_reason})")
    return 0


def _png_for(json_path: str) -> str:
    return (json_path[:-5] if json_path.endswith(".json") else json_path) + ".png"


if __name__ == "__main__":
    sys.exit(main())
