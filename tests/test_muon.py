"""fusedopt.Muon against torch.optim.Muon (math, state, state dicts, wording), its AdamW groups
against torch.optim.AdamW(foreach=False), muon_param_groups' routing, the shape modes against a
per-matrix reference written here, and the precision / AMP / clipping paths."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

import fusedopt
from conftest import assert_bits_equal, assert_close

NS = ((3.4445, -4.775, 2.0315), 5, 1e-7)
# Rows > cols, rows < cols, square, a repeated shape (so a shape group has several matrices).
SHAPES = [(24, 8), (8, 24), (16, 16), (24, 8), (12, 20)]

# fp32 parity tolerance. The Newton-Schulz outputs are bit-identical to torch's (asserted in
# test_batched_newton_schulz_equals_per_matrix), and every elementwise op is torch's own op in
# torch's order, so on this machine the params come out bit-equal. Allowed: a few fp32 ulps
# of the params (|p| < 8), in case a foreach kernel vectorises an op differently elsewhere.
FP32 = dict(rtol=0, atol=4e-6)


def make(shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def grads_for(params, steps, seed=1, dtype=None):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(dtype or p.dtype) for p in params] for _ in range(steps)]


def train(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def groups_of(params, **extra):
    return [dict(params=params[:3], **extra), dict(params=params[3:], lr=0.05, weight_decay=0.02, momentum=0.9)]


# ---- math ------------------------------------------------------------------------------------
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_parity_with_torch_muon(nesterov, adjust_lr_fn):
    ref, got = make(), make()
    kw = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    grads = grads_for(ref, 10)
    r = torch.optim.Muon(groups_of(ref), **kw)
    f = fusedopt.Muon(groups_of(got), **kw)
    train(r, ref, grads)
    train(f, got, grads)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.detach(), b.detach(), **FP32)
    for a, b in zip(got, ref):
        torch.testing.assert_close(f.state[a]["momentum_buffer"], r.state[b]["momentum_buffer"], **FP32)
        assert set(f.state[a]) == {"momentum_buffer"}
    assert (got[0] - make()[0]).abs().max() > 0.01  # the params did move


def test_bf16_params_match_torch_muon():
    ref, got = make(dtype=torch.bfloat16), make(dtype=torch.bfloat16)
    grads = grads_for(ref, 10)
    r = torch.optim.Muon(groups_of(ref), lr=0.02)
    f = fusedopt.Muon(groups_of(got), lr=0.02)
    train(r, ref, grads)
    train(f, got, grads)
    for a, b in zip(got, ref):
        # The same bf16 ops as torch (decay, then the add, each rounded once): bf16 table of
        # conftest (2 ulps), measured bit-equal here. A decay factor rounded to bf16
        # (0.998 -> 0.9961, what a Python scalar in a foreach call does) fails this.
        assert_close(a.detach(), b.detach(), msg="bf16 param")
        assert_close(f.state[a]["momentum_buffer"], r.state[b]["momentum_buffer"], msg="bf16 buffer")


def test_tensor_lr_matches_float_lr():
    a, b = make(), make()
    grads = grads_for(a, 10)
    train(fusedopt.Muon(a, lr=0.02), a, grads)
    train(fusedopt.Muon(b, lr=torch.tensor(0.02)), b, grads)
    # The tensor path scales the update first, then adds (the float path adds with alpha):
    # one fp32 rounding more per step, ~1 ulp of |p| < 8 per step over 10 steps.
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 24), (24, 8), (32, 32), (96, 160), (160, 96)])
def test_batched_newton_schulz_equals_per_matrix(shape):
    g = torch.Generator().manual_seed(3)
    stack = torch.randn((5, *shape), generator=g)
    got = fusedopt.muon.newton_schulz(stack, *NS)
    want = torch.stack([torch_ns(m, *NS) for m in stack])
    # Exact: the same bf16 ops in the same order; the batched GEMM computes each matrix's dot
    # products as the single GEMM does (measured bit-equal on this CPU's oneDNN bf16 path).
    assert_bits_equal(got, want)


def test_newton_schulz_against_fp64_reference():
    """The bf16 iteration stays near the same algorithm run in float64."""
    g = torch.Generator().manual_seed(4)
    stack = torch.randn((4, 48, 20), generator=g)
    got = fusedopt.muon.newton_schulz(stack, *NS).double()

    def reference(steps):
        a, b, c = NS[0]
        x = stack.double().mT  # rows > cols: the wide orientation, as torch
        x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
        for _ in range(steps):
            gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
        return x.mT

    want = reference(NS[1])
    rel = lambda x, y: ((x - y).norm() / y.norm()).item()  # noqa: E731
    err = rel(got, want)
    # Rounding the input to bf16 alone costs 0.17% (relative Frobenius); the quintic's slope
    # near zero (a = 3.4) amplifies the rounding of its 15 bf16 GEMMs: measured 1.3-1.8% over
    # seeds and shapes here. Bound 3%; one Newton-Schulz step fewer would be off by ~36%.
    assert err < 0.03, err
    assert rel(reference(NS[1] - 1), want) > 10 * err
    assert err > 0  # (bf16 was used: the fp64 reference is not reproduced bit for bit)


# ---- state dicts -----------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_state_dict_cross_loads(direction):
    first, second = (torch.optim.Muon, fusedopt.Muon) if direction == "torch_to_fusedopt" else (
        fusedopt.Muon, torch.optim.Muon)
    ref, got = make(), make()
    grads = grads_for(ref, 10)
    r = torch.optim.Muon(groups_of(ref), lr=0.02)
    train(r, ref, grads)
    a = first(groups_of(got), lr=0.02)
    train(a, got, grads[:5])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    b = second(groups_of(got), lr=0.02)
    b.load_state_dict(sd)
    train(b, got, grads[5:])
    for x, y in zip(got, ref):
        torch.testing.assert_close(x.detach(), y.detach(), **FP32)
        torch.testing.assert_close(b.state[x]["momentum_buffer"], r.state[y]["momentum_buffer"], **FP32)
    assert b.param_groups[1]["lr"] == 0.05 and b.param_groups[1]["momentum"] == 0.9


def test_default_state_dict_has_torch_keys_only():
    params = make()
    opt = fusedopt.Muon(params)
    train(opt, params, grads_for(params, 1))
    ref = torch.optim.Muon(make())
    sd = opt.state_dict()
    assert set(sd["param_groups"][0]) == set(ref.state_dict()["param_groups"][0])
    assert all(set(s) == {"momentum_buffer"} for s in sd["state"].values())


# ---- AdamW groups ----------------------------------------------------------------------------
def test_adamw_groups_match_torch_adamw():
    shapes = [(10,), (7, 5), (3,)]
    muon_ref, muon_got = make([(16, 8)]), make([(16, 8)])
    adam_ref, adam_got = make(shapes, seed=5), make(shapes, seed=5)
    own_ref, own_got = make([(6,)], seed=6), make([(6,)], seed=6)
    grads = grads_for(muon_ref + adam_ref + own_ref, 10)
    opt = fusedopt.Muon([dict(params=muon_got), dict(params=adam_got, use_muon=False, lr=3e-3),
                         dict(params=own_got, use_muon=False, lr=1e-2, betas=(0.8, 0.9), eps=1e-6,
                              weight_decay=0.0)], lr=0.02, weight_decay=0.1)
    assert opt.param_groups[1]["betas"] == (0.9, 0.95) and opt.param_groups[1]["eps"] == 1e-8
    train(opt, muon_got + adam_got + own_got, grads)
    ref_muon = torch.optim.Muon(muon_ref, lr=0.02, weight_decay=0.1)
    ref_adam = torch.optim.AdamW(adam_ref, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    ref_own = torch.optim.AdamW(own_ref, lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.0, foreach=False)
    for step_grads in grads:
        for p, g in zip(muon_ref + adam_ref + own_ref, step_grads):
            p.grad = g.clone()
        ref_muon.step(), ref_adam.step(), ref_own.step()
    for x, y in zip(muon_got, muon_ref):
        torch.testing.assert_close(x.detach(), y.detach(), **FP32)
    for ref_opt, got_params, ref_params in ((ref_adam, adam_got, adam_ref), (ref_own, own_got, own_ref)):
        for x, y in zip(got_params, ref_params):
            # fusedopt's AdamW kernel vs torch's for-loop: fp32, a few ulps from FMA and the
            # precomputed bias corrections (torch.testing's fp32 defaults).
            torch.testing.assert_close(x.detach(), y.detach())
            s, t = opt.state[x], ref_opt.state[y]
            assert set(s) == set(t) == {"step", "exp_avg", "exp_avg_sq"}
            assert s["step"].item() == t["step"].item() == 10
            torch.testing.assert_close(s["exp_avg"], t["exp_avg"])
            torch.testing.assert_close(s["exp_avg_sq"], t["exp_avg_sq"])


# ---- routing ---------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


class TinyGPT(nn.Module):
    def __init__(self, tied: bool, vocab=40, d=8, n_layer=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(12, d)
        self.h = nn.ModuleList(Block(d) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.frozen = nn.Linear(d, d)  # (before the head: the last nn.Linear is the output layer)
        self.frozen.requires_grad_(False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight
            self.value_head = nn.Linear(d, 1)  # after the tied head: the tied one is the output

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.h:
            x = x + b.proj(b.qkv(b.ln(x))[..., : x.shape[-1]])
            x = x + b.mlp(x)
        return self.lm_head(self.ln_f(x))


@pytest.mark.parametrize("tied", [True, False])
def test_muon_param_groups_routing(tied):
    model = TinyGPT(tied)
    groups = fusedopt.muon_param_groups(model, lr=0.02, weight_decay=0.05, adamw_lr=3e-3)
    muon = [p for g in groups if g.get("use_muon", True) for p in g["params"]]
    adamw = [p for g in groups if not g.get("use_muon", True) for p in g["params"]]
    hidden = [w for b in model.h for w in (b.qkv.weight, b.proj.weight, b.mlp[0].weight, b.mlp[2].weight)]
    if tied:  # the tied lm_head is the output layer, so a later Linear is a hidden matrix
        hidden.append(model.value_head.weight)
    assert [id(p) for p in muon] == [id(p) for p in hidden]
    expected_adamw = {id(p) for p in model.parameters() if p.requires_grad} - {id(p) for p in hidden}
    assert {id(p) for p in adamw} == expected_adamw and len(adamw) == len(expected_adamw)
    assert id(model.lm_head.weight) in {id(p) for p in adamw}
    assert all(g["lr"] == (0.02 if g.get("use_muon", True) else 3e-3) for g in groups)
    assert all(g["weight_decay"] == 0.05 for g in groups)
    opt = fusedopt.Muon(groups)
    model(torch.randint(0, 40, (2, 12))).pow(2).mean().backward()
    opt.step()  # the whole model trains with one optimizer


def test_muon_param_groups_conv_and_defaults():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 4))
    groups = fusedopt.muon_param_groups(model, lr=0.01)
    by_kind = {(g.get("use_muon", True), g.get("shape_mode")): g["params"] for g in groups}
    assert by_kind[(True, "flatten")] == [model[0].weight]
    assert by_kind[(True, None)] == [model[3].weight]  # model[4] is the (last Linear) head
    assert [id(p) for p in by_kind[(False, None)]] == [id(p) for p in
                                                       (model[0].bias, model[3].bias, model[4].weight, model[4].bias)]
    assert all(g["lr"] == 0.01 and g["weight_decay"] == 0.1 for g in groups)


# ---- shape modes -----------------------------------------------------------------------------
def reference_step(params, grads, bufs, lr, wd, momentum, matrices, adjust):
    """Per param, per matrix: torch's Muon math written out, with torch's single-matrix NS."""
    for p, g, buf in zip(params, grads, bufs):
        buf.lerp_(g, 1 - momentum)
        update = g.lerp(buf, momentum)
        mats = matrices(update)
        ortho = torch.stack([torch_ns(m, *NS) for m in mats]).reshape(p.shape)
        rows, cols = mats.shape[-2:]
        p.mul_(1 - lr * wd)
        p.add_(ortho.to(p.dtype), alpha=-lr * adjust(rows, cols))


@pytest.mark.parametrize("mode", ["flatten", "batch"])
def test_shape_modes_against_per_matrix_reference(mode):
    shapes = [(6, 3, 3, 3), (4, 2, 5, 5), (6, 3, 3, 3)] if mode == "flatten" else [(3, 8, 5), (2, 5, 8), (3, 8, 5)]
    got, ref = make(shapes), make(shapes)
    plain_got, plain_ref = make([(9, 7)], seed=9), make([(9, 7)], seed=9)
    grads = grads_for(ref + plain_ref, 10)
    opt = fusedopt.Muon([dict(params=got, shape_mode=mode), dict(params=plain_got)], lr=0.02,
                        adjust_lr_fn="match_rms_adamw")
    train(opt, got + plain_got, grads)
    if mode == "flatten":
        matrices = lambda u: u.reshape(1, u.shape[0], -1)  # noqa: E731
    else:
        matrices = lambda u: u.reshape(-1, *u.shape[-2:])  # noqa: E731
    adjust = lambda r, c: 0.2 * math.sqrt(max(r, c))  # noqa: E731
    bufs = [torch.zeros_like(p) for p in ref + plain_ref]
    with torch.no_grad():
        for step_grads in grads:
            reference_step(ref + plain_ref, step_grads, bufs, 0.02, 0.1, 0.95, matrices, adjust)
    for x, y in zip(got + plain_got, ref + plain_ref):
        torch.testing.assert_close(x.detach(), y.detach(), **FP32)
    assert opt.state[got[0]]["momentum_buffer"].shape == got[0].shape


def test_non_2d_params_rejected_in_plain_muon_groups():
    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters whereas we found a parameter with size"):
        fusedopt.Muon([nn.Parameter(torch.zeros(2, 3, 4))])
    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters"):
        fusedopt.Muon([nn.Parameter(torch.zeros(5))])
    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters"):
        fusedopt.Muon([dict(params=[nn.Parameter(torch.zeros(5))], shape_mode="flatten")])
    with pytest.raises(ValueError, match="shape_mode"):
        fusedopt.Muon([dict(params=[nn.Parameter(torch.zeros(2, 3, 4))], shape_mode="stack")])
    fusedopt.Muon([dict(params=[nn.Parameter(torch.zeros(5))], use_muon=False)])  # AdamW takes any shape


# ---- AMP, clipping, grads --------------------------------------------------------------------
def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy({id(p): dict(s) for p, s in opt.state.items()})


def assert_unchanged(opt, params, snap):
    for p, q in zip(params, snap[0]):
        assert_bits_equal(p.detach(), q)
    assert {id(p) for p in opt.state} == set(snap[1])
    for p, s in opt.state.items():
        assert set(s) == set(snap[1][id(p)])
        for k, v in s.items():
            assert_bits_equal(v, snap[1][id(p)][k])


@pytest.mark.parametrize("with_adamw", [False, True])
def test_found_inf_skips_everything(with_adamw):
    params = make() + (make([(5,)], seed=7) if with_adamw else [])
    groups = [dict(params=params[:5])] + ([dict(params=params[5:], use_muon=False)] if with_adamw else [])
    opt = fusedopt.Muon(groups, lr=0.02, max_grad_norm=1.0)
    grads = grads_for(params, 3)
    train(opt, params, grads[:2])
    snap = snapshot(opt, params)
    for p, g in zip(params, grads[2]):
        p.grad = g.clone()
    params[0].grad[0, 0] = float("inf")
    params[-1].grad[0] = float("nan")
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()
    assert_unchanged(opt, params, snap)
    opt.found_inf = torch.tensor(0.0)
    for p, g in zip(params, grads[2]):
        p.grad = g.clone()
    opt.step()
    assert (params[0] - snap[0][0]).abs().max() > 0  # a real step moves again


@pytest.mark.parametrize("precision", [dict(stochastic_rounding=True, seed=1), dict(kahan_summation=True),
                                       dict(master_weights=True)])
def test_found_inf_skips_precision_paths(precision):
    params = make(dtype=torch.bfloat16)
    opt = fusedopt.Muon(params, lr=0.02, **precision)
    grads = grads_for(params, 2)
    train(opt, params, grads[:1])
    snap = snapshot(opt, params)
    for p, g in zip(params, grads[1]):
        p.grad = g.clone()
    params[1].grad[0, 0] = float("inf")
    opt.grad_scale, opt.found_inf = None, torch.tensor(2.0)  # GradScaler sums over devices
    opt.step()
    assert_unchanged(opt, params, snap)  # params, momentum, SR step / Kahan comp / master


def test_grad_scaler_matches_unscaled_reference_and_leaves_grads():
    ref, got = make(), make()
    grads = grads_for(ref, 4)
    r = torch.optim.Muon(ref, lr=0.02)
    train(r, ref, grads)
    f = fusedopt.Muon(got, lr=0.02)
    for step_grads in grads:
        for p, g in zip(got, step_grads):
            p.grad = g * 1024.0  # what GradScaler's scaled backward leaves (exact: a power of 2)
        kept = [p.grad.clone() for p in got]
        f.grad_scale, f.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        f.step()
        for p, k in zip(got, kept):
            assert_bits_equal(p.grad, k)  # never written, not even unscaled
    for x, y in zip(got, ref):
        torch.testing.assert_close(x.detach(), y.detach(), **FP32)


def test_clipping_equals_clip_grad_norm_then_reference():
    shapes = [(7,), (5, 3)]
    ref, got = make(), make()
    ref_a, got_a = make(shapes, seed=8), make(shapes, seed=8)
    grads = grads_for(ref + ref_a, 6, seed=2)
    opt = fusedopt.Muon([dict(params=got), dict(params=got_a, use_muon=False)], lr=0.02, max_grad_norm=2.0)
    r_m = torch.optim.Muon(ref, lr=0.02)
    r_a = torch.optim.AdamW(ref_a, lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for step_grads in grads:
        for p, g in zip(got + got_a, step_grads):
            p.grad = g.clone()
        kept = [g.clone() for g in step_grads]
        opt.step()
        for p, g in zip(ref + ref_a, step_grads):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref + ref_a, 2.0, foreach=True)
        r_m.step(), r_a.step()
        # Same fp32 arithmetic as clip_grad_norm_ (norm of per-tensor norms); the sums may be
        # vectorised differently: a few ulps.
        torch.testing.assert_close(opt.last_grad_norm, norm)
        for p, k in zip(got + got_a, kept):
            assert_bits_equal(p.grad, k)
    assert norm > 2.0 * 5  # clipping was active
    # The clip factor may differ by an ulp (see above); NS of a scaled input is scale-free up
    # to bf16 rounding of the normalised matrix, so allow one bf16 flip of lr * O per step.
    for x, y in zip(got + got_a, ref + ref_a):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-5, atol=1e-4)


# ---- precision paths -------------------------------------------------------------------------
def test_master_weights_match_fp32_muon_rounded():
    got = make(dtype=torch.bfloat16)
    ref = [nn.Parameter(p.detach().float()) for p in got]
    grads = grads_for(got, 8)
    opt = fusedopt.Muon(got, lr=0.02, master_weights=True)
    train(opt, got, grads)
    r = torch.optim.Muon(ref, lr=0.02)
    train(r, ref, [[g.float() for g in gs] for gs in grads])
    for x, y in zip(got, ref):
        assert opt.state[x]["master_param"].dtype == torch.float32
        torch.testing.assert_close(opt.state[x]["master_param"], y.detach(), **FP32)
        assert_bits_equal(x.detach(), y.detach().bfloat16())  # rounded to nearest once per step
    # The fp32 master survives a reload (torch's loader would cast it to bf16).
    again = fusedopt.Muon(got, lr=0.02, master_weights=True)
    again.load_state_dict(opt.state_dict())
    assert again.state[got[0]]["master_param"].dtype == torch.float32


def test_master_weights_in_adamw_groups():
    got = make([(6,), (4, 3)], dtype=torch.bfloat16, seed=2)
    ref = [nn.Parameter(p.detach().float()) for p in got]
    grads = grads_for(got, 6)
    opt = fusedopt.Muon([dict(params=got, use_muon=False)], lr=0.01, master_weights=True)
    train(opt, got, grads)
    r = torch.optim.AdamW(ref, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    train(r, ref, [[g.float() for g in gs] for gs in grads])
    for x, y in zip(got, ref):
        s = opt.state[x]
        assert s["master_param"].dtype == s["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(s["master_param"], y.detach())  # fp32 kernel vs torch: a few ulps
        assert_close(x.detach(), y.detach().bfloat16(), msg="bf16 param = master rounded")
    with pytest.raises(ValueError, match="stochastic_rounding=True is not supported in use_muon=False"):
        fusedopt.Muon([dict(params=got, use_muon=False)], stochastic_rounding=True)


def test_one_batched_matmul_per_shape_group_and_iteration(monkeypatch):
    calls = {"bmm": 0, "baddbmm": 0}
    for name in calls:
        original = getattr(torch, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, counted)
    params = make([(24, 8)] * 6 + [(8, 24)] * 5 + [(16, 16)] * 4)
    opt = fusedopt.Muon(params, ns_steps=5)
    train(opt, params, grads_for(params, 1))
    # 3 shape groups x 5 iterations: one bmm and two baddbmm each, whatever the param count.
    assert calls == {"bmm": 15, "baddbmm": 30}


@pytest.mark.parametrize("budget, per_step", [(10 ** 9, [2, 1, 1, 1]), (200, [1, 1, 1, 1, 1])])
def test_cpu_cache_sized_batches_give_the_same_bits(monkeypatch, budget, per_step):
    # Shape groups: two 24x8 (192 elements each), 8x24, 16x16, 12x20. A 200-element budget
    # splits the 24x8 pair into two batches; a batch always takes at least one param.
    ref, got = make(), make()
    grads = grads_for(ref, 4)
    train(torch.optim.Muon(groups_of(ref), lr=0.02), ref, grads)
    monkeypatch.setattr(fusedopt.muon, "CPU_BATCH_ELEMENTS", budget)
    sizes = []
    original = fusedopt.muon.newton_schulz
    monkeypatch.setattr(fusedopt.muon, "newton_schulz", lambda x, *a: sizes.append(x.shape[0]) or original(x, *a))
    train(fusedopt.Muon(groups_of(got), lr=0.02), got, grads)
    assert sizes == per_step * 4
    for a, b in zip(got, ref):
        assert_bits_equal(a.detach(), b.detach())


def test_newton_schulz_workspace_gives_the_same_bits_and_the_input_orientation():
    # With a workspace the CPU path runs in its kept buffers (a tall stack's memory reused
    # wide after the first iteration): the bits of a fresh call, in x's orientation.
    g = torch.Generator().manual_seed(5)
    for shape in [(40, 12), (12, 40), (16, 16)]:
        stack = torch.randn((3, *shape), generator=g)
        fresh = fusedopt.muon.newton_schulz(stack, *NS)
        assert fresh.shape == stack.shape and fresh.dtype == torch.bfloat16
        assert_bits_equal(fresh, torch.stack([torch_ns(m, *NS) for m in stack]))
        ws = fusedopt.muon._Workspace(3, *shape, "cpu")
        for _ in range(2):  # a used workspace (its buffers hold the last call's values)
            ws.stack.copy_(stack)
            out = fusedopt.muon.newton_schulz(ws.stack, *NS, ws)
            assert_bits_equal(out, fresh)
        assert_bits_equal(fusedopt.muon.newton_schulz(stack, *NS, ws), fresh)  # x copied in


def test_cpu_workspaces_follow_the_params_that_have_grads():
    # The kept Newton-Schulz buffers are per (device, batch shape); steps where the set of
    # params with grads changes (other batch sizes and shapes), where bf16 and fp32 groups
    # share a matrix shape, or where several batches of one shape reuse one workspace in a
    # step, must all give torch.optim.Muon's results; unused workspaces are dropped and none
    # reaches the state dict.
    def build(seed):
        fp32 = make([(24, 8)] * 3 + [(8, 24), (16, 16)], seed=seed)
        bf16 = make([(24, 8), (16, 16)], dtype=torch.bfloat16, seed=seed + 1)
        return fp32 + bf16

    ref, got = build(0), build(0)
    r = torch.optim.Muon([dict(params=ref[:5]), dict(params=ref[5:], lr=0.05)], lr=0.02)
    f = fusedopt.Muon([dict(params=got[:5]), dict(params=got[5:], lr=0.05)], lr=0.02)
    g = torch.Generator().manual_seed(7)
    masks = [[1] * 7, [1, 0, 1, 0, 1, 1, 0], [0, 1, 0, 1, 0, 0, 1], [1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    for step, mask in enumerate(masks):
        for a, b, on in zip(ref, got, mask):
            grad = torch.randn(a.shape, generator=g).to(a.dtype) if on else None
            a.grad, b.grad = grad, None if grad is None else grad.clone()
        r.step()
        f.step()
        used = {(count, rows, cols) for (_, count, rows, cols) in f._workspaces}
        fp32_rows = sum(mask[:3])
        expected = ({(fp32_rows, 24, 8)} if fp32_rows else set()) | ({(1, 24, 8)} if mask[5] else set())
        assert {k for k in used if k[1:] == (24, 8)} == expected, (step, used)
        for a, b in zip(got, ref):
            if a.dtype == torch.float32:
                torch.testing.assert_close(a.detach(), b.detach(), **FP32)
            else:
                assert_close(a.detach(), b.detach(), msg="bf16 param")
    assert all(set(s) == {"momentum_buffer"} for s in f.state_dict()["state"].values())


def test_cpu_batches_of_one_shape_share_a_workspace(monkeypatch):
    # A 200-element budget cuts six 24x8 params into six batches of one: one kept workspace
    # serves them all, one after the other, and the results are torch's bit for bit.
    ref, got = make([(24, 8)] * 6), make([(24, 8)] * 6)
    grads = grads_for(ref, 3)
    train(torch.optim.Muon(ref, lr=0.02), ref, grads)
    monkeypatch.setattr(fusedopt.muon, "CPU_BATCH_ELEMENTS", 200)
    f = fusedopt.Muon(got, lr=0.02)
    train(f, got, grads)
    assert list(f._workspaces) == [(torch.device("cpu"), 1, 24, 8)]
    for a, b in zip(got, ref):
        assert_bits_equal(a.detach(), b.detach())


def test_kahan_summation_against_reference():
    got = make(dtype=torch.bfloat16)
    ref = [p.detach().clone() for p in got]
    grads = grads_for(got, 8)
    lr, wd, mu = 0.002, 0.1, 0.95  # updates near the bf16 spacing: the compensation matters
    opt = fusedopt.Muon(got, lr=lr, weight_decay=wd, momentum=mu, kahan_summation=True)
    train(opt, got, grads)
    # Reference written here: torch's Muon math on bf16 params and buffers, the update made in
    # fp32 from the param's value, then precision.h's store_kahan.
    comps = [torch.zeros_like(p) for p in ref]
    bufs = [torch.zeros_like(p) for p in ref]
    for step_grads in grads:
        for p, c, buf, g in zip(ref, comps, bufs, step_grads):
            buf.lerp_(g, 1 - mu)
            ortho = torch_ns(g.lerp(buf, mu), *NS)
            old = p.float()
            updated = old * torch.tensor(1 - lr * wd)
            updated.add_(ortho, alpha=-lr * max(1, p.shape[0] / p.shape[1]) ** 0.5)
            delta = (updated - old) + c.float()
            p.copy_(old + delta)
            c.copy_(delta - (p.float() - old))
    for x, y, c in zip(got, ref, comps):
        # The same fp32 ops in the same order as the reference: equal bits.
        assert_bits_equal(x.detach(), y)
        assert_bits_equal(opt.state[x]["kahan_comp"], c)
    assert any(c.abs().max() > 0 for c in comps)


def test_stochastic_rounding_is_deterministic_and_resumes():
    def run(seed, split=None):
        params = make(dtype=torch.bfloat16)
        grads = grads_for(params, 6)
        opt = fusedopt.Muon(params, lr=0.02, stochastic_rounding=True, seed=seed)
        if split is None:
            train(opt, params, grads)
            return params
        train(opt, params, grads[:split])
        sd = copy.deepcopy(opt.state_dict())
        opt = fusedopt.Muon(params, lr=0.02, stochastic_rounding=True, seed=seed + 1)
        opt.load_state_dict(sd)  # the seed travels in the group
        train(opt, params, grads[split:])
        return params

    a, b, c, d = run(3), run(3), run(4), run(3, split=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, d))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_stochastic_rounding_is_unbiased():
    n = 20000
    ulp = 2.0 ** -7  # bf16 spacing in [1, 2)
    work = torch.full((n,), 1.0 + 0.25 * ulp)
    out = torch.empty(n, dtype=torch.bfloat16)
    fusedopt.muon._stochastic_round_into([out], [work], [11], [0], [torch.tensor(1.0)])
    values = set(out.float().unique().tolist())
    assert values == {1.0, 1.0 + ulp}
    up = (out.float() > 1.0).double().mean().item()
    # Binomial(20000, 0.25): standard deviation 0.003; 5 of them.
    assert abs(up - 0.25) < 0.015, up


def test_track_stats_against_reference():
    params = make()
    grads = grads_for(params, 2)
    opt = fusedopt.Muon(groups_of(params), lr=0.02, track_stats=True)
    train(opt, params, grads[:1])
    before = [p.detach().clone() for p in params]
    train(opt, params, grads[1:])
    stats = opt.stats()
    for group, s in zip(opt.param_groups, stats):
        idx = [i for i, p in enumerate(params) if any(p is q for q in group["params"])]
        norm = lambda ts: torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in ts]))  # noqa: E731
        torch.testing.assert_close(s["grad_norm"], norm([grads[1][i] for i in idx]))
        torch.testing.assert_close(s["param_norm"], norm([params[i].detach() for i in idx]))
        ratio = norm([params[i].detach() - before[i] for i in idx]) / norm([before[i] for i in idx])
        torch.testing.assert_close(s["update_ratio"], ratio)


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "Learning rate should be >= 0 but is: -1.0"),
    (dict(momentum=-0.1), "momentum should be >= 0 but is: -0.1"),
    (dict(weight_decay=-0.5), "weight decay should be >= 0 but is: -0.5"),
    (dict(adjust_lr_fn="sqrt"), "Adjust learning rate function sqrt is not supported"),
    (dict(ns_steps=100), "Number of steps must be less than 100 for computational efficiency"),
    (dict(ns_coefficients=(1.0, 2.0)), "Coefficients must be a tuple of exactly 3 values"),
    (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
    (dict(state_dtype=torch.bfloat16), "state_dtype is not supported"),
    (dict(kahan_summation=True), "kahan_summation=True needs bfloat16 params"),
    (dict(kahan_summation=True, master_weights=True), "master_weights and kahan_summation are mutually exclusive"),
    (dict(master_weights=True), "master_weights=True needs bfloat16 or float16 params"),
    (dict(max_grad_norm=-1.0), "Invalid max_grad_norm value"),
])
def test_bad_hyperparameters_raise_with_torch_wording(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        fusedopt.Muon(make(), **kwargs)
    if message.startswith(("Learning", "momentum", "weight decay", "Adjust", "Tensor")):
        with pytest.raises(ValueError) as torch_error:  # the reference says the same
            torch.optim.Muon(make(), **kwargs)
        assert str(torch_error.value) == message


def test_bad_adamw_group_and_unknown_keyword():
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 1.0"):
        fusedopt.Muon([dict(params=make([(4,)]), use_muon=False, betas=(0.9, 1.0))])
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        fusedopt.Muon(make(), foo=1)


def test_failed_step_changes_nothing():
    params = make() + make([(6,)], seed=3)
    opt = fusedopt.Muon([dict(params=params[:5]), dict(params=params[5:], use_muon=False)], lr=0.02)
    grads = grads_for(params, 2)
    train(opt, params, grads[:1])
    fresh = nn.Parameter(torch.randn(4, 4))
    opt.add_param_group(dict(params=[fresh]))  # no state yet: must not get any from a failed step
    snap = snapshot(opt, params + [fresh])
    for p, g in zip(params, grads[1]):
        p.grad = g.clone()
    fresh.grad = torch.randn(4, 4)
    params[5].grad = params[5].grad.to_sparse()  # the last param is bad
    with pytest.raises(RuntimeError, match=r"param 0 of group 1 \(shape \(6,\).*sparse"):
        opt.step()
    assert_unchanged(opt, params + [fresh], snap)
    assert fresh not in opt.state
    params[5].grad = grads[1][5].clone()
    opt.state[params[0]]["momentum_buffer"] = torch.zeros(3, 3)  # a state that does not fit
    snap = snapshot(opt, params + [fresh])
    with pytest.raises(ValueError, match="momentum_buffer"):
        opt.step()
    assert_unchanged(opt, params + [fresh], snap)
