"""Lion, AdamWScheduleFree and SGDScheduleFree against the real packages the contract names
(lion-pytorch, torch-optimi, schedulefree 1.4), and their behaviour on fusedopt's machinery:
state dicts both ways, train/eval, p.grad untouched, bf16 precision paths, clipping, found_inf,
errors.

Tolerances: fp32 parity uses the conftest fp32 row (rtol 1.3e-6, atol 1e-5): both sides
compute in fp32 and differ only in operation order (schedulefree's foreach-free path divides
and lerps in separate kernels; fusedopt fuses them), a few ulps per step. Lion's sign makes
every update exactly +-lr, so fusedopt equals optimi and lion-pytorch bit for bit unless an
interpolated moment lands within an ulp of 0 (it does not on these seeded grads).
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fusedopt
from conftest import assert_close

lion_pytorch = pytest.importorskip("lion_pytorch", reason="test requirement: pip install lion-pytorch")
optimi = pytest.importorskip("optimi", reason="test requirement: pip install torch-optimi")
schedulefree = pytest.importorskip("schedulefree", reason="test requirement: pip install schedulefree")

STEPS = 12
SHAPES = [(33, 7), (100,), (5, 4, 3)]


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def grads_for(step, params, seed=1):
    g = torch.Generator().manual_seed(seed * 10007 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def groups_of(params, **second):
    """Two param groups; the second with its own hyper-parameters."""
    return [{"params": params[:2]}, {"params": params[2:], **second}]


def run(opt, params, steps, first=0, schedule_free=False):
    for k in range(first, first + steps):
        for p, g in zip(params, grads_for(k, params)):
            p.grad = g
        opt.step()
    return params


# (id, fusedopt factory, reference factory, schedule-free?)
CASES = [
    ("lion-vs-lion_pytorch",
     lambda ps, **kw: fusedopt.Lion(groups_of(ps, lr=3e-3, weight_decay=0.5), lr=1e-3, betas=(0.9, 0.99),
                                    weight_decay=0.1, **kw),
     lambda ps: lion_pytorch.Lion(groups_of(ps, lr=3e-3, weight_decay=0.5), lr=1e-3, betas=(0.9, 0.99),
                                  weight_decay=0.1), False),
    ("lion-vs-optimi",
     lambda ps, **kw: fusedopt.Lion(groups_of(ps, lr=2e-3), lr=1e-3, betas=(0.8, 0.95), weight_decay=0.2, **kw),
     lambda ps: optimi.Lion(groups_of(ps, lr=2e-3), lr=1e-3, betas=(0.8, 0.95), weight_decay=0.2, decouple_lr=False,
                            foreach=False), False),
    ("sf-adamw",
     lambda ps, **kw: fusedopt.AdamWScheduleFree(groups_of(ps, lr=5e-3, weight_decay=0.0), lr=1e-2, weight_decay=0.1,
                                                 warmup_steps=4, betas=(0.9, 0.99), **kw),
     lambda ps: schedulefree.AdamWScheduleFree(groups_of(ps, lr=5e-3, weight_decay=0.0), lr=1e-2, weight_decay=0.1,
                                               warmup_steps=4, betas=(0.9, 0.99), foreach=False), True),
    ("sf-adamw-r-power",
     lambda ps, **kw: fusedopt.AdamWScheduleFree(ps, lr=1e-2, r=0.5, weight_lr_power=1.0, eps=1e-6, **kw),
     lambda ps: schedulefree.AdamWScheduleFree(ps, lr=1e-2, r=0.5, weight_lr_power=1.0, eps=1e-6, foreach=False),
     True),
    ("sf-sgd",
     lambda ps, **kw: fusedopt.SGDScheduleFree(groups_of(ps, momentum=0.5), lr=0.1, weight_decay=0.05,
                                               warmup_steps=3, **kw),
     lambda ps: schedulefree.SGDScheduleFree(groups_of(ps, momentum=0.5), lr=0.1, weight_decay=0.05, warmup_steps=3,
                                             foreach=False), True),
]
# Cross-loading state dicts: schedulefree's and lion-pytorch's layouts (optimi keeps other group
# keys, e.g. kahan_sum, so its state dicts are not interchangeable with anyone's).
CROSS = [c for c in CASES if c[0] != "lion-vs-optimi"]
IDS = [c[0] for c in CASES]


def _train(opt, sf):
    if sf:
        opt.train()


def _compare_states(got_opt, ref_opt, got_ps, ref_ps):
    for gp, rp in zip(got_ps, ref_ps):
        gs, rs = got_opt.state[gp], ref_opt.state[rp]
        # optimi also keeps a kahan_comp entry (unused for fp32); every key fusedopt keeps is the
        # reference's.
        assert set(gs) <= set(rs) and set(gs), (set(gs), set(rs))
        for k in gs:
            assert_close(gs[k], rs[k], msg=k)


@pytest.mark.parametrize("cid,make,make_ref,sf", CASES, ids=IDS)
def test_parity_with_the_reference_package(cid, make, make_ref, sf):
    got_ps, ref_ps = make_params(), make_params()
    got, ref = make(got_ps), make_ref(ref_ps)
    _train(got, sf), _train(ref, sf)
    run(got, got_ps, STEPS)
    run(ref, ref_ps, STEPS)
    for a, b in zip(got_ps, ref_ps):
        assert_close(a, b, msg=cid)
    assert not torch.equal(got_ps[0], make_params()[0]), "params did not move"
    _compare_states(got, ref, got_ps, ref_ps)
    if sf:
        got.eval(), ref.eval()
        for a, b in zip(got_ps, ref_ps):
            assert_close(a, b, msg=f"{cid} eval point x")
        for g, r in zip(got.param_groups, ref.param_groups):
            for key in ("k", "train_mode", "weight_sum", "lr_max", "scheduled_lr"):
                assert g[key] == pytest.approx(r[key], rel=1e-12), key


@pytest.mark.parametrize("direction", ["reference-to-fusedopt", "fusedopt-to-reference"])
@pytest.mark.parametrize("cid,make,make_ref,sf", CROSS, ids=[c[0] for c in CROSS])
def test_state_dicts_load_both_ways_and_training_continues(cid, make, make_ref, sf, direction):
    first, second = (make_ref, make) if direction == "reference-to-fusedopt" else (make, make_ref)
    ps_a = make_params()
    a = first(ps_a)
    _train(a, sf)
    run(a, ps_a, 5)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    ps_b = [nn.Parameter(p.detach().clone()) for p in ps_a]
    b = second(ps_b)
    b.load_state_dict(sd)
    run(a, ps_a, 5, first=5)
    run(b, ps_b, 5, first=5)
    for x, y in zip(ps_b, ps_a):
        assert_close(x, y, msg=direction)


@pytest.mark.parametrize("cid,make,make_ref,sf", CASES, ids=IDS)
def test_grads_are_not_written(cid, make, make_ref, sf):
    ps = make_params()
    opt = make(ps)
    _train(opt, sf)
    grads = grads_for(0, ps)
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(ps, grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("cid,make,make_ref,sf", CASES, ids=IDS)
def test_clipping_equals_clip_grad_norm_then_the_reference(cid, make, make_ref, sf):
    got_ps, ref_ps = make_params(), make_params()
    got = make(got_ps, max_grad_norm=0.7)
    ref = make_ref(ref_ps)
    _train(got, sf), _train(ref, sf)
    for k in range(4):
        for p, q, g in zip(got_ps, ref_ps, grads_for(k, got_ps)):
            p.grad, q.grad = g * 3, g * 3
        norm = torch.nn.utils.clip_grad_norm_(ref_ps, 0.7)
        got.step()
        ref.step()
        assert_close(got.last_grad_norm, norm.float(), msg="last_grad_norm")
    for a, b in zip(got_ps, ref_ps):
        assert_close(a, b, msg=cid)


@pytest.mark.parametrize("cid,make,make_ref,sf", CASES, ids=IDS)
def test_found_inf_skips_everything(cid, make, make_ref, sf):
    ps = make_params()
    opt = make(ps)
    _train(opt, sf)
    run(opt, ps, 2)
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ps]
    for p, g in zip(ps, grads_for(9, ps)):
        p.grad = g
    if sf:  # GradScaler unscales and checks schedule-free grads itself, then skips the step
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
        for p in ps:
            p.grad = None
        weights = grads_for(9, ps)
        weights[1][3] = float("inf")
        scaler.scale(sum((p * w).sum() for p, w in zip(ps, weights))).backward()
        scaler.step(opt)
    else:
        opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
        opt.step()
        del opt.grad_scale, opt.found_inf
    after = opt.state_dict()
    for p, b in zip(ps, before[1]):
        assert torch.equal(p, b)
    for pid, st in before[0]["state"].items():
        for k, v in st.items():
            assert torch.equal(after["state"][pid][k], v), k
    for g0, g1 in zip(before[0]["param_groups"], after["param_groups"]):
        assert g0 == g1
    if sf:
        assert ps[1].grad is not None  # (GradScaler unscaled them in place: torch's non-fused path)


@pytest.mark.parametrize("cid,make,make_ref,sf", [c for c in CASES if c[0] in ("lion-vs-optimi", "sf-adamw")],
                         ids=["lion", "sf-adamw"])
def test_bf16_stochastic_rounding_tracks_fp32_and_is_deterministic(cid, make, make_ref, sf):
    def bf16_run():
        ps = make_params(torch.bfloat16)
        opt = make(ps, stochastic_rounding=True, seed=7)
        _train(opt, sf)
        return run(opt, ps, STEPS), opt
    (a, opt_a), (b, _) = bf16_run(), bf16_run()
    for x, y in zip(a, b):
        assert torch.equal(x, y), "stochastic rounding is not deterministic for a seed"
    ref_ps = make_params()
    ref = make(ref_ps)
    _train(ref, sf)
    run(ref, ref_ps, STEPS)
    # 12 steps of unbiased rounding: each element's error is a sum of independent per-step
    # errors of at most one bf16 ulp (2^-8 relative), so it stays within a few ulps.
    for x, r in zip(a, ref_ps):
        err = (x.float() - r.detach()).abs()
        assert err.max().item() <= 8 * 2**-8 * max(1.0, r.detach().abs().max().item())


def test_lion_in_bf16_moves_only_with_stochastic_rounding_or_kahan():
    """Weights of 1.0 and lr 1e-4: every Lion update (exactly +-lr) is below half a bf16 ulp
    (2^-8), so naive bf16 never changes a weight; SR and Kahan accumulate the updates."""
    moved = {}
    for name, kw in [("naive", {}), ("sr", dict(stochastic_rounding=True, seed=0)), ("kahan", dict(kahan_summation=True))]:
        p = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = fusedopt.Lion([p], lr=1e-4, **kw)
        for _ in range(200):
            p.grad = torch.ones_like(p)  # constant grad: the update is -lr every step
            opt.step()
        moved[name] = 1.0 - p.float().mean().item()
    assert moved["naive"] == 0.0
    # 200 steps of -1e-4: the fp32 trajectory ends at 0.98 (moved 0.02).
    assert moved["sr"] == pytest.approx(0.02, rel=0.1)
    # Kahan's compensation is itself a bf16 buffer, so it recovers all but a few percent.
    assert moved["kahan"] == pytest.approx(0.02, rel=0.05)


def test_schedule_free_starts_in_eval_mode_and_step_raises_until_train():
    p = make_params()
    opt = fusedopt.AdamWScheduleFree(p)
    for q, g in zip(p, grads_for(0, p)):
        q.grad = g
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        opt.step()
    assert not opt.state and opt.param_groups[0]["k"] == 0
    opt.train()
    opt.step()
    assert opt.param_groups[0]["k"] == 1
    opt.eval()
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        opt.step()


def test_schedule_free_train_eval_round_trip_matches_the_reference():
    """eval() then train() returns y up to the lerp's rounding, as in schedulefree."""
    got_ps, ref_ps = make_params(), make_params()
    got, ref = fusedopt.SGDScheduleFree(got_ps, lr=0.1), schedulefree.SGDScheduleFree(ref_ps, lr=0.1)
    got.train(), ref.train()
    run(got, got_ps, 3)
    run(ref, ref_ps, 3)
    for _ in range(2):
        got.eval(), ref.eval(), got.eval()  # a second eval() is a no-op
        got.train(), ref.train()
    for a, b in zip(got_ps, ref_ps):
        assert_close(a, b)


def test_schedule_free_master_weights_swap_the_master():
    ps = make_params(torch.bfloat16)
    opt = fusedopt.AdamWScheduleFree(ps, lr=1e-2, master_weights=True)
    opt.train()
    run(opt, ps, 3)
    opt.eval()
    for p in ps:
        st = opt.state[p]
        assert st["z"].dtype == torch.float32
        assert torch.equal(p, st["master_param"].to(torch.bfloat16))


ERRORS = [
    (lambda ps: fusedopt.Lion(ps, lr=-1.0), "Invalid learning rate"),
    (lambda ps: fusedopt.Lion(ps, betas=(1.5, 0.9)), "Invalid beta parameter at index 0"),
    (lambda ps: fusedopt.Lion(ps, weight_decay=-0.1), "Invalid weight_decay value"),
    (lambda ps: fusedopt.AdamWScheduleFree(ps, betas=(0.9, 1.0)), "Invalid beta parameter at index 1"),
    (lambda ps: fusedopt.AdamWScheduleFree(ps, eps=-1.0), "Invalid epsilon value"),
    (lambda ps: fusedopt.AdamWScheduleFree(ps, warmup_steps=-1), "Invalid warmup_steps value"),
    (lambda ps: fusedopt.AdamWScheduleFree(ps, weight_decay_mode="decoupled"), "weight_decay_mode is not offered"),
    (lambda ps: fusedopt.SGDScheduleFree(ps, momentum=1.0), "Momentum must be between 0 and 1"),
    (lambda ps: fusedopt.SGDScheduleFree(ps, momentum=0.0), "Momentum must be between 0 and 1"),
    (lambda ps: fusedopt.SGDScheduleFree([p.bfloat16() for p in ps], kahan_summation=True),
     "kahan_summation is not offered"),
    (lambda ps: fusedopt.Lion(ps, stochastic_rounding=True), "needs torch.bfloat16 params"),
]


@pytest.mark.parametrize("make,match", ERRORS)
def test_bad_hyper_parameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make(make_params())


@pytest.mark.parametrize("cid,make,make_ref,sf", CASES, ids=IDS)
def test_a_failed_step_changes_nothing(cid, make, make_ref, sf):
    ps = make_params()
    opt = make(ps)
    _train(opt, sf)
    run(opt, ps, 2)
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ps]
    for p, g in zip(ps, grads_for(5, ps)):
        p.grad = g
    ps[2].grad = ps[2].grad.to_sparse()  # the last param's grad is one fusedopt refuses
    with pytest.raises(ValueError, match="sparse gradients are not supported"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before[1]))
    after = opt.state_dict()
    assert after["param_groups"] == before[0]["param_groups"]
    for pid, st in before[0]["state"].items():
        assert all(torch.equal(after["state"][pid][k], v) for k, v in st.items())


@pytest.mark.parametrize("cls", [fusedopt.Lion, fusedopt.AdamWScheduleFree])
def test_tensor_lr_and_track_stats(cls):
    ps, qs = make_params(), make_params()
    a = cls(ps, lr=torch.tensor(1e-3), track_stats=True)
    b = cls(qs, lr=1e-3)
    for opt in (a, b):
        if hasattr(opt, "train"):
            opt.train()
    run(a, ps, 3)
    run(b, qs, 3)
    for x, y in zip(ps, qs):
        assert torch.equal(x, y)
    stats = a.stats()[0]
    want = torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in ps]))
    assert_close(stats["param_norm"], want.float(), msg="param_norm")


def test_schedule_free_groups_with_same_shaped_params_match_the_reference():
    """Each group's row is found by identity: groups whose params lists look alike (same
    lengths and shapes) must not be compared tensor by tensor."""
    shapes = [(6, 5)] * 3
    got_ps = [nn.Parameter(t.clone()) for t in (torch.randn(s, generator=torch.Generator().manual_seed(i))
                                                 for i, s in enumerate(shapes))]
    ref_ps = [nn.Parameter(p.detach().clone()) for p in got_ps]
    got = fusedopt.AdamWScheduleFree([{"params": [p], "lr": 1e-2 * (i + 1)} for i, p in enumerate(got_ps)])
    ref = schedulefree.AdamWScheduleFree([{"params": [p], "lr": 1e-2 * (i + 1)} for i, p in enumerate(ref_ps)],
                                         foreach=False)
    got.train(), ref.train()
    run(got, got_ps, 4)
    run(ref, ref_ps, 4)
    for a, b in zip(got_ps, ref_ps):
        assert_close(a, b)
