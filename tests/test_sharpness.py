"""fusedopt.sharpness against dense Hessians, quadratics with known spectra and double
backprop (``create_graph=True``), all computed here in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import fusedopt
from conftest import assert_bits_equal
from fusedopt.sharpness import (frozen_batchnorm, hessian_trace, penalized_backward, preconditioned_sharpness,
                                top_hessian_eigenvalue)

F64 = torch.float64


def tiny_mlp(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 4), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(4, 2)]
    return nn.Sequential(*layers).to(F64)


def batch(n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=F64), torch.randint(0, 2, (n,), generator=g)


def loss_of(model, x, y):
    return lambda: nn.functional.cross_entropy(model(x), y)


def dense_hessian(model, x, y) -> np.ndarray:
    """The full Hessian of the loss in the params' flat order (torch.autograd.functional)."""
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def f(w):
        out, i = {}, 0
        for (name, _), s in zip(model.named_parameters(), shapes):
            n = math.prod(s)
            out[name] = w[i:i + n].view(s)
            i += n
        return nn.functional.cross_entropy(torch.func.functional_call(model, out, (x,)), y)

    return torch.autograd.functional.hessian(f, flat).double().numpy()


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double().numpy()


def quadratic(eigs, seed=0, split=(3,)):
    """L(w) = 0.5 w^T A w with A = Q diag(eigs) Q^T, w split into several params."""
    n = len(eigs)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    a = q @ torch.diag(torch.tensor(eigs, dtype=F64)) @ q.T
    w = torch.randn(n, generator=g, dtype=F64)
    cuts = [0, *split, n]
    params = [nn.Parameter(w[cuts[i]:cuts[i + 1]].clone()) for i in range(len(cuts) - 1)]

    def loss():
        v = torch.cat(params)
        return 0.5 * v @ a @ v

    return params, loss, a, q


# ---- penalized_backward ----------------------------------------------------------------------
def exact_penalized_grads(model, micro, penalty):
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    sq = 0.0
    for x, y in micro:
        loss = nn.functional.cross_entropy(model(x), y)
        g = torch.autograd.grad(loss, params, create_graph=True)
        pen = sum(gi.square().sum() for gi in g)
        sq += pen.item()
        full = torch.autograd.grad(loss + penalty * pen, params)
        total = [t + f / len(micro) for t, f in zip(total, full)]
    return total, sq / len(micro)


def test_penalty_matches_double_backprop_with_error_shrinking_in_r():
    model = tiny_mlp()
    xs, ys = batch(24)
    micro = [(xs[i:i + 8], ys[i:i + 8]) for i in range(0, 24, 8)]
    penalty = 0.5
    exact, exact_sq = exact_penalized_grads(model, micro, penalty)
    w = [p.detach().clone() for p in model.parameters()]
    g0 = [torch.randn_like(p) for p in model.parameters()]  # existing grads are added to
    errors = []
    for r in (1e-1, 1e-2, 1e-3):
        for p, g in zip(model.parameters(), g0):
            p.grad = g.clone()
        mean_sq = penalized_backward(model.parameters(), [loss_of(model, x, y) for x, y in micro], penalty, r=r)
        for p, w0 in zip(model.parameters(), w):
            assert_bits_equal(p.detach(), w0)  # restored exactly
        assert mean_sq.dim() == 0 and mean_sq.item() == pytest.approx(exact_sq, rel=1e-12)  # fp64 sums
        got = np.concatenate([(p.grad - g).reshape(-1).numpy() for p, g in zip(model.parameters(), g0)])
        errors.append(np.linalg.norm(got - flat(exact)) / np.linalg.norm(flat(exact)))
    # A forward difference is O(r): 10x smaller r, about 10x smaller error (fp64 rounding,
    # ~1e-16 / r, is far below); allow a factor 5 per decade. And it is accurate at r=1e-3.
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5, errors
    assert errors[2] < 1e-3, errors


def test_penalty_zero_is_the_plain_mean_grad_and_none_grads_are_set():
    model = tiny_mlp()
    xs, ys = batch(16)
    micro = [(xs[:8], ys[:8]), (xs[8:], ys[8:])]
    penalized_backward(model.parameters(), [loss_of(model, x, y) for x, y in micro], 0.0)
    expected = torch.autograd.grad(nn.functional.cross_entropy(model(xs), ys), list(model.parameters()))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)  # mean of equal-size micro-batch means: fp64 rounding


# ---- eigenvalues -----------------------------------------------------------------------------
@pytest.mark.parametrize("eigs", [
    [4.0, 2.0, -1.0, 0.5, 0.1, -0.2, 0.0],
    [-5.0, 3.0, 1.0, 0.5, -2.0, 0.25],  # the largest magnitude is negative
])
def test_top_eigenvalue_of_quadratics_with_known_spectra(eigs):
    params, loss, _, q = quadratic(eigs)
    eig, vec = top_hessian_eigenvalue(loss, params, iters=500, tol=1e-12)
    top = max(eigs, key=abs)
    assert eig == pytest.approx(top, rel=1e-8)  # gap |l2/l1| <= 0.6: converges to fp64 level
    i = eigs.index(top)
    v = np.concatenate([t.numpy() for t in vec])
    assert len(vec) == len(params) and [t.shape for t in vec] == [p.shape for p in params]
    assert np.linalg.norm(v) == pytest.approx(1.0, rel=1e-10)
    assert abs(v @ q[:, i].numpy()) == pytest.approx(1.0, abs=1e-6)  # vector error ~ sqrt(value error)


def test_top_eigenvalue_of_a_small_model_matches_the_dense_hessian():
    model = tiny_mlp()
    x, y = batch()
    h = dense_hessian(model, x, y)
    vals, vecs = np.linalg.eigh(h)
    top = vals[np.argmax(np.abs(vals))]
    eig, vec = top_hessian_eigenvalue(loss_of(model, x, y), model.parameters(), iters=2000, tol=1e-12)
    assert eig == pytest.approx(top, rel=1e-6)
    v = flat(vec)
    assert np.linalg.norm(h @ v - eig * v) < 1e-3 * abs(eig)  # it is an eigenvector


def test_hessian_trace_within_the_hutchinson_bound():
    model = tiny_mlp()
    x, y = batch()
    h = dense_hessian(model, x, y)
    samples = 200
    est = hessian_trace(loss_of(model, x, y), model.parameters(), samples=samples, seed=3)
    # Rademacher z: Var(z^T H z) = 2 * sum_{i != j} H_ij^2; 5 standard errors of the mean
    # (a deterministic seed; a wrong estimator, e.g. Gaussian scaling or a missing 1/n, is off
    # by far more).
    var = 2 * (np.sum(h ** 2) - np.sum(np.diag(h) ** 2))
    assert abs(est - np.trace(h)) <= 5 * math.sqrt(var / samples)
    # A diagonal Hessian has no off-diagonal terms: Hutchinson with Rademacher z is then exact.
    d = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=F64)
    w = nn.Parameter(torch.randn(4, dtype=F64))
    assert hessian_trace(lambda: 0.5 * (d * w * w).sum(), [w], samples=3) == pytest.approx(4.5, rel=1e-12)


# ---- preconditioned sharpness ----------------------------------------------------------------
# (fusedopt takes fp32 params: there the HVPs are fp32, a relative error of ~1e-6 per product
# compounding over the iterations, so 1e-4 relative; fp64 agrees to 1e-7.)
@pytest.mark.parametrize("make_opt,dtype,rel", [
    (lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False), F64, 1e-7),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.99), amsgrad=True, foreach=False), F64, 1e-7),
    (lambda ps: fusedopt.AdamW(ps, lr=1e-2, eps=1e-3), torch.float32, 1e-4),
], ids=["torch.Adam", "torch.AdamW-amsgrad", "fusedopt.AdamW"])
def test_preconditioned_sharpness_matches_dense_eig(make_opt, dtype, rel):
    model = tiny_mlp().to(dtype)
    x, y = batch()
    x = x.to(dtype)
    opt = make_opt(model.parameters())
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    h = dense_hessian(model, x, y)
    group = opt.param_groups[0]
    key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
    bc = 1 - group["betas"][1] ** 3
    p_diag = np.concatenate([(np.sqrt(opt.state[p][key].double().numpy() / bc) + group["eps"]).reshape(-1)
                             for p in model.parameters()])
    vals = np.linalg.eigvals(h / p_diag[:, None])  # P^-1 H, not symmetric
    top = vals[np.argmax(np.abs(vals))].real
    state_before = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    got = preconditioned_sharpness(loss_of(model, x, y), opt, iters=3000, tol=1e-12)
    assert got == pytest.approx(top, rel=rel)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert_bits_equal(v, state_before[p][k])


def test_preconditioned_sharpness_needs_adam_state():
    model = tiny_mlp()
    x, y = batch()
    with pytest.raises(ValueError, match="exp_avg_sq"):
        preconditioned_sharpness(loss_of(model, x, y), torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="Adam"):
        preconditioned_sharpness(loss_of(model, x, y), torch.optim.SGD(model.parameters(), lr=0.1))


# ---- leaving things as found, determinism ----------------------------------------------------
def test_probes_leave_params_grads_state_mode_and_rng_as_found_and_are_deterministic():
    model = tiny_mlp(dropout=0.3)  # train mode, dropout: the probes must not switch it off
    x, y = batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=False)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    grads = [p.grad.clone() for p in model.parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    state = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    probes = {
        "eig": lambda s: top_hessian_eigenvalue(loss_of(model, x, y), model.parameters(), iters=20, seed=s)[0],
        "trace": lambda s: hessian_trace(loss_of(model, x, y), model.parameters(), samples=5, seed=s),
        "precond": lambda s: preconditioned_sharpness(loss_of(model, x, y), opt, iters=20, seed=s),
    }
    for name, probe in probes.items():
        results = []
        for global_seed in (1, 2):
            torch.manual_seed(global_seed)
            rng = torch.get_rng_state()
            results.append(probe(7))
            assert torch.equal(torch.get_rng_state(), rng), name  # global RNG untouched
        assert results[0] == results[1], name  # same seed, any global RNG state: same result
        assert probe(8) != results[0], name     # the seed matters (random start / probes)
        assert model.training and all(m.training for m in model.modules()), name
        for p, g, w0 in zip(model.parameters(), grads, w):
            assert_bits_equal(p.grad, g)
            assert_bits_equal(p.detach(), w0)
        for p, s in opt.state.items():
            for k, v in s.items():
                assert_bits_equal(v, state[p][k])


# ---- frozen_batchnorm ------------------------------------------------------------------------
def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2), nn.BatchNorm1d(2, momentum=None))


def test_frozen_batchnorm_keeps_running_stats_and_normalises_with_batch_stats():
    model = bn_model()
    x = torch.randn(16, 3)
    model(x)  # running stats away from their init
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with frozen_batchnorm(model):
        out = model(x)
        assert model[1].momentum == 0.0 and model.training
    for k, v in model.named_buffers():
        assert_bits_equal(v, buffers[k])
    # batch statistics were used: the same as a plain train-mode forward of a copy
    import copy
    ref = copy.deepcopy(model)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    assert model[1].momentum == 0.1 and model[4].momentum is None
    model(x)  # and outside the block the stats update again
    assert not torch.equal(model[1].running_mean, buffers["1.running_mean"])


def test_frozen_batchnorm_restores_momentum_when_the_body_raises():
    model = bn_model()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(RuntimeError, match="boom"):
        with frozen_batchnorm(model):
            model(torch.randn(8, 3))
            raise RuntimeError("boom")
    assert model[1].momentum == 0.1 and model[4].momentum is None
    for k, v in model.named_buffers():
        assert_bits_equal(v, buffers[k])


def test_frozen_batchnorm_with_sam_second_pass():
    model = bn_model()
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    opt = fusedopt.SAM(model.parameters(), fusedopt.SGD, lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    after_first = {k: v.clone() for k, v in model.named_buffers()}
    opt.first_step(zero_grad=True)
    with frozen_batchnorm(model):
        nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    for k, v in model.named_buffers():
        assert_bits_equal(v, after_first[k])  # only the first pass updated the stats


# ---- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("call,word", [
    (lambda m, f: top_hessian_eigenvalue(f, m.parameters(), iters=0), "iters"),
    (lambda m, f: top_hessian_eigenvalue(f, m.parameters(), tol=-1.0), "tol"),
    (lambda m, f: top_hessian_eigenvalue(f, []), "params"),
    (lambda m, f: hessian_trace(f, m.parameters(), samples=0), "samples"),
    (lambda m, f: penalized_backward(m.parameters(), [f], penalty=-1.0), "penalty"),
    (lambda m, f: penalized_backward(m.parameters(), [f], penalty=1.0, r=0.0), "r value"),
    (lambda m, f: penalized_backward(m.parameters(), [], penalty=1.0), "micro_batch_losses"),
    (lambda m, f: penalized_backward([torch.zeros(3)], [f], penalty=1.0), "params"),
    (lambda m, f: preconditioned_sharpness(f, m, iters=5), "optimizer"),
    (lambda m, f: frozen_batchnorm([m]).__enter__(), "module"),
])
def test_bad_input_raises_value_error_naming_it(call, word):
    model = tiny_mlp()
    x, y = batch()
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=word):
        call(model, loss_of(model, x, y))
    for p, w0 in zip(model.parameters(), w):
        assert_bits_equal(p.detach(), w0)
        assert p.grad is None


# ---- the large-batch demo (a few steps; the measured run is docs/demo/large_batch.json) -------
def test_large_batch_demo_runs_and_writes_its_curves(tmp_path):
    pytest.importorskip("sklearn", reason="the large-batch demo's data set is scikit-learn's digits")
    import json

    from fusedopt.demo.__main__ import main as demo_main
    argv = ["--experiment", "large-batch", "--steps", "4", "--eval-every", "2", "--train-size", "256",
            "--large-batch", "128", "--hidden", "16", "--eig-iters", "3", "--no-plot", "--out", str(tmp_path)]
    assert demo_main(argv) == 0
    doc = json.loads((tmp_path / "large_batch.json").read_text())
    assert [r["name"] for r in doc["runs"]] == ["sgd-small", "sgd-large", "penalty-large", "sam-large"]
    assert doc["config"]["penalty"] == pytest.approx(doc["config"]["lr"] / 4)
    for r in doc["runs"]:
        assert r["curves"]["step"] == [0, 2, 4]
        assert all(0.0 <= a <= 1.0 for a in r["curves"]["test_acc"])
        assert all(math.isfinite(v) for v in r["curves"]["lambda_max"])
        assert r["curves"]["train_loss"][-1] < r["curves"]["train_loss"][0]  # every run trains
    assert doc["runs"][0]["batch"] == 32 and doc["runs"][1]["batch"] == 128
    assert doc["runs"][2]["curves"]["penalty"][-1] > 0
