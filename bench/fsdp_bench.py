"""FSDP2 optimizer-step benchmark: fusedopt vs torch's fused AdamW under the same sharding.

Two CPU ranks (gloo) hold a GPT-2-style model sharded with ``fully_shard`` (one FSDP unit per
block, as in the FSDP2 examples). Every rank gets random DTensor grads once; then each case
times ``optimizer.step()`` alone (forward/backward excluded, as they are the same for every
case), with a barrier around each step and the slowest rank's time taken:

* ``fusedopt.AdamW`` vs ``torch.optim.AdamW(fused=True)`` (and ``foreach=True``);
* ``fusedopt.AdamW(max_grad_norm=1.0)`` (global norm: sums of squares per shard inside the
  step, one all_reduce) vs ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` + the fused step.

Usage: ``python bench/fsdp_bench.py [--layers 12] [--d-model 768] [--steps 10]``. The defaults
are GPT-2 small (124M params, 62M per rank). Prints ms/step and the ratios.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class GPT2Shapes(nn.Module):
    """GPT-2's parameter shapes (no forward: the benchmark times the optimizer only)."""

    def __init__(self, layers, d, vocab, positions):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(positions, d)
        self.h = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)


def _time_steps(step, steps, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        dist.barrier()
        t = time.perf_counter()
        step()
        dist.barrier()
        elapsed = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item() * 1e3)
    return statistics.median(times)


def _worker(rank, world_size, port, args):
    import fusedopt
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(args.threads)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    model = GPT2Shapes(args.layers, args.d_model, args.vocab, args.positions)
    for block in model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
        p.grad.to_local().normal_(0.0, 1e-2)  # each rank's own shard of the grad
    n_total = sum(p.numel() for p in params)
    n_local = sum(p.to_local().numel() for p in params)
    kw = dict(lr=1e-4, weight_decay=0.1)

    def case(make, clip=None):
        opt = make()

        def step():
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()

        ms = _time_steps(step, args.steps, args.warmup)
        opt.state.clear()
        return ms

    results = {
        "fusedopt.AdamW": case(lambda: fusedopt.AdamW(params, **kw)),
        "torch AdamW fused": case(lambda: torch.optim.AdamW(params, fused=True, **kw)),
        "torch AdamW foreach": case(lambda: torch.optim.AdamW(params, foreach=True, **kw)),
        "fusedopt.AdamW max_grad_norm": case(lambda: fusedopt.AdamW(params, max_grad_norm=1.0, **kw)),
        "clip_grad_norm_ + torch fused": case(lambda: torch.optim.AdamW(params, fused=True, **kw), clip=1.0),
    }
    if rank == 0:
        print(f"FSDP2 on {world_size} CPU ranks (gloo), {args.threads} thread(s) per rank; GPT-2-style "
              f"{args.layers} layers, d={args.d_model}, vocab={args.vocab}: {len(params)} params, "
              f"{n_total / 1e6:.1f}M elements ({n_local / 1e6:.1f}M on rank 0); fp32; median of {args.steps} steps")
        for name, ms in results.items():
            print(f"  {name:32s} {ms:9.2f} ms/step")
        fo = results["fusedopt.AdamW"]
        print(f"  torch fused / fusedopt          {results['torch AdamW fused'] / fo:6.2f}x")
        print(f"  torch foreach / fusedopt        {results['torch AdamW foreach'] / fo:6.2f}x")
        clip = results["fusedopt.AdamW max_grad_norm"]
        print(f"  (clip_grad_norm_ + torch fused) / fusedopt max_grad_norm "
              f"{results['clip_grad_norm_ + torch fused'] / clip:6.2f}x")
    dist.barrier()
    dist.destroy_process_group()
    store.add("exited", 1)
    while rank == 0 and store.add("exited", 0) < world_size:
        time.sleep(0.01)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="per rank")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.world_size, port, args), nprocs=args.world_size)


if __name__ == "__main__":
    main()
