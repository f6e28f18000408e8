"""``python -m fusedopt.demo``: fp32 vs the bf16 precision paths on a small char-level GPT.

Writes ``loss_curves.png`` and ``demo.json`` into ``--out`` and prints a final-loss table."""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .._cli import fraction, positive_int
from . import data, model, report
from .progress import Progress
from .runs import RUNS, TrainConfig, train

# Per size: default steps and peak lr. At the default (small, lr 5e-4) naive bf16 ends about
# 1.8% behind fp32 in val loss while the three fusedopt paths stay within 0.05% of it. (With a
# wider model at lr 1e-3 the naive gap was similar, 1.5-1.7%, but training was chaotic enough
# that the other paths scattered by +-0.35% around fp32, hiding the comparison.)
DEFAULTS = {"tiny": dict(steps=200, lr=1e-3), "small": dict(steps=300, lr=5e-4),
            "medium": dict(steps=1000, lr=5e-4)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fusedopt.demo",
        description="Train a small character-level GPT on the Python standard library's source "
                    "with fp32 params and with bf16 params under each precision path (naive "
                    "torch.optim.AdamW, fusedopt stochastic rounding, Kahan summation, master "
                    "weights), with and without weight decay. Writes loss_curves.png and "
                    "demo.json and prints the final losses.",
        epilog="other experiments: --experiment large-batch | adaptive-lr (each with its own "
               "--help). runs: " + "; ".join(f"{r.name}: {r.label}" for r in RUNS.values()))
    p.add_argument("--steps", type=positive_int, default=None,
                   help="training steps per run (default: " +
                        ", ".join(f"{k} {v['steps']}" for k, v in DEFAULTS.items()) + ")")
    p.add_argument("--size", choices=list(model.SIZES), default="small",
                   help="model width/depth preset (default small)")
    p.add_argument("--runs", default=",".join(RUNS),
                   help="comma-separated run names (default: all): " + ", ".join(RUNS))
    p.add_argument("--wd", default="0,0.1",
                   help="comma-separated weight decays, each run is done once per value "
                        "(default 0,0.1)")
    p.add_argument("--out", default="demo_out", metavar="DIR",
                   help="output directory (default demo_out/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init, the data order and "
                                                       "stochastic rounding (default 0)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: "
                   + ", ".join(f"{k} {v['lr']:g}" for k, v in DEFAULTS.items()) + ")")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of steps)")
    p.add_argument("--cooldown", type=fraction, default=0.2,
                   help="fraction of the steps in the 1-sqrt cooldown (default 0.2)")
    p.add_argument("--eval-every", type=positive_int, default=None,
                   help="steps between validation evaluations (default steps/20)")
    p.add_argument("--val-batches", type=positive_int, default=8,
                   help="validation batches, fixed windows of the held-out text (default 8)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch/fusedopt CPU threads (default 1: the models are too small to "
                        "gain from more, and one thread keeps timings steady on a shared machine)")
    p.add_argument("--no-plot", action="store_true", help="do not write loss_curves.png")
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    return p


def _parse_list(parser, text: str, kind, what: str) -> list:
    try:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--{what}: cannot parse {text!r}")
    if not items:
        parser.error(f"--{what}: nothing selected")
    return items


# Other experiments: name -> module of this package with a ``main(argv) -> int`` of its own
# (its own options; ``python -m fusedopt.demo --experiment NAME --help`` lists them).
EXPERIMENTS = {
    "precision": None,  # this module: the default
    "large-batch": "large_batch",
    "adaptive-lr": "adaptive_lr",
}


def _split_experiment(argv: list[str]) -> tuple[str, list[str]]:
    """(experiment name, the remaining args) from ``--experiment NAME`` / ``--experiment=NAME``."""
    rest, name = [], "precision"
    it = iter(argv)
    for a in it:
        if a == "--experiment":
            name = next(it, "")
        elif a.startswith("--experiment="):
            name = a.split("=", 1)[1]
        else:
            rest.append(a)
    return name, rest


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name, argv = _split_experiment(argv)
    if name not in EXPERIMENTS:
        print(f"python -m fusedopt.demo: error: --experiment: unknown {name!r}; choose from "
              f"{', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    if EXPERIMENTS[name] is not None:
        import importlib
        return importlib.import_module(f"{__package__}.{EXPERIMENTS[name]}").main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    names = _parse_list(parser, args.runs, str, "runs")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"--runs: unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    names = [n for n in RUNS if n in names]  # canonical order, no duplicates
    wds = sorted(set(_parse_list(parser, args.wd, float, "wd")))
    if any(w < 0 for w in wds):
        parser.error("--wd: weight decays must be >= 0")
    cfg = model.SIZES[args.size]
    steps = args.steps or DEFAULTS[args.size]["steps"]
    lr = args.lr if args.lr is not None else DEFAULTS[args.size]["lr"]
    warmup = args.warmup if args.warmup is not None else max(1, round(0.05 * steps))
    eval_every = args.eval_every or max(1, steps // 20)
    os.makedirs(args.out, exist_ok=True)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        corpus = data.load_corpus()
        batches = data.Batches(corpus, cfg.batch_size, cfg.ctx, steps, args.seed, args.val_batches)
        init = model.build(cfg, args.seed)
        n_params = sum(v.numel() for k, v in init.items())
        progress = Progress(steps * len(names) * len(wds), enabled=not args.no_progress)
        progress.note(f"{args.size} GPT, {n_params:,} params; corpus {corpus.chars:,} chars from "
                      f"{len(corpus.sources)} stdlib files; {len(names) * len(wds)} runs of {steps} steps")
        results = []
        try:
            for wd in wds:
                tc = TrainConfig(steps=steps, lr=lr, weight_decay=wd, warmup_steps=warmup,
                                 cooldown_fraction=args.cooldown, eval_every=eval_every,
                                 seed=args.seed)
                for name in names:
                    rid = report.run_id(name, wd)
                    progress.start_run(rid)
                    r = train(RUNS[name], cfg, init, batches, tc,
                              on_step=lambda _s, loss: progress.step(loss))
                    r["id"] = rid
                    results.append(r)
                    progress.note(f"{rid:<20} val {r['final_val_loss']:.4f}  "
                                  f"{r['tokens_per_s']:.0f} tokens/s  {r['wall_s']:.1f} s")
        finally:
            progress.close()
        machine = report.machine()  # while --threads is in effect
    finally:
        torch.set_num_threads(threads_before)
    report.add_gaps(results)
    wall = time.perf_counter() - t0

    doc = dict(
        schema=report.SCHEMA,
        config=dict(
            size=args.size, model=cfg.as_dict(), n_params=n_params, steps=steps, lr=lr,
            betas=list(TrainConfig.betas), eps=TrainConfig.eps, warmup_steps=warmup,
            cooldown_fraction=args.cooldown, schedule_shape="1-sqrt", weight_decays=wds,
            weight_decay_applies_to="params with >= 2 dims (incl. the tied embedding)",
            runs=names, seed=args.seed, eval_every=eval_every, val_batches=args.val_batches,
            tokens_per_step=batches.tokens_per_step, threads=args.threads,
            final_train_loss="mean train loss of the last 10 steps",
            final_val_loss="val loss after the last step, on the fixed val windows",
            unchanged_in_cooldown="share of param elements bit-identical at the start and the "
                                  "end of the cooldown",
            corpus=dict(chars=corpus.chars, train_tokens=len(corpus.train),
                        val_tokens=len(corpus.val), vocab_size=data.VOCAB_SIZE,
                        sources=list(corpus.sources)),
        ),
        versions=report.versions(), machine=machine, wall_s=wall, runs=results,
    )
    json_path = os.path.join(args.out, "demo.json")
    report.write_json(doc, json_path)
    plot_path = os.path.join(args.out, "loss_curves.png")
    wrote_plot = False if args.no_plot else report.write_plot(doc, plot_path)

    print(report.format_table(results))
    print(f"\n{len(results)} runs in {wall:.1f} s; wrote {json_path}"
          + (f" and {plot_path}" if wrote_plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
