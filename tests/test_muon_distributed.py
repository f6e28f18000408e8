"""fusedopt.Muon on 2 gloo ranks (CPU): replicated params (as under DDP, with
``process_group=``) and FSDP2 ``fully_shard`` params (DTensor ``Shard(0)``, uneven shards
included) orthogonalise each matrix on exactly one rank, and the params equal a single-process
fusedopt.Muon bit for bit (the same grads on every rank, so FSDP2's mean grad is exact).

Each spawned rank runs the check itself; a failing assertion in a rank fails the test with
that rank's traceback."""
from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORLD = 2
# Three matrices of one shape (an odd count: rank 0 does 2, rank 1 does 1), two of another,
# one alone (rank 1 has nothing to do for it), a tall and a wide one.
SHAPES = [(24, 8), (24, 8), (24, 8), (8, 40), (8, 40), (16, 16)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, port, queue):
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    try:
        store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=rank == 0)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
        fn(rank)
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, None))
    except BaseException as e:  # noqa: BLE001  (reported to the parent, which fails the test)
        import traceback
        queue.put((rank, traceback.format_exc()))
    queue.close()
    queue.join_thread()  # (os._exit would drop a message still in the queue's feeder thread)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip C++ static destructors of gloo threads (intermittent aborts at exit)


def launch(fn, timeout=120):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(rank, fn, port, queue)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < WORLD:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"{fn.__name__} did not finish in {timeout} s")
            try:
                rank, error = queue.get(timeout=min(remaining, 1.0))
            except Exception:  # queue.Empty
                if any(p.exitcode not in (None, 0) for p in procs):
                    pytest.fail(f"a rank died: exit codes {[p.exitcode for p in procs]}")
                continue
            results[rank] = error
            if error:  # the other rank may now wait in a collective forever
                pytest.fail(f"rank {rank} failed:\n{error}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    for rank, error in sorted(results.items()):
        if error:
            pytest.fail(f"rank {rank} failed:\n{error}")


def _make(seed=0):
    g = torch.Generator().manual_seed(seed)
    muon = [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    adamw = [nn.Parameter(torch.randn(7, generator=g))]
    return muon, adamw


def _run(process_group, steps=5):
    import fusedopt
    muon, adamw = _make()
    opt = fusedopt.Muon([dict(params=muon), dict(params=adamw, use_muon=False, lr=1e-2)], lr=0.02,
                        process_group=process_group)
    g = torch.Generator().manual_seed(1)  # the same grads on every rank: what DDP's all-reduce leaves
    for _ in range(steps):
        for p in muon + adamw:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return muon + adamw, opt


def _check_split_equals_single_process(rank):
    import fusedopt
    from fusedopt import muon as muon_module
    sizes = []
    original = muon_module.newton_schulz

    def recording(stack, *args):
        sizes.append(tuple(stack.shape))
        return original(stack, *args)

    muon_module.newton_schulz = recording
    try:
        split, opt = _run(dist.group.WORLD)
    finally:
        muon_module.newton_schulz = original
    single, ref = _run(None)
    for a, b in zip(split, single):
        assert torch.equal(a.detach(), b.detach()), (a - b).abs().max()
    for a, b in zip(split[:len(SHAPES)], single[:len(SHAPES)]):
        assert torch.equal(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])
    # Each rank orthogonalised only its share of each shape group, every step.
    per_step = {0: [(2, 24, 8), (1, 8, 40), (1, 16, 16)], 1: [(1, 24, 8), (1, 8, 40)]}[rank]
    assert sizes == per_step * 5, sizes


def test_replicated_params_split_newton_schulz_and_match_single_process():
    launch(_check_split_equals_single_process)


def test_process_group_needs_initialized_distributed():
    import fusedopt
    if dist.is_initialized():  # pragma: no cover
        pytest.skip("this process already runs torch.distributed")
    with pytest.raises(ValueError, match="process_group needs torch.distributed to be initialized"):
        fusedopt.Muon([nn.Parameter(torch.zeros(2, 2))], process_group=object())


class _Net(nn.Module):
    """Uneven shards included: 7 and 9 rows over 2 ranks are 4+3 and 5+4."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 7), nn.Linear(7, 9), nn.Linear(9, 8), nn.Linear(8, 8),
                                     nn.Linear(8, 8)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def _train_net(model, opt, steps=4):
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=g)  # the same batch on every rank: FSDP2's mean grad is exact
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _check_fsdp2_equals_single_process(rank):
    import fusedopt
    from fusedopt import muon as muon_module
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    reference = _Net()
    model = _Net()
    model.load_state_dict(reference.state_dict())
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sizes = []
    original = muon_module.newton_schulz

    def recording(stack, *args):
        sizes.append(stack.shape[0])
        return original(stack, *args)

    muon_module.newton_schulz = recording
    try:
        opt = fusedopt.Muon(fusedopt.muon_param_groups(model, lr=0.02, adamw_lr=1e-2), lr=0.02)
        _train_net(model, opt)
    finally:
        muon_module.newton_schulz = original
    ref_opt = fusedopt.Muon(fusedopt.muon_param_groups(reference, lr=0.02, adamw_lr=1e-2), lr=0.02)
    _train_net(reference, ref_opt)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert isinstance(p, DTensor)
        full = p.full_tensor()
        assert torch.equal(full, q.detach()), (name, (full - q).abs().max())
    buf = opt.state[model.layers[1].weight]["momentum_buffer"]
    assert isinstance(buf, DTensor) and torch.equal(buf.full_tensor(),
                                                    ref_opt.state[reference.layers[1].weight]["momentum_buffer"])
    # Muon matrices [7,8], [9,7], [8,9] (one each: rank 0 does it) and two [8,8] (one per
    # rank); the head is AdamW. Per step:
    assert sizes == ([1, 1, 1, 1] if rank == 0 else [1]) * 4, sizes




def _check_fsdp2_clipping_and_stats(rank):
    import fusedopt
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    reference = _Net()
    model = _Net()
    model.load_state_dict(reference.state_dict())
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    kw = dict(lr=0.02, max_grad_norm=0.05, track_stats=True)
    opt = fusedopt.Muon(fusedopt.muon_param_groups(model, lr=0.02, adamw_lr=1e-2), **kw)
    _train_net(model, opt)
    ref_opt = fusedopt.Muon(fusedopt.muon_param_groups(reference, lr=0.02, adamw_lr=1e-2), **kw)
    _train_net(reference, ref_opt)
    assert ref_opt.last_grad_norm > 0.05 * 2  # clipping is active
    # The global norm is summed in another order (float64 sums of squares of shards, one
    # all_reduce, vs clip_grad_norm_'s norm of fp32 per-tensor norms): a few fp32 ulps.
    torch.testing.assert_close(opt.last_grad_norm, ref_opt.last_grad_norm, rtol=1e-5, atol=0)
    for got, want in zip(opt.stats(), ref_opt.stats()):
        for key in ("grad_norm", "param_norm", "update_ratio"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=0)
    for p, q in zip(model.parameters(), reference.parameters()):
        # An ulp of the clip factor can flip a bf16 rounding of the Newton-Schulz input: one
        # bf16 ulp (2**-8 relative) of an update entry (|O| < 1) times lr 0.02, per step.
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=0, atol=4 * 0.02 * 2 ** -8)


def _check_fsdp2_stochastic_rounding(rank):
    import fusedopt
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    reference = _Net().bfloat16()
    model = _Net().bfloat16()
    model.load_state_dict(reference.state_dict())
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    muon_only = lambda m: [p for layer in m.layers for p in (layer.weight,)]  # noqa: E731
    opt = fusedopt.Muon(muon_only(model), lr=0.02, stochastic_rounding=True, seed=5)
    ref_opt = fusedopt.Muon(muon_only(reference), lr=0.02, stochastic_rounding=True, seed=5)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(16, 8, generator=g).bfloat16()
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).float().pow(2).mean().backward()
            for layer in m.layers:  # (biases and head are not stepped here)
                layer.bias.grad = None
            o.step()
    for p, q in zip(muon_only(model), muon_only(reference)):
        # SR bits keyed by the element's index in the full param: the shards draw the bits of
        # the single-process run, so the results are equal.
        assert torch.equal(p.full_tensor(), q.detach())


def _check_fsdp2(rank):
    _check_fsdp2_equals_single_process(rank)
    _check_fsdp2_clipping_and_stats(rank)
    _check_fsdp2_stochastic_rounding(rank)


def test_fsdp2_matches_single_process_with_and_without_clipping():
    launch(_check_fsdp2)  # (one launch: spawning the ranks is most of the time)
