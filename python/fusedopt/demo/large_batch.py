"""``python -m fusedopt.demo --experiment large-batch``: does an explicit gradient-norm
penalty, or SAM, give large-batch training the generalisation of small-batch SGD?

scikit-learn's digits (8x8 images, 10 classes), a fixed train/test split, an MLP. Four runs
from the same init, the same number of steps and the same learning rate (plain SGD, no
momentum, so the only difference is the gradient each step follows):

* ``sgd-small``: batch ``--small-batch`` (32), SGD;
* ``sgd-large``: batch ``--large-batch`` (default: the whole training set), SGD;
* ``penalty-large``: the large batch, split into disjoint micro-batches of the small size, with
  ``penalty * mean_i ||grad L_i||^2`` added (``fusedopt.sharpness.penalized_backward``);
  ``penalty = lr / 4`` by default, the implicit regulariser that SGD with the small batch
  carries (Smith, Dherin, Barrett and De, 2021);
* ``sam-large``: the large batch with ``fusedopt.SAM(fusedopt.SGD, rho=--rho)``.

Every ``--eval-every`` steps: test accuracy, train loss and accuracy, and ``lambda_max``, the
top Hessian eigenvalue of the train loss on a fixed subset (``fusedopt.sharpness``). Writes
``large_batch.json`` and ``large_batch.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from torch import nn

from .._cli import positive_float, positive_int

SCHEMA = "fusedopt.demo.large_batch/1"
RUNS = {
    "sgd-small": "SGD, small batch",
    "sgd-large": "SGD, large batch",
    "penalty-large": "SGD, large batch + micro-batch grad-norm penalty",
    "sam-large": "SAM(SGD), large batch",
}
COLORS = {"sgd-small": "black", "sgd-large": "tab:red", "penalty-large": "tab:blue", "sam-large": "tab:green"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fusedopt.demo --experiment large-batch",
                                description=__doc__.split("\n\n")[0] + " Runs: " +
                                "; ".join(f"{k}: {v}" for k, v in RUNS.items()))
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=positive_int, default=None, help="optimizer steps per run (default 1500)")
    steps.add_argument("--epochs", type=positive_float, default=None,
                       help="instead of --steps: epochs of the small-batch run (steps = epochs * train / small batch)")
    p.add_argument("--lr", type=positive_float, default=0.5, help="learning rate of every run (default 0.5)")
    p.add_argument("--small-batch", type=positive_int, default=32, help="small batch and micro-batch size (default 32)")
    p.add_argument("--large-batch", type=positive_int, default=None,
                   help="large batch (default: the whole training set)")
    p.add_argument("--penalty", type=float, default=None, help="gradient-norm penalty (default lr / 4)")
    p.add_argument("--rho", type=positive_float, default=0.05, help="SAM radius (default 0.05)")
    p.add_argument("--train-size", type=positive_int, default=1024,
                   help="training examples, the rest of the 1797 are the test set (default 1024)")
    p.add_argument("--hidden", type=positive_int, default=128, help="MLP width (default 128)")
    p.add_argument("--eval-every", type=positive_int, default=None, help="steps between evaluations (default steps/15)")
    p.add_argument("--eig-iters", type=positive_int, default=20, help="power iterations for lambda_max (default 20)")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated runs (default all): " + ", ".join(RUNS))
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output directory (default demo_out/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the batch order (default 0)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-plot", action="store_true", help="do not write large_batch.png")
    return p


def load_digits(train_size: int, seed: int):
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], a seeded split."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("the large-batch demo needs scikit-learn (pip install scikit-learn): " + str(e))
    digits = sk_load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    if not 0 < train_size < len(x):
        raise SystemExit(f"--train-size must be below {len(x)}, got {train_size}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = order[:train_size], order[train_size:]
    return x[tr], y[tr], x[te], y[te]


def build_model(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class BatchStream:
    """Batches of indices, epoch by epoch: a fresh permutation each epoch, the last partial
    batch dropped (a batch as large as the set is the set itself, in order)."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch = n, min(batch, n)
        self.gen = torch.Generator().manual_seed(seed)
        self._queue: list[torch.Tensor] = []

    def next(self) -> torch.Tensor:
        if not self._queue:
            order = torch.arange(self.n) if self.batch == self.n else torch.randperm(self.n, generator=self.gen)
            self._queue = list(order[: self.n - self.n % self.batch].split(self.batch))[::-1]
        return self._queue.pop()


def evaluate(model, data, eig_x, eig_y, eig_iters: int, seed: int) -> dict:
    from ..sharpness import top_hessian_eigenvalue
    x_tr, y_tr, x_te, y_te = data
    with torch.no_grad():
        train_logits, test_logits = model(x_tr), model(x_te)
    lam, _ = top_hessian_eigenvalue(lambda: nn.functional.cross_entropy(model(eig_x), eig_y),
                                    model.parameters(), iters=eig_iters, tol=1e-3, seed=seed)
    return dict(train_loss=nn.functional.cross_entropy(train_logits, y_tr).item(),
                train_acc=(train_logits.argmax(1) == y_tr).float().mean().item(),
                test_loss=nn.functional.cross_entropy(test_logits, y_te).item(),
                test_acc=(test_logits.argmax(1) == y_te).float().mean().item(),
                lambda_max=lam)


def train_run(name: str, init: dict, data, args, steps: int, eval_every: int) -> dict:
    import fusedopt
    from ..sharpness import penalized_backward
    x_tr, y_tr = data[0], data[1]
    model = build_model(args.hidden, args.seed)
    model.load_state_dict(init)
    params = list(model.parameters())
    large = args.large_batch or len(x_tr)
    batch = args.small_batch if name == "sgd-small" else large
    stream = BatchStream(len(x_tr), batch, args.seed + 1)
    if name == "sam-large":
        opt = fusedopt.SAM(params, fusedopt.SGD, rho=args.rho, lr=args.lr)
    else:
        opt = fusedopt.SGD(params, lr=args.lr)
    eig_x, eig_y = x_tr[:512], y_tr[:512]
    curves = {k: [] for k in ("step", "train_loss", "train_acc", "test_loss", "test_acc", "lambda_max", "penalty")}

    def loss_on(idx):
        return lambda: nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])

    def record(step, pen):
        ev = evaluate(model, data, eig_x, eig_y, args.eig_iters, args.seed)
        curves["step"].append(step)
        for k, v in ev.items():
            curves[k].append(v)
        curves["penalty"].append(pen)

    t0 = time.perf_counter()
    record(0, None)
    pen = None
    for step in range(1, steps + 1):
        idx = stream.next()
        opt.zero_grad()
        if name == "penalty-large":
            micro = idx.split(args.small_batch)
            pen = penalized_backward(params, [loss_on(m) for m in micro], args.penalty)
            opt.step()
        elif name == "sam-large":
            loss_on(idx)().backward()
            opt.first_step(zero_grad=True)
            loss_on(idx)().backward()
            opt.second_step()
        else:
            loss_on(idx)().backward()
            opt.step()
        if step % eval_every == 0 or step == steps:
            record(step, None if pen is None else pen.item())
    wall = time.perf_counter() - t0
    final = {k: curves[k][-1] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lambda_max")}
    return dict(name=name, label=RUNS[name], batch=batch, curves=curves, final=final,
                best_test_acc=max(curves["test_acc"]), wall_s=wall)


def write_plot(doc: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    fig, (ax_acc, ax_eig) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in doc["runs"]:
        c = r["curves"]
        label = f"{r['label']} (B={r['batch']})"
        ax_acc.plot(c["step"], [100 * a for a in c["test_acc"]], color=COLORS[r["name"]], label=label)
        ax_eig.plot(c["step"], c["lambda_max"], color=COLORS[r["name"]], label=label)
    cfg = doc["config"]
    ax_acc.set(xlabel="step", ylabel="test accuracy (%)", title=f"digits, MLP, lr {cfg['lr']:g}")
    # Zoom on the second half of training, where the runs differ by a few tenths of a percent.
    late = [100 * a for r in doc["runs"] for a in r["curves"]["test_acc"][len(r["curves"]["test_acc"]) // 2:]]
    if late:
        ax_acc.set_ylim(max(min(late) - 2, 0), min(max(late) + 1, 100))
    ax_eig.set(xlabel="step", ylabel="lambda_max (train loss Hessian)", yscale="log",
               title=f"stability threshold 2/lr = {2 / cfg['lr']:g}")
    ax_eig.axhline(2 / cfg["lr"], color="grey", ls="--", lw=0.8)
    ax_acc.legend(fontsize=7, loc="lower right")
    ax_acc.grid(alpha=0.3)
    ax_eig.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        parser.error(f"--runs: unknown or empty {unknown or args.runs!r}; choose from {', '.join(RUNS)}")
    names = [n for n in RUNS if n in names]
    if args.penalty is None:
        args.penalty = args.lr / 4
    if not (args.penalty >= 0 and math.isfinite(args.penalty)):
        parser.error(f"--penalty: must be >= 0, got {args.penalty}")
    data = load_digits(args.train_size, args.seed)
    n_train = len(data[0])
    if args.large_batch is not None and args.large_batch > n_train:
        parser.error(f"--large-batch: at most the training set ({n_train})")
    steps = args.steps or (round(args.epochs * n_train / args.small_batch) if args.epochs else 1500)
    eval_every = args.eval_every or max(1, steps // 15)
    os.makedirs(args.out, exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        init = build_model(args.hidden, args.seed).state_dict()
        n_params = sum(v.numel() for v in init.values())
        print(f"digits: {n_train} train / {len(data[2])} test; MLP 64-{args.hidden}-{args.hidden}-10, "
              f"{n_params:,} params; {steps} steps per run, lr {args.lr:g}", file=sys.stderr)
        runs = []
        for name in names:
            r = train_run(name, init, data, args, steps, eval_every)
            runs.append(r)
            f = r["final"]
            print(f"  {name:<14} B={r['batch']:<5} test acc {100 * f['test_acc']:.2f}%  train acc "
                  f"{100 * f['train_acc']:.2f}%  lambda_max {f['lambda_max']:.2f}  {r['wall_s']:.1f} s",
                  file=sys.stderr)
    finally:
        torch.set_num_threads(threads_before)
    from . import report
    doc = dict(schema=SCHEMA,
               config=dict(dataset="sklearn digits", train_size=n_train, test_size=len(data[2]),
                           model=f"MLP 64-{args.hidden}-{args.hidden}-10 (ReLU)", n_params=n_params,
                           steps=steps, eval_every=eval_every, lr=args.lr, optimizer="fusedopt.SGD, no momentum",
                           small_batch=args.small_batch, large_batch=args.large_batch or n_train,
                           penalty=args.penalty, penalty_r=1e-2, rho=args.rho, seed=args.seed,
                           lambda_max=f"top Hessian eigenvalue of the train loss on the first 512 train "
                                      f"examples, {args.eig_iters} power iterations",
                           threads=args.threads, runs=names),
               versions=report.versions(), machine=report.machine(), wall_s=time.perf_counter() - t0, runs=runs)
    json_path = os.path.join(args.out, "large_batch.json")
    with open(json_path, "w") as fh:
        json.dump(doc, fh, indent=1)
    plot_path = os.path.join(args.out, "large_batch.png")
    wrote = False if args.no_plot else write_plot(doc, plot_path)
    head = f"{'run':<14} {'batch':>5} {'test acc':>9} {'best':>7} {'train acc':>9} {'lambda_max':>10} {'time':>7}"
    print(head + "\n" + "-" * len(head))
    for r in runs:
        f = r["final"]
        print(f"{r['name']:<14} {r['batch']:>5} {100 * f['test_acc']:>8.2f}% {100 * r['best_test_acc']:>6.2f}% "
              f"{100 * f['train_acc']:>8.2f}% {f['lambda_max']:>10.2f} {r['wall_s']:>6.1f}s")
    print(f"\nwrote {json_path}" + (f" and {plot_path}" if wrote else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
