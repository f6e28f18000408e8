"""``python -m fusedopt.demo --experiment adaptive-lr``: Adam at its default lr vs Adam with
:class:`fusedopt.schedules.LossAdaptiveLR` vs Adam with a WSD schedule, on a seeded regression
task with fresh samples every step (the setting of Dereich, Jentzen and Riekert, 2024).

Every run gets the same budget of optimizer steps, and the adaptive run's trial steps count
against it: the x axis is optimizer steps *taken*, trials included. Near the end of the budget
the controller is not consulted once a search would no longer fit. Evaluation passes (the
trials' ``evaluate()`` and the held-out curve points) are forward-only and not counted.

Writes ``adaptive_lr.png`` and ``adaptive_lr.json`` into ``--out`` and prints a table.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch import nn

from .._cli import positive_int
from . import report

SCHEMA = "fusedopt.demo.adaptive_lr/1"
RUNS = {
    "adam": "Adam, constant lr 1e-3 (its default)",
    "adam+adaptive": "Adam + LossAdaptiveLR (starts at 1e-3)",
    "adam+wsd": "Adam + WSD (peak 1e-3, 5% warmup, 20% 1-sqrt cooldown)",
}
COLORS = {"adam": "tab:gray", "adam+adaptive": "tab:blue", "adam+wsd": "tab:orange"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fusedopt.demo --experiment adaptive-lr",
        description="Regression of a smooth function of 8 inputs with a small MLP, fresh samples "
                    "every step: Adam (lr 1e-3) vs Adam + LossAdaptiveLR vs Adam + WSD, with the "
                    "same budget of optimizer steps (trial steps count). Writes adaptive_lr.png "
                    "and adaptive_lr.json.")
    p.add_argument("--steps", type=positive_int, default=15000,
                   help="optimizer steps per run, trial steps included (default 15000)")
    p.add_argument("--seeds", type=positive_int, default=3,
                   help="seeds per run, from --seed on (default 3)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output directory (default demo_out/)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's lr / the start and peak lr (default 1e-3)")
    p.add_argument("--batch", type=positive_int, default=64, help="training batch size (default 64)")
    p.add_argument("--patience", type=positive_int, default=400, help="LossAdaptiveLR patience (default 400)")
    p.add_argument("--factor", type=float, default=4.0, help="LossAdaptiveLR factor (default 4)")
    p.add_argument("--candidates", type=positive_int, default=5, help="LossAdaptiveLR candidates (default 5)")
    p.add_argument("--trial-steps", type=positive_int, default=50,
                   help="LossAdaptiveLR trial steps per candidate (default 50)")
    p.add_argument("--trial-eval-samples", type=positive_int, default=8192,
                   help="fresh samples that score each LossAdaptiveLR candidate (default 8192)")
    p.add_argument("--eval-every", type=positive_int, default=None,
                   help="optimizer steps between held-out evaluations (default steps/80)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-plot", action="store_true", help="do not write adaptive_lr.png")
    return p


# ---- the task ------------------------------------------------------------------------------
DIM, WIDTH = 8, 64
EVAL_SAMPLES = 4096


class Target:
    """y = sum_k c_k sin(a_k . x + b_k) over 16 random ridges, x ~ N(0, I_8): smooth, not
    exactly representable by the MLP, seeded."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(10_000 + seed)
        self.a = torch.randn(DIM, 16, generator=g) / math.sqrt(DIM)
        self.b = 2 * math.pi * torch.rand(16, generator=g)
        self.c = torch.randn(16, generator=g) / 4

    def __call__(self, x):
        return (torch.sin(x @ self.a + self.b) * self.c).sum(1, keepdim=True)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH), nn.GELU(),
                         nn.Linear(WIDTH, 1))


def run_one(name: str, seed: int, args) -> dict:
    import fusedopt
    from fusedopt.schedules import WSD, LossAdaptiveLR

    target = Target(seed)
    model = make_model(seed)
    opt = fusedopt.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(20_000 + seed)  # the training/trial sample stream
    eval_gen = torch.Generator().manual_seed(30_000 + seed)
    x_eval = torch.randn(EVAL_SAMPLES, DIM, generator=eval_gen)
    y_eval = target(x_eval)
    taken = 0  # optimizer steps taken, trials included

    def train_step():
        nonlocal taken
        x = torch.randn(args.batch, DIM, generator=gen)
        loss = (model(x) - target(x)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        taken += 1
        return loss.detach()

    def trial_evaluate():  # fresh samples, as in the paper
        x = torch.randn(args.trial_eval_samples, DIM, generator=gen)
        with torch.no_grad():
            return (model(x) - target(x)).pow(2).mean()

    def held_out():
        with torch.no_grad():
            return float((model(x_eval) - y_eval).pow(2).mean())

    controller = scheduler = None
    search_cost = args.candidates * args.trial_steps
    if name == "adam+adaptive":
        controller = LossAdaptiveLR(opt, patience=args.patience, factor=args.factor,
                                    candidates=args.candidates, trial_steps=args.trial_steps)
        controller.search(train_step, trial_evaluate)  # pick the starting lr, as the paper does
    elif name == "adam+wsd":
        scheduler = WSD(opt, warmup_steps=max(1, round(0.05 * args.steps)), total_steps=args.steps)

    curve = dict(steps=[0], test_loss=[held_out()], lr=[float(opt.param_groups[0]["lr"])])
    eval_every = args.eval_every or max(1, args.steps // 80)
    next_eval = taken if taken > 0 else eval_every
    t0 = time.perf_counter()
    while taken < args.steps:
        loss = train_step()
        if controller is not None and args.steps - taken >= search_cost:
            controller.step(loss, train_step, trial_evaluate)
        if scheduler is not None:
            scheduler.step()
        if taken >= next_eval or taken >= args.steps:
            curve["steps"].append(taken)
            curve["test_loss"].append(held_out())
            curve["lr"].append(float(opt.param_groups[0]["lr"]))
            next_eval = taken + eval_every
    wall = time.perf_counter() - t0
    out = dict(name=name, label=RUNS[name], seed=seed, curve=curve, steps_taken=taken,
               final_test_loss=curve["test_loss"][-1], best_test_loss=min(curve["test_loss"]),
               wall_s=wall)
    if controller is not None:
        out["trial_steps_taken"] = controller.num_trial_steps
        out["searches"] = [dict(step=h["step"], factor=h["factor"], lr_before=h["lrs_before"][0],
                                losses=h["losses"]) for h in controller.history]
    return out


# ---- report --------------------------------------------------------------------------------
def summarize(runs: list[dict]) -> list[dict]:
    """Per run name: final held-out loss per seed and their geometric mean."""
    rows = []
    for name in RUNS:
        sel = [r for r in runs if r["name"] == name]
        if not sel:
            continue
        finals = [r["final_test_loss"] for r in sel]
        row = dict(name=name, label=RUNS[name], final_test_loss=finals,
                   geomean_final_test_loss=math.exp(sum(math.log(v) for v in finals) / len(finals)))
        if name == "adam+adaptive":
            row["trial_steps_taken"] = [r["trial_steps_taken"] for r in sel]
            row["searches"] = [len(r["searches"]) for r in sel]
            row["final_lr"] = [r["curve"]["lr"][-1] for r in sel]
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'run':<15} {'final held-out MSE (per seed)':<36} {'geo. mean':>10}  notes"
    lines = [head, "-" * len(head)]
    for r in rows:
        per = ", ".join(f"{v:.2e}" for v in r["final_test_loss"])
        note = ""
        if "searches" in r:
            note = (f"searches {r['searches']}, trial steps {r['trial_steps_taken']}, final lr "
                    + ", ".join(f"{v:.2g}" for v in r["final_lr"]))
        lines.append(f"{r['name']:<15} {per:<36} {r['geomean_final_test_loss']:>10.3e}  {note}")
    return "\n".join(lines)


def write_plot(doc: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True, height_ratios=(2, 1))
    for r in doc["runs"]:
        c = COLORS[r["name"]]
        first = r["seed"] == doc["config"]["seeds"][0]
        top.plot(r["curve"]["steps"], r["curve"]["test_loss"], color=c, lw=1.3, alpha=0.8,
                 label=r["label"] if first else None)
        bottom.plot(r["curve"]["steps"], r["curve"]["lr"], color=c, lw=1.1, alpha=0.8, drawstyle="steps-post")
        for s in r.get("searches", []):
            top.axvline(s["step"], color=c, lw=0.4, alpha=0.25)
    top.set_yscale("log")
    top.set_ylabel("held-out MSE (4096 fixed samples)")
    top.grid(alpha=0.3, which="both")
    top.legend(fontsize=8)
    bottom.set_yscale("log")
    bottom.set_ylabel("lr")
    bottom.set_xlabel("optimizer steps taken (LossAdaptiveLR's trial steps included)")
    bottom.grid(alpha=0.3, which="both")
    cfg = doc["config"]
    top.set_title(f"MLP {DIM}-{WIDTH}-{WIDTH}-1 regression, batch {cfg['batch']}, {len(cfg['seeds'])} seeds; "
                  f"LossAdaptiveLR patience {cfg['patience']}, factor {cfg['factor']:g}, "
                  f"{cfg['candidates']}x{cfg['trial_steps']} trial steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.factor > 1:
        parser.error("--factor must be > 1")
    if args.candidates % 2 == 0:
        parser.error("--candidates must be odd")
    if args.steps < 2 * args.candidates * args.trial_steps:
        parser.error(f"--steps must be at least two searches' worth ({2 * args.candidates * args.trial_steps})")
    os.makedirs(args.out, exist_ok=True)
    seeds = list(range(args.seed, args.seed + args.seeds))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = []
    try:
        for seed in seeds:
            for name in RUNS:
                r = run_one(name, seed, args)
                runs.append(r)
                print(f"seed {seed} {name:<14} final held-out MSE {r['final_test_loss']:.3e}  "
                      f"{r['wall_s']:.1f} s", file=sys.stderr)
        machine = report.machine()
    finally:
        torch.set_num_threads(threads_before)
    rows = summarize(runs)
    doc = dict(schema=SCHEMA,
               config=dict(steps=args.steps, seeds=seeds, lr=args.lr, batch=args.batch, patience=args.patience,
                           factor=args.factor, candidates=args.candidates, trial_steps=args.trial_steps,
                           model=f"MLP {DIM}-{WIDTH}-{WIDTH}-1, GELU", task="y = sum of 16 random sine ridges "
                           "of x ~ N(0, I_8); fresh samples every step", eval_samples=EVAL_SAMPLES,
                           trial_eval_samples=args.trial_eval_samples, threads=args.threads,
                           x_axis="optimizer steps taken, trial steps included",
                           runs=RUNS),
               versions=report.versions(), machine=machine, wall_s=time.perf_counter() - t0,
               summary=rows, runs=runs)
    json_path = os.path.join(args.out, "adaptive_lr.json")
    report.write_json(doc, json_path)
    plot_path = os.path.join(args.out, "adaptive_lr.png")
    wrote_plot = False if args.no_plot else write_plot(doc, plot_path)
    print(format_table(rows))
    print(f"\n{len(runs)} runs in {doc['wall_s']:.1f} s; wrote {json_path}" + (f" and {plot_path}" if wrote_plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
