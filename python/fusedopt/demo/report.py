"""What the demo writes: the final-loss table (stdout), ``demo.json`` and ``loss_curves.png``."""
from __future__ import annotations

from ..bench.machine import cpu_model

import json
import os
import platform

import torch

SCHEMA = "fusedopt.demo/1"

# One colour per run name, the same in both panels.
COLORS = {"fp32": "black", "bf16-naive": "tab:red", "bf16-sr": "tab:blue",
          "bf16-kahan": "tab:green", "bf16-master": "tab:purple"}


def run_id(name: str, weight_decay: float) -> str:
    return f"{name}/wd={weight_decay:g}"


def add_gaps(runs: list[dict]) -> None:
    """``gap_vs_fp32_pct``: final val loss relative to the fp32 run with the same weight
    decay (None when that run was not selected)."""
    ref = {r["weight_decay"]: r["final_val_loss"] for r in runs if r["name"] == "fp32"}
    for r in runs:
        base = ref.get(r["weight_decay"])
        r["gap_vs_fp32_pct"] = None if base is None else 100.0 * (r["final_val_loss"] / base - 1.0)


def format_table(runs: list[dict]) -> str:
    head = (f"{'run':<12} {'wd':>4} {'val loss':>9} {'train loss':>10} {'gap vs fp32':>11} "
            f"{'tokens/s':>9} {'bytes/param':>11} {'unchanged in cooldown':>21}")
    lines = [head, "-" * len(head)]
    for r in runs:
        gap = "" if r["gap_vs_fp32_pct"] is None else f"{r['gap_vs_fp32_pct']:+.2f}%"
        tps = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        frozen = "" if r["unchanged_in_cooldown"] is None else f"{100 * r['unchanged_in_cooldown']:.1f}%"
        lines.append(f"{r['name']:<12} {r['weight_decay']:>4g} {r['final_val_loss']:>9.4f} "
                     f"{r['final_train_loss']:>10.4f} {gap:>11} {tps:>9} "
                     f"{r['bytes_per_param']['total']:>11.2f} {frozen:>21}")
    return "\n".join(lines)


def machine() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return dict(platform=platform.platform(), cpu=cpu_model(), cores=os.cpu_count(),
                usable_cores=usable, torch_threads=torch.get_num_threads(), load_avg_1min=load)


def versions() -> dict:
    import fusedopt
    return dict(python=platform.python_version(), torch=torch.__version__,
                fusedopt=fusedopt.__version__)


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def _smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected EMA, as training dashboards draw noisy train losses."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def write_plot(doc: dict, path: str) -> bool:
    """Two columns (weight decay 0 and 0.1); top row whole runs, bottom row the cooldown
    zoomed in. Returns False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = doc["runs"]
    wds = sorted({r["weight_decay"] for r in runs})
    steps = doc["config"]["steps"]
    cooldown_start = steps - round(doc["config"]["cooldown_fraction"] * steps)
    zoom_from = max(0, min(cooldown_start - steps // 10, steps - 1))
    fig, axes = plt.subplots(2, len(wds), figsize=(6.5 * len(wds), 8.5), squeeze=False)
    for col, wd in enumerate(wds):
        top, bottom = axes[0][col], axes[1][col]
        sel = [r for r in runs if r["weight_decay"] == wd]
        sel.sort(key=lambda r: r["name"] == "fp32")  # the reference on top of the others
        for r in sel:
            c = COLORS.get(r["name"])
            ref = r["name"] == "fp32"
            val_style = dict(color=c, lw=1.4 if ref else 1.6, ls="--" if ref else "-", marker="o",
                             ms=2.5, zorder=3 if ref else 2)
            tl = _smooth(r["curves"]["train_loss"])
            xs = list(range(1, len(tl) + 1))
            top.plot(xs, tl, color=c, lw=0.8, alpha=0.45)
            top.plot(r["curves"]["val_step"], r["curves"]["val_loss"], label=r["name"], **val_style)
            bottom.plot(xs[zoom_from:], tl[zoom_from:], color=c, lw=0.8, alpha=0.45)
            vs = [(s, v) for s, v in zip(r["curves"]["val_step"], r["curves"]["val_loss"]) if s >= zoom_from]
            if vs:
                bottom.plot(*zip(*vs), label=r["name"], **val_style)
        for ax in (top, bottom):
            ax.axvline(cooldown_start, color="gray", ls=":", lw=1)
            ax.set_xlabel("step")
            ax.set_ylabel("loss (nats/char)")
            ax.grid(alpha=0.3)
        top.set_title(f"weight decay {wd:g}: val (markers) and smoothed train loss")
        handles, labels = top.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: list(COLORS).index(labels[i]) if labels[i] in COLORS else 99)
        top.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8)
        bottom.set_title(f"weight decay {wd:g}: from step {zoom_from} (cooldown starts at the dotted line)")
        if sel:
            lrs = sel[0]["curves"]["lr"]
            twin = bottom.twinx()
            twin.plot(range(zoom_from + 1, len(lrs) + 1), lrs[zoom_from:], color="gray", lw=1, ls="--")
            twin.set_ylabel("lr (dashed)", color="gray")
            twin.set_ylim(bottom=0)
    cfg = doc["config"]
    fig.suptitle(f"fusedopt demo: char-level GPT ({cfg['size']}, {cfg['n_params']:,} params) on "
                 f"Python stdlib source, {steps} steps, AdamW lr {cfg['lr']:g}, WSD 1-sqrt cooldown")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
