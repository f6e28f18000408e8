"""fusedopt under torch.distributed, on CPU with gloo: FSDP2 (``fully_shard``) and tensor
parallel DTensor params, DCP checkpoints, DDP and ``ZeroRedundancyOptimizer``.

Every test spawns its ranks (``torch.multiprocessing``, world size 2, and 1 where a run on one
rank is the reference); the ranks run the checks and an assertion in any rank fails the test
with that rank's traceback. References:

* the same sharded model stepped by ``torch.optim`` (``foreach=False``), compared with the
  fp32 tolerance of conftest's table (both see the same grads; only op order differs);
* a single-process (non-distributed) fusedopt run. Where every rank is fed the same batch,
  FSDP2's averaged grad ``(g + g) / 2`` is ``g`` exactly, so the sharded run must equal the
  single-process one *bit for bit*: the kernels are elementwise on the local shard, and
  stochastic rounding is keyed by the element's index in the full param.
"""
from __future__ import annotations

import copy
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fusedopt
from conftest import assert_bits_equal, assert_close

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORLD = 2


# --------------------------------------------------------------------------------------------
# Launching ranks
# --------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, args):
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    fn(rank, world_size, *args)
    dist.barrier()
    dist.destroy_process_group()
    # Rank 0 hosts the store: it leaves last, once every rank has torn its group down.
    store.add("exited", 1)
    deadline = time.monotonic() + 30
    while rank == 0 and store.add("exited", 0) < world_size and time.monotonic() < deadline:
        time.sleep(0.01)
    # The rank's work passed. Leave without running C++ static destructors: torch's gloo/c10d
    # threads can still be joinable then and abort the process ("terminate called without an
    # active exception", seen intermittently at exit on this 2-core machine).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn, world_size=WORLD, *args, timeout=120):
    """Runs ``fn(rank, world_size, *args)`` on `world_size` spawned ranks; re-raises a rank's
    exception; kills the ranks it started when they outlive `timeout` (a hang)."""
    ctx = mp.start_processes(_entry, args=(fn, world_size, _free_port(), args), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{fn.__name__} did not finish in {timeout} s")


# --------------------------------------------------------------------------------------------
# Model, data, helpers (run inside the ranks)
# --------------------------------------------------------------------------------------------

class Net(nn.Module):
    """Uneven shapes on purpose: 7 and 5 rows shard 4+3 and 3+2 over two ranks, and the
    1-row head leaves rank 1 an empty shard of it."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(16, 7)
        self.l2 = nn.Linear(7, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def make_net(mesh=None, dtype=torch.float32, seed=0):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Net().to(dtype)
    if mesh is not None:
        for layer in (model.l1, model.l2, model.head):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def batch(step, rank, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=gen).to(dtype), torch.randn(8, 1, generator=gen).to(dtype)


def train(model, opt, steps, rank, *, start=0, same_data=False, clip=None, dtype=torch.float32, on_step=None):
    """`same_data`: every rank gets rank 0's batch (then FSDP's averaged grad is exact)."""
    for s in range(start, start + steps):
        x, y = batch(s, 0 if same_data else rank, dtype)
        F.mse_loss(model(x).float(), y.float()).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if on_step is not None:
            on_step(s)
        opt.zero_grad()


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_params(model):
    return [full(p).detach().clone() for p in model.parameters()]


def full_state(opt, model):
    return [{k: full(v).clone() for k, v in opt.state[p].items()} for p in model.parameters()]


def count_builds(opt):
    """Counts how often the optimizer rebuilds its pointer table."""
    calls = [0]
    build = opt._build_plan

    def counting():
        calls[0] += 1
        return build()

    opt._build_plan = counting
    return calls


CONFIGS = {
    "adamw-wd": (fusedopt.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam-amsgrad": (fusedopt.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05, amsgrad=True)),
    "sgd-momentum": (fusedopt.SGD, torch.optim.SGD, dict(lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.01)),
}


# --------------------------------------------------------------------------------------------
# 1. FSDP2: parity with torch.optim under the same sharding and with one process
# --------------------------------------------------------------------------------------------

def _fsdp_parity(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,))
    steps = 5
    for name, (fo_cls, torch_cls, kw) in CONFIGS.items():
        # Data parallel (a different batch per rank): same grads for both optimizers.
        model = make_net(mesh)
        opt = fo_cls(model.parameters(), **kw)
        builds = count_builds(opt)
        train(model, opt, steps, rank)
        assert builds[0] == 1, f"{name}: the pointer table was rebuilt {builds[0]} times in {steps} steps"
        ref_model = make_net(mesh)
        ref_opt = torch_cls(ref_model.parameters(), foreach=False, **kw)
        train(ref_model, ref_opt, steps, rank)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert set(opt.state[p]) == set(ref_opt.state[q]), name
            for key, value in opt.state[p].items():
                if key != "step":  # state is a DTensor laid out like its param, as torch keeps it
                    assert isinstance(value, DTensor), f"{name}: state {key} is {type(value).__name__}"
                    assert value.placements == p.placements and value.device_mesh == p.device_mesh
        for i, (a, b) in enumerate(zip(full_params(model), full_params(ref_model))):
            assert_close(a, b, msg=f"{name}: param {i} vs torch")
        for i, (sa, sb) in enumerate(zip(full_state(opt, model), full_state(ref_opt, ref_model))):
            for key in sb:
                assert_close(sa[key], sb[key], msg=f"{name}: param {i} state {key} vs torch")

        # Same batch on every rank: bit-equal to one process stepping the whole model.
        model = make_net(mesh)
        opt = fo_cls(model.parameters(), **kw)
        train(model, opt, steps, rank, same_data=True)
        single = make_net()
        single_opt = fo_cls(single.parameters(), **kw)
        train(single, single_opt, steps, 0)
        for i, (a, b) in enumerate(zip(full_params(model), full_params(single))):
            assert_bits_equal(a, b, msg=f"{name}: param {i} vs single process")
        for i, (sa, sb) in enumerate(zip(full_state(opt, model), full_state(single_opt, single))):
            for key in sb:
                assert_bits_equal(sa[key], sb[key], msg=f"{name}: param {i} state {key} vs single process")
        # A state dict of plain tensors (the single process's) loads into the sharded optimizer:
        # each rank keeps its shard, and both go on in step.
        opt = fo_cls(model.parameters(), **kw)
        opt.load_state_dict(copy.deepcopy(single_opt.state_dict()))  # (it shares the live tensors)
        train(model, opt, 2, rank, start=steps, same_data=True)
        train(single, single_opt, 2, 0, start=steps)
        for i, (a, b) in enumerate(zip(full_params(model), full_params(single))):
            assert_bits_equal(a, b, msg=f"{name}: param {i} after loading the single process's state")
        for p in model.parameters():
            assert all(isinstance(v, DTensor) for k, v in opt.state[p].items() if k != "step")


def test_fsdp2_matches_torch_and_single_process():
    launch(_fsdp_parity)


# --------------------------------------------------------------------------------------------
# 2. Global norms: sharded clipping and track_stats over the whole model, one collective
# --------------------------------------------------------------------------------------------

def _count_all_reduce():
    calls = [0]
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    return calls


def _groups(model):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [dict(params=decay, weight_decay=0.1), dict(params=rest, weight_decay=0.0)]


def _check_stats(opt, groups_before, groups_grads, model_groups, msg):
    stats = opt.stats()
    for gi, (before, grads, after) in enumerate(zip(groups_before, groups_grads, model_groups)):
        norm = lambda ts: torch.stack([t.double().pow(2).sum() for t in ts]).sum().sqrt()  # noqa: E731
        after = [full(p).detach() for p in after]
        expect = dict(grad_norm=norm(grads), param_norm=norm(after),
                      update_ratio=norm([a - b for a, b in zip(after, before)]) / norm(before))
        for key, value in expect.items():
            torch.testing.assert_close(stats[gi][key], value.float(), rtol=1e-5, atol=0,
                                       msg=lambda m: f"{msg}: group {gi} {key}: {m}")


def _global_norms(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,))
    steps, max_norm = 4, 0.05  # small enough that every step clips
    calls = _count_all_reduce()
    # (a) FSDP2: fusedopt's max_grad_norm equals clip_grad_norm_ + torch's step.
    for stats_on in (False, True):
        model, ref_model = make_net(mesh), make_net(mesh)
        opt = fusedopt.AdamW(_groups(model), lr=1e-2, max_grad_norm=max_norm, track_stats=stats_on)
        ref_opt = torch.optim.AdamW(_groups(ref_model), lr=1e-2, foreach=False)
        for s in range(steps):
            for m in (model, ref_model):
                x, y = batch(s, rank)
                F.mse_loss(m(x), y).backward()
            grads = [[full(p.grad).clone() for p in g["params"]] for g in opt.param_groups]
            before = [[full(p).detach().clone() for p in g["params"]] for g in opt.param_groups]
            ref_norm = full(torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm))
            assert ref_norm > 2 * max_norm, "test setup: the step must clip"
            calls[0] = 0
            opt.step()
            assert calls[0] == 1 + stats_on, f"{calls[0]} all_reduce calls in one step (stats={stats_on})"
            ref_opt.step()
            torch.testing.assert_close(opt.last_grad_norm, ref_norm.float(), rtol=1e-6, atol=0)
            if stats_on:
                _check_stats(opt, before, grads, [g["params"] for g in opt.param_groups], "fsdp2 stats")
            for m in (model, ref_model):
                m.zero_grad()
        for i, (a, b) in enumerate(zip(full_params(model), full_params(ref_model))):
            assert_close(a, b, msg=f"clipped param {i}")

    # (b) Tensor parallel: Shard(0), Shard(1) and Replicate (the row-parallel bias, counted
    # once) next to plain params (a LayerNorm: replicated, counted once).
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def tp_model():
        torch.manual_seed(1)
        m = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))
        return parallelize_module(m, mesh, {"1": ColwiseParallel(), "3": RowwiseParallel()})

    model, ref_model = tp_model(), tp_model()
    opt = fusedopt.AdamW(_groups(model), lr=1e-2, max_grad_norm=max_norm, track_stats=True)
    ref_opt = torch.optim.AdamW(_groups(ref_model), lr=1e-2, foreach=False)
    for s in range(steps):
        x, y = batch(s, 0)[0], batch(s, 0)[0][:, :4]  # tensor parallel: the same input on every rank
        for m in (model, ref_model):
            F.mse_loss(m(x), y).backward()
        grads = [[full(p.grad).clone() for p in g["params"]] for g in opt.param_groups]
        before = [[full(p).detach().clone() for p in g["params"]] for g in opt.param_groups]
        ref_norm = torch.stack([full(p.grad).pow(2).sum() for p in ref_model.parameters()]).sum().sqrt()
        coef = torch.clamp(max_norm / (ref_norm + 1e-6), max=1.0)
        for p in ref_model.parameters():
            p.grad.mul_(coef)
        calls[0] = 0
        opt.step()
        assert calls[0] == 2, f"{calls[0]} all_reduce calls in one step (clip + stats)"
        ref_opt.step()
        torch.testing.assert_close(opt.last_grad_norm, ref_norm, rtol=1e-6, atol=0)
        _check_stats(opt, before, grads, [g["params"] for g in opt.param_groups], "tensor-parallel stats")
        for m in (model, ref_model):
            m.zero_grad()
    assert any(isinstance(p, DTensor) and p.placements[0].is_replicate() for p in model.parameters())
    for i, (a, b) in enumerate(zip(full_params(model), full_params(ref_model))):
        assert_close(a, b, msg=f"tensor-parallel param {i}")


def test_sharded_clipping_and_stats_are_global():
    launch(_global_norms)


# --------------------------------------------------------------------------------------------
# 3. Stochastic rounding independent of sharding; DCP checkpoints resume bit-exactly
# --------------------------------------------------------------------------------------------

SR_STEPS, SR_SAVE_AT = 6, 3


def _sr_optimizer(model):
    return fusedopt.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, stochastic_rounding=True, seed=1234)


def _sr_train(model, opt, steps, start=0):
    train(model, opt, steps, 0, start=start, same_data=True, dtype=torch.bfloat16)


def _dcp_save(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)


def _dcp_load(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def _assert_run_equals(model, opt, expected, msg):
    params, states = full_params(model), full_state(opt, model)
    for i, p in enumerate(params):
        assert_bits_equal(p, expected["params"][i], msg=f"{msg}: param {i}")
        for key, value in expected["state"][i].items():
            assert_bits_equal(states[i][key], value, msg=f"{msg}: param {i} state {key}")


def _sr_two_ranks(rank, world_size, tmp):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    model = make_net(mesh, torch.bfloat16)
    opt = _sr_optimizer(model)
    _sr_train(model, opt, SR_SAVE_AT)
    _dcp_save(model, opt, os.path.join(tmp, "ckpt"))
    _sr_train(model, opt, SR_STEPS - SR_SAVE_AT, start=SR_SAVE_AT)
    expected = {"params": full_params(model), "state": full_state(opt, model)}
    if rank == 0:
        torch.save(expected, os.path.join(tmp, "two_ranks.pt"))
    # Resume on two ranks from a model and optimizer that start elsewhere (another init).
    model = make_net(mesh, torch.bfloat16, seed=7)
    opt = _sr_optimizer(model)
    _dcp_load(model, opt, os.path.join(tmp, "ckpt"))
    _sr_train(model, opt, SR_STEPS - SR_SAVE_AT, start=SR_SAVE_AT)
    _assert_run_equals(model, opt, expected, "resumed on 2 ranks")


def _sr_one_rank(rank, world_size, tmp):
    from torch.distributed.device_mesh import init_device_mesh

    expected = torch.load(os.path.join(tmp, "two_ranks.pt"), weights_only=True)
    mesh = init_device_mesh("cpu", (world_size,))
    # The same run on one rank (FSDP2 with one shard) and without FSDP: the same bits.
    model = make_net(mesh, torch.bfloat16)
    opt = _sr_optimizer(model)
    _sr_train(model, opt, SR_STEPS)
    _assert_run_equals(model, opt, expected, "1 rank vs 2 ranks")
    model = make_net(None, torch.bfloat16)
    opt = _sr_optimizer(model)
    _sr_train(model, opt, SR_STEPS)
    _assert_run_equals(model, opt, expected, "no FSDP vs 2 ranks")
    # The run is really stochastic: rounding to nearest gives other bits.
    plain = make_net(None, torch.bfloat16)
    plain_opt = fusedopt.AdamW(plain.parameters(), lr=3e-3, weight_decay=0.1)
    _sr_train(plain, plain_opt, SR_STEPS)
    assert any(not torch.equal(a, b) for a, b in zip(full_params(plain), expected["params"]))
    # The checkpoint written by two ranks, resumed on one.
    model = make_net(mesh, torch.bfloat16, seed=7)
    opt = _sr_optimizer(model)
    _dcp_load(model, opt, os.path.join(tmp, "ckpt"))
    _sr_train(model, opt, SR_STEPS - SR_SAVE_AT, start=SR_SAVE_AT)
    _assert_run_equals(model, opt, expected, "saved on 2 ranks, resumed on 1")


def test_stochastic_rounding_is_sharding_free_and_dcp_resumes_bit_exactly(tmp_path):
    launch(_sr_two_ranks, 2, str(tmp_path))
    launch(_sr_one_rank, 1, str(tmp_path))


def _placements(rank, world_size):
    """Placements and meshes beyond FSDP2's: on each, stochastic rounding gives the bits of a
    single-process run and the clipping norm is the full grad's norm (each element counted
    once, replicas included). Shard(1) of a matrix is no contiguous range of the flattened
    param: stochastic rounding refuses it before anything changes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    flat = init_device_mesh("cpu", (world_size,))
    # Two replicas of a one-rank shard group (HSDP's layout), and nested Shard(0).
    grid = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("replicate", "shard"))
    cases = [(flat, [Shard(0)], (7, 6)), (flat, [Replicate()], (4, 6)), (flat, [Shard(1)], (1, 9)),
             (grid, [Replicate(), Shard(0)], (5, 3)), (grid, [Shard(0), Shard(0)], (7, 2))]
    for mesh, placements, shape in cases:
        gen = torch.Generator().manual_seed(0)
        base, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        label = f"{shape} {placements}"
        # Stochastic rounding: the bits of one process.
        p = nn.Parameter(distribute_tensor(base.bfloat16(), mesh, placements))
        p.grad = distribute_tensor(grad.bfloat16(), mesh, placements)
        q = nn.Parameter(base.bfloat16())
        q.grad = grad.bfloat16()
        for param in (p, q):
            fusedopt.SGD([param], lr=0.1, momentum=0.9, stochastic_rounding=True, seed=3).step()
        assert_bits_equal(full(p).detach(), q.detach(), msg=f"stochastic rounding on {label}")
        # Clipping: the norm of the whole grad.
        p = nn.Parameter(distribute_tensor(base.clone(), mesh, placements))  # (Replicate aliases its input)
        p.grad = distribute_tensor(grad.clone(), mesh, placements)
        opt = fusedopt.SGD([p], lr=0.1, max_grad_norm=0.5)
        opt.step()
        torch.testing.assert_close(opt.last_grad_norm, grad.norm(), rtol=1e-6, atol=0,
                                   msg=lambda m: f"grad norm on {label}: {m}")
        assert_close(full(p).detach(), base - 0.1 * grad * (0.5 / (grad.norm() + 1e-6)), msg=label)

    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).bfloat16()
    p = nn.Parameter(distribute_tensor(base.clone(), flat, [Shard(1)]))
    p.grad = distribute_tensor(torch.ones(4, 6).bfloat16(), flat, [Shard(1)])
    opt = fusedopt.SGD([p], lr=0.1, stochastic_rounding=True, seed=3)
    with pytest.raises(ValueError, match="stochastic_rounding needs each rank's shard"):
        opt.step()
    assert not opt.state.get(p), "the failed step created state"
    assert torch.equal(full(p).detach(), base)


def test_placements_meshes_and_stochastic_rounding_errors():
    launch(_placements)


# --------------------------------------------------------------------------------------------
# 4. DDP and ZeroRedundancyOptimizer work unchanged
# --------------------------------------------------------------------------------------------

def _ddp_and_zero(rank, world_size, tmp):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    steps, kw = 4, dict(lr=1e-2, weight_decay=0.1)
    # DDP: fusedopt (with its own clipping) vs clip_grad_norm_ + torch AdamW.
    model, ref = DDP(make_net()), DDP(make_net())
    opt = fusedopt.AdamW(model.parameters(), max_grad_norm=0.05, **kw)
    train(model, opt, steps, rank)
    train(ref, torch.optim.AdamW(ref.parameters(), foreach=False, **kw), steps, rank, clip=0.05)
    for i, (a, b) in enumerate(zip(model.parameters(), ref.parameters())):
        assert_close(a, b, msg=f"DDP param {i}")
        replica = a.detach().clone()
        dist.broadcast(replica, 0)
        assert_bits_equal(a.detach(), replica, msg=f"DDP param {i} differs between ranks")

    # ZeRO-1: each rank steps its partition with fusedopt.AdamW, then broadcasts it.
    def zero(factory_cls):
        m = DDP(make_net())
        return m, ZeroRedundancyOptimizer(m.parameters(), optimizer_class=factory_cls, **kw)

    model, opt = zero(fusedopt.AdamW)
    assert 0 < sum(1 for g in opt.optim.param_groups for _ in g["params"]) < len(list(model.parameters()))
    train(model, opt, steps, rank)
    ref, ref_opt = zero(torch.optim.AdamW)
    train(ref, ref_opt, steps, rank)
    for i, (a, b) in enumerate(zip(model.parameters(), ref.parameters())):
        assert_close(a, b, msg=f"ZeRO param {i} vs ZeRO(torch AdamW)")
    # Same update as DDP + fusedopt.AdamW without clipping, whichever rank computes it.
    model2 = DDP(make_net())
    train(model2, fusedopt.AdamW(model2.parameters(), **kw), steps, rank)
    for i, (a, b) in enumerate(zip(model.parameters(), model2.parameters())):
        assert_bits_equal(a.detach(), b.detach(), msg=f"ZeRO param {i} vs DDP + fusedopt")
    # Its consolidated state dict resumes bit-exactly.
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save(opt.state_dict(), os.path.join(tmp, "zero.pt"))
    dist.barrier()
    resumed, resumed_opt = zero(fusedopt.AdamW)
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), model.parameters()):
            p.copy_(q)
    resumed_opt.load_state_dict(torch.load(os.path.join(tmp, "zero.pt"), weights_only=True))
    train(model, opt, 2, rank, start=steps)
    train(resumed, resumed_opt, 2, rank, start=steps)
    for i, (a, b) in enumerate(zip(model.parameters(), resumed.parameters())):
        assert_bits_equal(a.detach(), b.detach(), msg=f"ZeRO param {i} after resume")


def test_ddp_and_zero_redundancy_optimizer(tmp_path):
    launch(_ddp_and_zero, 2, str(tmp_path))
