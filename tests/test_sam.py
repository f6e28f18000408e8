"""fusedopt.SAM against pytorch_optimizer.SAM (davda54's math) and against references written
here (the alpha mix, the exact restore, grad=None params)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fusedopt
from conftest import assert_bits_equal

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

STEPS = 5
# Both sides do the same fp32 math per step except the order of the global-norm reduction
# (sum of squared norms vs norm of the stacked norms) and addcmul vs mul-then-add for
# p + scale * g: a few ulps per step. A wrong rho, norm or restore moves params by >= 1e-3.
TOL = dict(rtol=1e-5, atol=1e-6)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4))


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)


def two_groups(model, rho_second=None):
    second = {"params": list(model[2].parameters())}
    if rho_second is not None:
        second["rho"] = rho_second
    return [{"params": list(model[0].parameters())}, second]


def train(model, opt, steps=STEPS, batch=None):
    x, y = batch or make_batch()
    losses = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        closure()
        losses.append(opt.step(closure))
    return losses


BASES = {
    # name: (our base class, the reference's base class, kwargs)
    "fusedopt.SGD": (fusedopt.SGD, fusedopt.SGD, dict(lr=0.1, momentum=0.9)),
    "fusedopt.SGD/torch.SGD": (fusedopt.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, foreach=False)),
    "torch.SGD": (torch.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, foreach=False)),
    "fusedopt.AdamW/torch.AdamW": (fusedopt.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, foreach=False)),
}


@pytest.mark.parametrize("adaptive,rho", [(False, 0.05), (True, 0.5)])
@pytest.mark.parametrize("base", list(BASES))
def test_matches_pytorch_optimizer_sam(base, adaptive, rho):
    ours_cls, ref_cls, kw = BASES[base]
    model, ref_model = make_model(), make_model()
    opt = fusedopt.SAM(two_groups(model, rho_second=2 * rho), ours_cls, rho=rho, adaptive=adaptive, **kw)
    ref = pytorch_optimizer.SAM(two_groups(ref_model, rho_second=2 * rho), ref_cls, rho=rho, adaptive=adaptive, **kw)
    start = [p.detach().clone() for p in model.parameters()]
    train(model, opt)
    train(ref_model, ref)
    for p, q, p0 in zip(model.parameters(), ref_model.parameters(), start):
        torch.testing.assert_close(p, q, **TOL)
        assert (p - p0).abs().max() > 1e-3  # the comparison is not between unmoved params
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for key, value in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, **TOL, msg=key)


def test_grad_norm_is_the_weighted_global_norm():
    model = make_model()
    opt = fusedopt.SAM([{"params": list(model[0].parameters()), "adaptive": True},
                        {"params": list(model[2].parameters())}], fusedopt.SGD, lr=0.1)
    x, y = make_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    # float64 reference written here: adaptive group weighted by |p|, the other not.
    terms = [(p.detach().double().abs() * p.grad.double()).square().sum() for p in model[0].parameters()]
    terms += [p.grad.double().square().sum() for p in model[2].parameters()]
    expected = math.sqrt(sum(terms))
    opt.first_step()
    assert isinstance(opt.grad_norm, torch.Tensor) and opt.grad_norm.dim() == 0
    assert opt.grad_norm.item() == pytest.approx(expected, rel=1e-6)  # fp32 norms, 1e-6 relative
    opt.second_step()


class RecordingSGD(torch.optim.SGD):
    """torch SGD that records the params and grads it is stepped with."""

    def step(self, closure=None):
        self.seen = [(p.detach().clone(), None if p.grad is None else p.grad.clone())
                     for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def test_second_step_restores_w_bit_for_bit():
    torch.manual_seed(3)
    # Magnitudes over 6 decades, so (w + e) - e differs from w in many elements.
    params = [nn.Parameter(torch.randn(1000) * torch.logspace(-3, 3, 1000)), nn.Parameter(torch.randn(7, 5))]
    w = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fusedopt.SAM(params, RecordingSGD, rho=5.0, lr=0.0)
    opt.first_step()
    moved = [p.detach().clone() for p in params]
    assert not torch.equal(moved[0], w[0])
    naive = moved[0] - (moved[0] - w[0])  # what a subtract-e restore would give
    assert not torch.equal(naive, w[0]), "test data too tame to tell an exact restore apart"
    for p in params:
        p.grad = torch.randn_like(p)
    opt.second_step()
    for (seen, _), before in zip(opt.base_optimizer.seen, w):
        assert_bits_equal(seen, before)  # the base step ran at w
    for p, before in zip(params, w):
        assert_bits_equal(p.detach(), before)  # lr=0: still w


@pytest.mark.parametrize("alpha", [0.3, 0.75])
def test_alpha_mix_matches_a_hand_written_reference(alpha):
    rho = 0.1
    model, ref_model = make_model(), make_model()
    opt = fusedopt.SAM(model.parameters(), fusedopt.SGD, rho=rho, alpha=alpha, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, foreach=False)
    train(model, opt)
    x, y = make_batch()
    params = list(ref_model.parameters())
    for _ in range(STEPS):
        g_w = torch.autograd.grad(nn.functional.cross_entropy(ref_model(x), y), params)
        norm = torch.sqrt(sum(g.square().sum() for g in g_w))
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, g_w):
                p.add_(g * (rho / (norm + 1e-12)))
        g_e = torch.autograd.grad(nn.functional.cross_entropy(ref_model(x), y), params)
        with torch.no_grad():
            for p, w0, gw, ge in zip(params, w, g_w, g_e):
                p.copy_(w0)
                p.grad = (1 - alpha) * gw + alpha * ge
        ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)
    # and the mix matters: plain SAM ends elsewhere
    sam_model = make_model()
    train(sam_model, fusedopt.SAM(sam_model.parameters(), fusedopt.SGD, rho=rho, lr=0.1, momentum=0.9))
    assert max((p - q).abs().max() for p, q in zip(model.parameters(), sam_model.parameters())) > 1e-4


def test_step_closure_equals_the_two_calls_and_returns_the_loss():
    model, other = make_model(), make_model()
    opt = fusedopt.SAM(model.parameters(), fusedopt.SGD, lr=0.1, momentum=0.9)
    opt2 = fusedopt.SAM(other.parameters(), fusedopt.SGD, lr=0.1, momentum=0.9)
    losses = train(model, opt)
    x, y = make_batch()
    for i in range(STEPS):
        opt2.zero_grad()
        nn.functional.cross_entropy(other(x), y).backward()
        opt2.first_step(zero_grad=True)
        loss = nn.functional.cross_entropy(other(x), y)
        loss.backward()
        opt2.second_step(zero_grad=True)
        assert losses[i].item() == loss.item()
    for p, q in zip(model.parameters(), other.parameters()):
        assert_bits_equal(p.detach(), q.detach())


def test_closure_that_raises_leaves_params_at_w():
    model = make_model()
    opt = fusedopt.SAM(model.parameters(), fusedopt.SGD, lr=0.1, momentum=0.9)
    x, y = make_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    for p, b in zip(model.parameters(), before):
        assert_bits_equal(p.detach(), b)
    assert len(opt.state) == 0  # no base step ran
    train(model, opt, steps=1)  # and the optimizer is usable again


def test_scheduler_on_sam_moves_the_base_lr():
    model = make_model()
    opt = fusedopt.SAM(model.parameters(), fusedopt.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = make_batch()
    for k in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        sched.step()  # warnings are errors: no "lr_scheduler.step() before optimizer.step()"
        assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (k + 1))
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_state_dict_is_the_base_optimizers_and_round_trips():
    model = make_model()
    opt = fusedopt.SAM(model.parameters(), fusedopt.SGD, lr=0.1, momentum=0.9)
    train(model, opt, steps=2)
    x, y = make_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    for sd in (opt.state_dict(), opt.base_optimizer.state_dict()):  # also in the middle of a step
        assert all(set(s) == {"momentum_buffer"} for s in sd["state"].values())
    nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    sd = opt.state_dict()
    assert sd["state"].keys() == opt.base_optimizer.state_dict()["state"].keys()
    assert all("old_p" not in s for s in sd["state"].values())

    resumed_model = copy.deepcopy(model)
    resumed = fusedopt.SAM(resumed_model.parameters(), fusedopt.SGD, lr=0.5)
    resumed.load_state_dict(copy.deepcopy(sd))
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    assert resumed.param_groups[0]["lr"] == 0.1
    train(model, opt, steps=2)
    train(resumed_model, resumed, steps=2)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert_bits_equal(p.detach(), q.detach())


@pytest.mark.parametrize("base", [fusedopt.SGD, torch.optim.SGD])
def test_params_without_grad_are_neither_perturbed_nor_stepped(base):
    model = make_model()
    frozen = model[0].bias
    frozen_before = frozen.detach().clone()
    opt = fusedopt.SAM(model.parameters(), base, lr=0.1, momentum=0.9)
    x, y = make_batch()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        frozen.grad = None
        opt.first_step(zero_grad=True)
        assert_bits_equal(frozen.detach(), frozen_before)  # not perturbed
        nn.functional.cross_entropy(model(x), y).backward()
        frozen.grad = None
        opt.second_step(zero_grad=True)
    assert_bits_equal(frozen.detach(), frozen_before)
    assert frozen not in opt.state or not opt.state[frozen]
    assert torch.count_nonzero(model[0].weight.detach() != make_model()[0].weight.detach()) > 0


def test_mixed_dtypes_and_bf16():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(50, dtype=torch.float64))
    b = nn.Parameter(torch.randn(40).to(torch.bfloat16))
    a.grad, b.grad = torch.randn(50, dtype=torch.float64), torch.randn(40).to(torch.bfloat16)
    wa, wb = a.detach().clone(), b.detach().clone()
    opt = fusedopt.SAM([a, b], torch.optim.SGD, rho=0.2, lr=0.0)
    opt.first_step()
    expected = math.sqrt(a.grad.square().sum().item() + b.grad.float().square().sum().item())
    assert opt.grad_norm.item() == pytest.approx(expected, rel=1e-6)  # fp64 norm of fp32/fp64 norms
    torch.testing.assert_close(a.detach(), wa + 0.2 * a.grad / expected)  # fp64 default tolerance
    # bf16: e is rounded into a bf16 param: within 1 ulp of bf16 (eps 2**-7) of w + e
    torch.testing.assert_close(b.detach().float(), wb.float() + 0.2 * b.grad.float() / expected,
                               rtol=2 ** -7, atol=2 ** -8)
    opt.second_step()
    assert_bits_equal(a.detach(), wa)
    assert_bits_equal(b.detach(), wb)


@pytest.mark.parametrize("kwargs,word", [
    (dict(rho=-0.1), "rho"), (dict(rho=float("nan")), "rho"), (dict(alpha=0.0), "alpha"),
    (dict(alpha=1.5), "alpha"), (dict(adaptive="yes"), "adaptive")])
def test_invalid_hyper_parameters_raise_value_error(kwargs, word):
    with pytest.raises(ValueError, match=word):
        fusedopt.SAM(make_model().parameters(), fusedopt.SGD, lr=0.1, **kwargs)


def test_invalid_group_values_and_base_instances_raise():
    model = make_model()
    with pytest.raises(ValueError, match="alpha"):
        fusedopt.SAM([{"params": model.parameters(), "alpha": 2.0}], fusedopt.SGD, lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer"):
        fusedopt.SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    opt = fusedopt.SAM(list(model[0].parameters()), fusedopt.SGD, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": list(model[2].parameters()), "rho": -1.0})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1
    opt.add_param_group({"params": list(model[2].parameters()), "rho": 0.2})
    assert opt.param_groups[1]["rho"] == 0.2 and opt.param_groups[1]["momentum"] == 0  # base defaults filled


def test_misordered_calls_raise_and_change_nothing():
    model = make_model()
    opt = fusedopt.SAM(model.parameters(), fusedopt.SGD, lr=0.1)
    x, y = make_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    for p, w0 in zip(model.parameters(), w):
        assert_bits_equal(p.detach(), w0)
    opt.first_step()
    moved = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    for p, m in zip(model.parameters(), moved):
        assert_bits_equal(p.detach(), m)
    with pytest.raises(ValueError, match="closure"):
        fusedopt.SAM(model.parameters(), fusedopt.SGD, lr=0.1).step()


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fused_perturbation_kernel(dtype, adaptive):
    """fusedopt._multi_tensor.sam_perturb_ (SAM's first step on the CPU): the saved copy is w bit
    for bit and the params are w + e computed as written here (in float32, float64 for float64
    params: the kernel's compute type), rounded once to the param dtype."""
    from fusedopt import _multi_tensor
    g = torch.Generator().manual_seed(4)
    shapes = [(33, 17), (1,), (4096 + 5,)]
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    saved = [torch.full_like(p, 7) for p in params]
    before = [p.clone() for p in params]
    scale = float(torch.tensor(0.0371).to(dtype))
    _multi_tensor.sam_perturb_(params, saved, grads, scale, adaptive)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    for p, w, gr, s in zip(params, before, grads, saved):
        assert_bits_equal(s, w)
        wc, gc = w.to(compute), gr.to(compute)
        e = ((wc * wc) * gc) * scale if adaptive else gc * scale
        assert_bits_equal(p, (wc + e).to(dtype))


def test_fused_perturbation_kernel_rejects_mismatched_lists():
    from fusedopt import _multi_tensor
    p = torch.zeros(4)
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        _multi_tensor.sam_perturb_([p], [torch.zeros(4)], [torch.zeros(5)], 0.1, False)
    with pytest.raises(ValueError, match=r"saved\[0\]"):
        _multi_tensor.sam_perturb_([p], [torch.zeros(4, dtype=torch.float64)], [torch.zeros(4)], 0.1, False)
    with pytest.raises(ValueError, match="params, saved and grads"):
        _multi_tensor.sam_perturb_([p], [], [torch.zeros(4)], 0.1, False)
