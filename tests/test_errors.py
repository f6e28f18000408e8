"""Validation errors (torch's wording) and bad inputs at step time (clean error, nothing changed)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fusedopt
from conftest import (
    assert_close,
    assert_unchanged,
    clone_params,
    make_grads,
    make_params,
    mentions,
    names_param,
    run_steps,
    set_grads,
    snapshot,
    torch_ref,
)

T = torch.tensor

# --------------------------------------------------------------------------------------------
# Hyper-parameter validation: the same exception type and message as torch.optim.
# --------------------------------------------------------------------------------------------

ADAM_BAD = [
    dict(lr=-1.0),
    dict(lr=-1e-3),
    dict(lr=T(-0.5)),
    dict(lr=T([0.1, 0.2])),
    dict(eps=-1e-8),
    dict(betas=(1.0, 0.999)),
    dict(betas=(-0.1, 0.999)),
    dict(betas=(0.9, 1.0)),
    dict(betas=(0.9, -0.5)),
    dict(betas=(0.9, T(0.999))),
    dict(weight_decay=-0.1),
]
SGD_BAD = [
    dict(lr=-0.1),
    dict(lr=T([0.1, 0.2])),
    dict(momentum=-0.9),
    dict(weight_decay=-1e-4),
    dict(nesterov=True),
    dict(nesterov=True, momentum=0.9, dampening=0.1),
]
VALIDATION_CASES = (
    [pytest.param("AdamW", kw, id=f"AdamW-{kw}") for kw in ADAM_BAD]
    + [pytest.param("Adam", kw, id=f"Adam-{kw}") for kw in ADAM_BAD]
    + [pytest.param("SGD", kw, id=f"SGD-{kw}") for kw in SGD_BAD]
)


def torch_error(fn):
    with pytest.raises(Exception) as exc:
        fn()
    return exc.type, str(exc.value)


@pytest.mark.parametrize("name,kwargs", VALIDATION_CASES)
def test_invalid_hyperparameters_raise_like_torch(name, kwargs):
    p = [nn.Parameter(torch.randn(3))]
    exc_type, message = torch_error(lambda: getattr(torch.optim, name)(p, **copy.deepcopy(kwargs)))
    assert exc_type is ValueError  # guard: the row really is invalid for torch
    with pytest.raises(ValueError) as exc:
        getattr(fusedopt, name)(p, **copy.deepcopy(kwargs))
    assert str(exc.value) == message


def test_validation_wording_examples():
    """The contract's own examples, spelled out."""
    p = [nn.Parameter(torch.randn(3))]
    expected = [
        (lambda: fusedopt.AdamW(p, lr=-1.0), "Invalid learning rate: -1.0"),
        (lambda: fusedopt.AdamW(p, betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        (lambda: fusedopt.Adam(p, betas=(0.9, 1.5)), "Invalid beta parameter at index 1: 1.5"),
        (lambda: fusedopt.Adam(p, eps=-1.0), "Invalid epsilon value: -1.0"),
        (lambda: fusedopt.AdamW(p, weight_decay=-0.5), "Invalid weight_decay value: -0.5"),
        (lambda: fusedopt.SGD(p, momentum=-1.0), "Invalid momentum value: -1.0"),
        (lambda: fusedopt.SGD(p, weight_decay=-0.5), "Invalid weight_decay value: -0.5"),
        (lambda: fusedopt.SGD(p, lr=0.1, nesterov=True),
         "Nesterov momentum requires a momentum and zero dampening"),
    ]
    for fn, message in expected:
        with pytest.raises(ValueError) as exc:
            fn()
        assert str(exc.value) == message


PARAM_LIST_CASES = [
    pytest.param(lambda: torch.randn(3, requires_grad=True), id="single-tensor"),
    pytest.param(lambda: [], id="empty"),
    pytest.param(lambda: [torch.randn(3, requires_grad=True) * 2], id="non-leaf"),
    pytest.param(lambda: (lambda p: [dict(params=[p]), dict(params=[p])])(nn.Parameter(torch.randn(3))),
                 id="param-in-two-groups"),
]


@pytest.mark.parametrize("make", PARAM_LIST_CASES)
@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD"])
def test_bad_params_argument_raises_like_torch(name, make):
    params = make()
    exc_type, message = torch_error(lambda: getattr(torch.optim, name)(params))
    with pytest.raises(exc_type) as exc:
        getattr(fusedopt, name)(params)
    assert str(exc.value) == message


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD"])
def test_add_param_group_rejects_a_param_already_present_like_torch(name):
    p, q = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    _, message = torch_error(lambda: getattr(torch.optim, name)([p], lr=0.1).add_param_group(
        dict(params=[p])))
    opt = getattr(fusedopt, name)([p], lr=0.1)
    with pytest.raises(ValueError) as exc:
        opt.add_param_group(dict(params=[p]))
    assert str(exc.value) == message
    assert len(opt.param_groups) == 1
    opt.add_param_group(dict(params=[q], lr=0.5))
    assert opt.param_groups[1]["lr"] == 0.5


# --------------------------------------------------------------------------------------------
# Bad inputs at step time
# --------------------------------------------------------------------------------------------

OPTS = [
    pytest.param("AdamW", dict(lr=0.01, weight_decay=0.1), id="adamw"),
    pytest.param("Adam", dict(lr=0.01, amsgrad=True), id="adam"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.9), id="sgd-momentum"),
    pytest.param("SGD", dict(lr=0.1), id="sgd"),
]

BAD_SHAPE = (6, 5)  # unique among the params, so a message naming the shape names the param


def _bad_param(kind):
    """(param, grad for the failing step, grad for the warm-up steps or None, problem words)."""
    gen = torch.Generator().manual_seed(5)
    dense = torch.randn(BAD_SHAPE, generator=gen)
    if kind == "sparse-grad":
        p = nn.Parameter(torch.randn(BAD_SHAPE, generator=gen))
        emb = nn.Embedding(6, 5, sparse=True)
        with torch.no_grad():
            emb.weight.copy_(p)
        emb(torch.tensor([1, 3])).sum().backward()
        assert emb.weight.grad.is_sparse
        return p, emb.weight.grad, dense, ("sparse",)
    if kind == "complex":
        p = nn.Parameter(torch.randn(BAD_SHAPE, dtype=torch.complex64, generator=gen))
        return p, torch.randn(BAD_SHAPE, dtype=torch.complex64, generator=gen), None, ("complex",)
    if kind == "integer":
        p = torch.zeros(BAD_SHAPE, dtype=torch.int32)  # a leaf; ints cannot require grad
        return p, torch.ones(BAD_SHAPE, dtype=torch.int32), None, ("int", "dtype", "float")
    if kind == "meta-device":
        p = nn.Parameter(torch.empty(BAD_SHAPE, device="meta"))
        return p, torch.empty(BAD_SHAPE, device="meta"), None, ("meta", "device")
    if kind == "grad-shape":
        p = nn.Parameter(torch.randn(BAD_SHAPE, generator=gen))
        return p, "smaller", dense, ("shape", "size", "numel")
    raise AssertionError(kind)


def _assign_bad_grad(p, g):
    if isinstance(g, str) and g == "smaller":
        # torch refuses such a grad through the setter, but `.grad.data` bypasses the check
        p.grad = torch.zeros_like(p)
        p.grad.data = torch.randn(3)
        assert p.grad.shape != p.shape
    else:
        p.grad = g


BAD_KINDS = ["sparse-grad", "complex", "integer", "meta-device", "grad-shape"]


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("name,kwargs", OPTS)
def test_bad_input_raises_naming_param_and_changes_nothing(name, kwargs, kind):
    """Good params in the group before and in an earlier group must not move either."""
    shapes = [(1023,), (7,), (40000,), (3, 4)]
    good = make_params(shapes)
    grads = make_grads(shapes, steps=3)
    bad, bad_grad, warm_grad, problem = _bad_param(kind)
    # group 0: good[0], good[1]; group 1: good[2], bad, good[3]  -> bad is global index 3
    ps = clone_params(good)
    allp = ps[:3] + [bad] + ps[3:]
    groups = [dict(params=allp[:2]), dict(params=allp[2:])]
    try:
        opt = getattr(fusedopt, name)(groups, **copy.deepcopy(kwargs))
    except (ValueError, RuntimeError, TypeError) as exc:
        # Rejecting an unsupported param up front is acceptable, if the message is clear.
        assert kind in ("complex", "integer", "meta-device"), f"{kind}: {exc}"
        msg = str(exc)
        assert names_param(msg, indices=(3,), shape=BAD_SHAPE), msg
        assert mentions(msg, *problem), msg
        return
    for k in range(2):  # warm-up: state exists and step counts are non-zero
        row = grads[k][:3] + [warm_grad] + grads[k][3:]
        set_grads(allp, row)
        opt.step()
    set_grads(ps, grads[2])
    _assign_bad_grad(bad, bad_grad)
    snap = snapshot(opt)
    with pytest.raises((ValueError, RuntimeError)) as exc:
        opt.step()
    msg = str(exc.value)
    assert names_param(msg, indices=(3,), shape=BAD_SHAPE), (
        f"message does not name the param: {msg}")
    assert mentions(msg, *problem), f"message does not name the problem ({problem}): {msg}"
    assert_unchanged(opt, snap)
    # and the optimizer still works once the bad grad is gone
    bad.grad = None
    opt.step()
    assert not torch.equal(ps[2].detach(), snap["params"][2][0])


@pytest.mark.parametrize("grad_dtype", [torch.float64, torch.bfloat16], ids=["fp64-grad", "bf16-grad"])
@pytest.mark.parametrize("name,kwargs", OPTS)
def test_grad_dtype_differs_from_param(name, kwargs, grad_dtype):
    """torch lets a grad have another dtype when ``grad_dtype`` is relaxed. fusedopt must not
    misread it: either a clean error naming the param (nothing changed), or exactly what
    torch.optim does with that grad converted to the param dtype."""
    shapes = [(1023,), (6, 5), (40000,)]
    params = make_params(shapes)
    grads = make_grads(shapes, steps=3)
    ps = clone_params(params)
    opt = getattr(fusedopt, name)(ps, **copy.deepcopy(kwargs))
    for row in grads[:2]:
        set_grads(ps, row)
        opt.step()
    set_grads(ps, grads[2])
    ps[1].grad_dtype = None
    ps[1].grad = grads[2][1].to(grad_dtype)
    snap = snapshot(opt)
    try:
        opt.step()
    except (ValueError, RuntimeError) as exc:
        msg = str(exc)
        assert names_param(msg, indices=(1,), shape=(6, 5)), f"message does not name the param: {msg}"
        assert mentions(msg, "dtype", str(grad_dtype).replace("torch.", ""), "double"), msg
        assert_unchanged(opt, snap)
        return
    ref_cls = getattr(torch.optim, name)
    rows = [list(r) for r in grads]
    rows[2][1] = grads[2][1].to(grad_dtype).float()
    ref_p, ref_opt = run_steps(torch_ref(ref_cls, **kwargs), params, rows)
    for i, (gp, rp) in enumerate(zip(ps, ref_p)):
        assert_close(gp, rp, msg=f"param {i}")


@pytest.mark.parametrize("name,kwargs", OPTS)
def test_non_finite_grads_propagate_like_torch(name, kwargs):
    shapes = [(1023,), (7,)]
    params = make_params(shapes)
    grads = make_grads(shapes, steps=4)
    grads[1][0][5] = float("nan")
    grads[2][0][17] = float("inf")
    grads[3][0][100] = float("-inf")
    grads[2][1][3] = float("inf")
    got_p, got_opt = run_steps(lambda ps: getattr(fusedopt, name)(ps, **copy.deepcopy(kwargs)),
                               params, grads)
    ref_p, ref_opt = run_steps(torch_ref(getattr(torch.optim, name), **kwargs), params, grads)
    assert not torch.isfinite(ref_p[0]).all()

    def same_non_finite(a, b, what):
        for f in (torch.isnan, torch.isposinf, torch.isneginf):
            bad = (f(a) != f(b)).nonzero().flatten().tolist()
            assert not bad, (f"{what}: {f.__name__} differs from torch at {bad}: "
                             f"got {a.flatten()[bad].tolist()}, torch {b.flatten()[bad].tolist()}")

    for i, (gp, rp) in enumerate(zip(got_p, ref_p)):
        # same NaN/inf positions (and signs of inf); finite values within fp32 tolerance
        same_non_finite(gp.detach(), rp.detach(), f"param {i}")
        assert_close(gp, rp, msg=f"param {i}")
        for key, v in ref_opt.state.get(rp, {}).items():
            same_non_finite(got_opt.state[gp][key], v, f"param {i} state[{key}]")
            assert_close(got_opt.state[gp][key], v, msg=f"param {i} state[{key}]")


@pytest.mark.parametrize("name,kwargs", OPTS)
def test_float64_params_work_like_torch_or_are_rejected_cleanly(name, kwargs):
    """torch.optim handles fp64 params; fusedopt either matches it or says clearly that the
    dtype is unsupported, before anything changed (never a silent misread of the memory)."""
    shapes = [(1023,), (6, 5)]
    dtypes = [torch.float32, torch.float64]
    params = [nn.Parameter(t.to(dt)) for t, dt in zip(make_params(shapes), dtypes)]
    grads = [[g.to(dt) for g, dt in zip(row, dtypes)] for row in make_grads(shapes, steps=3)]
    ps = clone_params(params)
    try:
        opt = getattr(fusedopt, name)(ps, **copy.deepcopy(kwargs))
    except (ValueError, RuntimeError, TypeError) as exc:
        msg = str(exc)
        assert names_param(msg, indices=(1,), shape=(6, 5)) and mentions(msg, "float64", "double", "dtype"), msg
        return
    set_grads(ps, grads[0])
    snap = snapshot(opt)
    try:
        opt.step()
    except (ValueError, RuntimeError) as exc:
        msg = str(exc)
        assert names_param(msg, indices=(1,), shape=(6, 5)), f"message does not name the param: {msg}"
        assert mentions(msg, "float64", "double", "dtype"), msg
        assert_unchanged(opt, snap)
        return
    for row in grads[1:]:
        set_grads(ps, row)
        opt.step()
    ref_p, _ = run_steps(torch_ref(getattr(torch.optim, name), **kwargs), params, grads)
    for i, (gp, rp) in enumerate(zip(ps, ref_p)):
        assert_close(gp, rp, msg=f"param {i}")


# --------------------------------------------------------------------------------------------
# Issue 13.4: every group's lr is validated, and a replaced tensor lr rebuilds the plan.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [(-0.1, "Invalid learning rate"),
                                        (torch.tensor([0.1, 0.2]), "Tensor lr must be 1-element")])
def test_add_param_group_validates_lr(bad, match):
    opt = fusedopt.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": bad})
    assert len(opt.param_groups) == 1


def test_lr_replaced_by_an_invalid_one_is_reported_by_step_before_anything_changes():
    p = torch.nn.Parameter(torch.ones(2))
    opt = fusedopt.AdamW([p], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    before = p.detach().clone(), opt.state[p]["exp_avg"].clone(), float(opt.state[p]["step"])
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="group 0: Invalid learning rate"):
        opt.step()
    assert torch.equal(p, before[0]) and torch.equal(opt.state[p]["exp_avg"], before[1])
    assert float(opt.state[p]["step"]) == before[2]


def test_tensor_lr_replaced_after_the_first_step_is_used():
    """A replaced tensor lr (another dtype here) rebuilds the plan instead of reading a stale one."""
    torch.manual_seed(0)
    p, q = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    q.data.copy_(p.data)
    opt = fusedopt.SGD([p], lr=torch.tensor(0.1))
    ref = torch.optim.SGD([q], lr=0.1, foreach=False)
    for lr in (torch.tensor(0.1), torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.25)):
        opt.param_groups[0]["lr"] = lr
        ref.param_groups[0]["lr"] = float(lr)
        g = torch.randn(4)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert torch.equal(p, q)


# --------------------------------------------------------------------------------------------
# Issue 13.7: a step that would create state is refused while a CUDA graph is being captured.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.9)), ("AdamW", dict(lr=0.1))])
def test_capturing_a_first_step_raises_before_anything_changes(monkeypatch, name, kw):
    """The capture check on the host (the CUDA suite captures real graphs after eager steps):
    while a capture is under way, a first step (state to create, SGD's first-step flag to bake
    in) raises a clear error and changes nothing; after an eager step, capturing is allowed."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = getattr(fusedopt, name)([p], **kw)
    p.grad = torch.ones(4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        opt.step()
    assert torch.equal(p, torch.ones(4)) and not opt.state
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    opt.step()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    opt.step()  # the plan exists and no first-step rows remain: allowed (runs here on the CPU)
    assert float(opt.state[p].get("step", torch.tensor(2.0))) == 2.0
