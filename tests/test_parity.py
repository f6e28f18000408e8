"""Parity of fusedopt.AdamW / Adam / SGD with torch.optim (single-tensor for-loop reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fusedopt
from conftest import (
    LOW_PRECISION,
    assert_bits_equal,
    assert_close,
    assert_moved,
    assert_optimizers_match,
    assert_state_matches,
    clone_params,
    make_grads,
    make_params,
    make_tensors,
    rounded_reference,
    run_steps,
    set_grads,
    torch_ref,
)

STEPS = 6


def fo_factory(name, **kwargs):
    cls = getattr(fusedopt, name)
    return lambda ps: cls(ps, **copy.deepcopy(kwargs))


# --------------------------------------------------------------------------------------------
# The grid. Each row: (id, fusedopt class name, torch reference class, fusedopt kwargs,
# torch kwargs (None: the same)).
# --------------------------------------------------------------------------------------------

T = torch.tensor
ADAM_CASES = [
    ("adamw-defaults", "AdamW", torch.optim.AdamW, {}, None),
    ("adamw-hparams", "AdamW", torch.optim.AdamW,
     dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), None),
    ("adamw-wd0", "AdamW", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.0), None),
    ("adamw-amsgrad", "AdamW", torch.optim.AdamW, dict(lr=0.01, amsgrad=True), None),
    ("adamw-maximize", "AdamW", torch.optim.AdamW, dict(lr=0.01, maximize=True, weight_decay=0.05), None),
    ("adamw-amsgrad-maximize", "AdamW", torch.optim.AdamW,
     dict(lr=0.01, amsgrad=True, maximize=True, betas=(0.5, 0.9)), None),
    ("adamw-tensor-lr", "AdamW", torch.optim.AdamW, dict(lr=T(0.01), weight_decay=0.1), None),
    ("adamw-tensor-betas", "AdamW", torch.optim.AdamW, dict(lr=0.01, betas=(T(0.85), T(0.95))), None),
    ("adam-defaults", "Adam", torch.optim.Adam, {}, None),
    ("adam-wd", "Adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.1), None),
    ("adam-wd-amsgrad-maximize-eps", "Adam", torch.optim.Adam,
     dict(lr=0.01, weight_decay=0.05, amsgrad=True, maximize=True, eps=1e-4), None),
    ("adam-tensor-lr", "Adam", torch.optim.Adam, dict(lr=T(0.02), betas=(0.7, 0.9)), None),
    ("adam-decoupled-vs-adamw", "Adam", torch.optim.AdamW,
     dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), dict(lr=0.01, weight_decay=0.1)),
    ("adam-decoupled-amsgrad", "Adam", torch.optim.Adam,
     dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True), None),
]
SGD_CASES = [
    ("sgd-defaults", "SGD", torch.optim.SGD, {}, None),
    ("sgd-plain", "SGD", torch.optim.SGD, dict(lr=0.1), None),
    ("sgd-momentum", "SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9), None),
    ("sgd-dampening", "SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3), None),
    ("sgd-nesterov", "SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True), None),
    ("sgd-momentum-wd", "SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01), None),
    ("sgd-nomomentum-wd-maximize", "SGD", torch.optim.SGD,
     dict(lr=0.1, weight_decay=0.05, maximize=True), None),
    ("sgd-all", "SGD", torch.optim.SGD,
     dict(lr=0.05, momentum=0.5, dampening=0.5, weight_decay=0.02, maximize=True), None),
    ("sgd-nesterov-wd-maximize", "SGD", torch.optim.SGD,
     dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01, maximize=True), None),
    ("sgd-tensor-lr", "SGD", torch.optim.SGD, dict(lr=T(0.1), momentum=0.9), None),
]
ALL_CASES = ADAM_CASES + SGD_CASES


def _params(cases):
    return [pytest.param(name, cls, kw, tkw if tkw is not None else kw, id=cid)
            for cid, name, cls, kw, tkw in cases]


def _with_lr(kwargs, lr):
    """Same kwargs with a larger lr (kept a tensor if it was one)."""
    kw = copy.deepcopy(kwargs)
    kw["lr"] = torch.tensor(lr) if torch.is_tensor(kw.get("lr")) else lr
    return kw


@pytest.mark.parametrize("name,ref_cls,kwargs,tkwargs", _params(ALL_CASES))
def test_parity_fp32(name, ref_cls, kwargs, tkwargs):
    params = make_params()
    grads = make_grads(steps=STEPS)
    got_p, got_opt = run_steps(fo_factory(name, **kwargs), params, grads)
    ref_p, ref_opt = run_steps(torch_ref(ref_cls, **tkwargs), params, grads)
    assert_moved(params[3], ref_p[3], torch.float32)
    assert_optimizers_match(got_p, got_opt, ref_p, ref_opt)


@pytest.mark.parametrize("name,ref_cls,kwargs,tkwargs", _params(ALL_CASES))
def test_parity_float64(name, ref_cls, kwargs, tkwargs):
    """float64 params keep float64 state and are updated in double, as torch does (issue 13.13).
    Both sides compute every value in double and differ only in operation order (precomputed
    bias corrections, one divide instead of two): an ulp or so of double per step, so 1e-12
    relative is ~10^3 ulps of room and still 10^4 times tighter than fp32's tolerance. Tensor
    lr/betas are float32 tensors: torch does part of its scalar math with them in float32 where
    fusedopt reads them into double, so those rows get torch's own float64 default tolerance
    (rtol = atol = 1e-7, what its *_matches_forloop tests use)."""
    params = [p.double() for p in make_params()]
    grads = [[g.double() for g in step] for step in make_grads(steps=STEPS)]
    got_p, got_opt = run_steps(fo_factory(name, **kwargs), params, grads)
    ref_p, ref_opt = run_steps(torch_ref(ref_cls, **tkwargs), params, grads)
    assert_moved(params[3], ref_p[3], torch.float32)
    tensor_scalars = any(torch.is_tensor(v) or (isinstance(v, tuple) and torch.is_tensor(v[0]))
                         for v in kwargs.values())
    tol = dict(rtol=1e-7, atol=1e-7) if tensor_scalars else dict(rtol=1e-12, atol=1e-14)
    for i, (gp, rp) in enumerate(zip(got_p, ref_p, strict=True)):
        assert gp.dtype == torch.float64
        torch.testing.assert_close(gp, rp, **tol, msg=lambda m: f"param {i}: {m}")
        got_state, ref_state = got_opt.state.get(gp, {}), ref_opt.state.get(rp, {})
        assert set(got_state) == set(ref_state)
        for k, v in ref_state.items():
            if k == "step":
                assert float(got_state[k]) == float(v)
                continue
            assert got_state[k].dtype == torch.float64, k
            torch.testing.assert_close(got_state[k], v, **tol, msg=lambda m: f"param {i} state {k}: {m}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,ref_cls,kwargs,tkwargs", _params(ALL_CASES))
def test_parity_low_precision(name, ref_cls, kwargs, tkwargs, dtype):
    # lr 0.05: an update is several ulps of a unit-sized bf16/fp16 value (see TOLERANCES).
    kwargs, tkwargs = _with_lr(kwargs, 0.05), _with_lr(tkwargs, 0.05)
    params = make_params(dtype=dtype)
    grads = make_grads(steps=STEPS, dtype=dtype)
    got_p, got_opt = run_steps(fo_factory(name, **kwargs), params, grads)
    ref_p, ref_states = rounded_reference(ref_cls, tkwargs, params, grads)
    assert_moved(params[3], ref_p[3], dtype)
    for i, (gp, rp, rs) in enumerate(zip(got_p, ref_p, ref_states, strict=True)):
        assert gp.dtype == dtype
        assert_close(gp, rp, dtype, msg=f"param {i}")
        assert_state_matches(got_opt.state.get(gp, {}), rs, dtype, msg=f"param {i}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,ref_cls,kwargs,tkwargs", _params(ADAM_CASES))
def test_low_precision_adam_matches_torch_fused(name, ref_cls, kwargs, tkwargs, dtype):
    """Second opinion: torch's fused CPU Adam also computes in fp32 and rounds once per step."""
    kwargs, tkwargs = _with_lr(kwargs, 0.05), _with_lr(tkwargs, 0.05)
    params = make_params(dtype=dtype)
    grads = make_grads(steps=STEPS, dtype=dtype)
    got_p, got_opt = run_steps(fo_factory(name, **kwargs), params, grads)
    ref_p, ref_opt = run_steps(lambda ps: ref_cls(ps, fused=True, **copy.deepcopy(tkwargs)),
                               params, grads)
    assert_optimizers_match(got_p, got_opt, ref_p, ref_opt, dtype)


@pytest.mark.parametrize(
    "name,ref_cls,kwargs",
    [("AdamW", torch.optim.AdamW, dict(lr=0.05, weight_decay=0.1)),
     ("Adam", torch.optim.Adam, dict(lr=0.05, amsgrad=True, weight_decay=0.01)),
     ("SGD", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01))],
    ids=["adamw", "adam", "sgd"],
)
def test_bf16_error_bounded_by_naive_bf16(name, ref_cls, kwargs):
    """Error vs an fp32 run <= 2 x the error of torch's naive bf16 for-loop (per-op rounding)."""
    dtype = torch.bfloat16
    params = make_params(dtype=dtype)
    grads = make_grads(steps=STEPS, dtype=dtype)
    got_p, _ = run_steps(fo_factory(name, **kwargs), params, grads)
    naive_p, _ = run_steps(torch_ref(ref_cls, **kwargs), params, grads)
    ref32_p, _ = run_steps(torch_ref(ref_cls, **kwargs), [p.float() for p in params],
                           [[g.float() for g in row] for row in grads])
    for i in (2, 3, 4):
        err_got = (got_p[i].double() - ref32_p[i].double()).abs().max().item()
        err_naive = (naive_p[i].double() - ref32_p[i].double()).abs().max().item()
        assert err_got <= 2 * err_naive, f"param {i}: error {err_got} vs naive bf16 {err_naive}"


# --------------------------------------------------------------------------------------------
# Structure: groups, None grads, frozen params, layouts, sizes, dtypes
# --------------------------------------------------------------------------------------------

GROUP_CASES = [
    pytest.param(
        "AdamW", torch.optim.AdamW,
        lambda ps: [dict(params=ps[0:2], lr=0.02, weight_decay=0.0),
                    dict(params=ps[2:4], betas=(0.8, 0.9), amsgrad=True),
                    dict(params=ps[4:], lr=0.005, maximize=True, eps=1e-5)],
        dict(lr=0.01, weight_decay=0.1), id="adamw"),
    pytest.param(
        "Adam", torch.optim.Adam,
        lambda ps: [dict(params=ps[0:2], weight_decay=0.1),
                    dict(params=ps[2:4], weight_decay=0.1, decoupled_weight_decay=True),
                    dict(params=ps[4:], lr=0.03, amsgrad=True)],
        dict(lr=0.01), id="adam"),
    pytest.param(
        "SGD", torch.optim.SGD,
        lambda ps: [dict(params=ps[0:2]),
                    dict(params=ps[2:4], momentum=0.9, nesterov=True),
                    dict(params=ps[4:], momentum=0.5, dampening=0.2, weight_decay=0.01,
                         maximize=True, lr=0.2)],
        dict(lr=0.1), id="sgd"),
]


@pytest.mark.parametrize("name,ref_cls,groups,defaults", GROUP_CASES)
def test_param_groups_with_different_hyperparameters(name, ref_cls, groups, defaults):
    params = make_params()
    grads = make_grads(steps=STEPS)
    got_p, got_opt = run_steps(lambda ps: getattr(fusedopt, name)(groups(ps), **defaults),
                               params, grads)
    ref_p, ref_opt = run_steps(lambda ps: ref_cls(groups(ps), foreach=False, **defaults),
                               params, grads)
    assert_optimizers_match(got_p, got_opt, ref_p, ref_opt)
    for gg, rg in zip(got_opt.param_groups, ref_opt.param_groups, strict=True):
        for k in ("lr", "weight_decay", "momentum", "dampening", "nesterov", "maximize",
                  "betas", "eps", "amsgrad", "decoupled_weight_decay"):
            if k in rg:
                assert gg[k] == rg[k], (k, gg[k], rg[k])


OPT_CASES = [
    pytest.param("AdamW", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1), id="adamw"),
    pytest.param("Adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True), id="adam"),
    pytest.param("SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9), id="sgd-momentum"),
    pytest.param("SGD", torch.optim.SGD, dict(lr=0.1, weight_decay=0.1), id="sgd"),
]


@pytest.mark.parametrize("name,ref_cls,kwargs", OPT_CASES)
def test_none_grads_and_frozen_params_are_untouched(name, ref_cls, kwargs):
    # 0: always a grad; 1: grad always None; 2: frozen (requires_grad=False, never a grad);
    # 3: grad only on even steps; 4: grad only from step 3 on.
    params = make_params()
    params[2].requires_grad_(False)
    never = {1, 2}
    grads = make_grads(steps=STEPS, none=lambda k, i: i in never or (i == 3 and k % 2) or (i == 4 and k < 3))
    ps = clone_params(params)
    opt = getattr(fusedopt, name)(ps, **copy.deepcopy(kwargs))
    ref_p, ref_opt = run_steps(torch_ref(ref_cls, **kwargs), params, grads)
    for k, row in enumerate(grads):
        set_grads(ps, row)
        before3 = {key: v.clone() for key, v in opt.state.get(ps[3], {}).items()}
        p3 = ps[3].detach().clone()
        opt.step()
        if row[3] is None:  # a param without grad keeps its value and state bit for bit
            assert_bits_equal(ps[3].detach(), p3, msg=f"step {k} param 3")
            after3 = opt.state.get(ps[3], {})
            assert set(after3) == set(before3)
            for key, v in before3.items():
                assert_bits_equal(after3[key], v, msg=f"step {k} state[{key}]")
        if k < 3:
            assert ps[4] not in opt.state, "state created for a param that never had a grad"
    for i in never:
        assert_bits_equal(ps[i].detach(), params[i].detach(), msg=f"param {i}")
        assert ps[i] not in opt.state, f"state created for param {i} which never had a grad"
    assert_optimizers_match(ps, opt, ref_p, ref_opt)
    assert not never & set(opt.state_dict()["state"]), "state dict has entries for grad-less params"


def _run_pair(name, ref_cls, kwargs, build, grads_for):
    """Run fusedopt and torch side by side on params from ``build()`` (fresh grads each)."""
    got_p, got_extra = build()
    ref_p, ref_extra = build()
    ptrs = [(p.data_ptr(), p.stride()) for p in got_p]
    got_opt = getattr(fusedopt, name)(got_p, **copy.deepcopy(kwargs))
    ref_opt = ref_cls(ref_p, foreach=False, **copy.deepcopy(kwargs))
    for k in range(STEPS):
        for opt, ps in ((got_opt, got_p), (ref_opt, ref_p)):
            for p, g in zip(ps, grads_for(k), strict=True):
                p.grad = g
            opt.step()
    assert [(p.data_ptr(), p.stride()) for p in got_p] == ptrs, "params must be updated in place"
    assert_optimizers_match(got_p, got_opt, ref_p, ref_opt)
    return got_extra, ref_extra


# (param layout, grad layout) over a (4, 5, 6) tensor: dense layouts torch.optim accepts.
LAYOUTS = {
    "transposed-param/transposed-grad": ((1, 0, 2), (1, 0, 2)),
    "transposed-param/contiguous-grad": ((1, 0, 2), None),
    "permuted-param/contiguous-grad": ((2, 0, 1), None),
    "permuted-param/other-permuted-grad": ((2, 0, 1), (1, 2, 0)),
    "contiguous-param/permuted-grad": (None, (2, 1, 0)),
    "contiguous-param/expanded-grad": (None, "expand"),
}


def _layout(t, perm):
    """A tensor equal to ``t`` (same shape and values) whose memory follows permutation ``perm``."""
    if perm is None:
        return t.contiguous()
    inv = [perm.index(d) for d in range(t.dim())]
    return t.permute(*perm).contiguous().permute(*inv)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name,ref_cls,kwargs", OPT_CASES)
def test_non_contiguous_params_and_grads(name, ref_cls, kwargs, layout):
    """Dense non-contiguous layouts, with grads laid out like the param or not, over several
    steps (a cached plan must not pair elements by memory offset when the layouts differ)."""
    p_perm, g_perm = LAYOUTS[layout]
    shape = (4, 5, 6)
    shape2 = (shape[1], shape[0], shape[2])

    def build():
        a, b, c = make_tensors([(1023,), shape, shape2], seed=0)
        return [nn.Parameter(a), nn.Parameter(_layout(b, p_perm)), nn.Parameter(_layout(c, p_perm))], None

    def grads_for(k):  # fresh tensors on every call
        a, b, c = make_tensors([(1023,), shape, shape2], seed=500 + k)
        if g_perm == "expand":
            return [a, b[:1].expand(shape), c[:, :, :1].expand(shape2)]
        return [a, _layout(b, g_perm), _layout(c, g_perm)]

    _run_pair(name, ref_cls, kwargs, build, grads_for)
    if p_perm is not None:
        assert not build()[0][1].is_contiguous()


@pytest.mark.parametrize("name,ref_cls,kwargs", OPT_CASES)
def test_strided_view_params(name, ref_cls, kwargs):
    """A param that is a view with gaps into a bigger tensor (storage offset, step-2 columns),
    as torch.optim supports: the view is updated in place and nothing outside it moves."""

    def build():
        base = make_tensors([(50, 64)], seed=0)[0]
        return [nn.Parameter(base[:, 3:40:2]), nn.Parameter(base[10:20, 50:])], base

    def grads_for(k):
        return make_tensors([(50, 19), (10, 14)], seed=500 + k)

    base_before = make_tensors([(50, 64)], seed=0)[0]
    got_base, ref_base = _run_pair(name, ref_cls, kwargs, build, grads_for)
    outside = torch.ones_like(got_base, dtype=torch.bool)
    outside[:, 3:40:2] = False
    outside[10:20, 50:] = False
    assert_bits_equal(got_base[outside], base_before[outside], msg="base outside the views")
    assert_close(got_base, ref_base, msg="base tensor")


@pytest.mark.parametrize("name,ref_cls,kwargs", OPT_CASES)
def test_many_tensors_of_odd_sizes(name, ref_cls, kwargs):
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 3000, (150,), generator=gen).tolist() + [1, 7, 1023, 40000, 65537]
    shapes = [(s,) for s in sizes]
    params = make_params(shapes)
    grads = make_grads(shapes, steps=5)
    got_p, got_opt = run_steps(fo_factory(name, **kwargs), params, grads)
    ref_p, ref_opt = run_steps(torch_ref(ref_cls, **kwargs), params, grads)
    assert_optimizers_match(got_p, got_opt, ref_p, ref_opt)


@pytest.mark.parametrize("name,ref_cls,kwargs", OPT_CASES)
def test_mixed_dtypes_in_one_group(name, ref_cls, kwargs):
    kwargs = _with_lr(kwargs, 0.05)
    shapes = [(1023,), (1023,), (40000,), (7,), (33, 17)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float32]
    params = [nn.Parameter(t.to(dt)) for t, dt in zip(make_tensors(shapes), dtypes)]
    grads = [[g.to(dt) for g, dt in zip(row, dtypes)] for row in make_grads(shapes, steps=STEPS)]
    got_p, got_opt = run_steps(fo_factory(name, **kwargs), params, grads)
    ref_p, ref_states = rounded_reference(ref_cls, kwargs, params, grads)
    for i, (gp, rp, rs, dt) in enumerate(zip(got_p, ref_p, ref_states, dtypes, strict=True)):
        assert gp.dtype == dt
        assert_close(gp, rp, dt, msg=f"param {i} ({dt})")
        assert_state_matches(got_opt.state.get(gp, {}), rs, dt, msg=f"param {i} ({dt})")


# --------------------------------------------------------------------------------------------
# Optimizer API: closures, zero_grad, add_param_group, schedulers, real model
# --------------------------------------------------------------------------------------------


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 4))


def batches(n=5):
    gen = torch.Generator().manual_seed(11)
    return [(torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("name,ref_cls,kwargs", OPT_CASES)
def test_step_with_closure_returns_the_loss(name, ref_cls, kwargs):
    model_f = tiny_model()
    model_t = copy.deepcopy(model_f)
    opt_f = getattr(fusedopt, name)(model_f.parameters(), **copy.deepcopy(kwargs))
    opt_t = ref_cls(model_t.parameters(), foreach=False, **copy.deepcopy(kwargs))
    for x, y in batches():
        for model, opt in ((model_f, opt_f), (model_t, opt_t)):
            calls = []

            def closure():
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                calls.append(loss)
                return loss

            ret = opt.step(closure)
            assert len(calls) == 1, "closure must be evaluated exactly once per step"
            assert ret is calls[0], "step(closure) must return the closure's loss"
    for (n, pf), pt in zip(model_f.named_parameters(), model_t.parameters()):
        assert_close(pf, pt, msg=n)
    x, y = batches(1)[0]
    model_f.zero_grad()
    nn.functional.mse_loss(model_f(x), y).backward()
    assert opt_f.step() is None, "step() without closure returns None, as torch"


@pytest.mark.parametrize("name,ref_cls,kwargs", OPT_CASES)
def test_zero_grad(name, ref_cls, kwargs):
    params = make_params()
    opt = getattr(fusedopt, name)(params, **copy.deepcopy(kwargs))
    set_grads(params, make_grads(steps=1)[0])
    opt.zero_grad(set_to_none=False)
    for p in params:
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    set_grads(params, make_grads(steps=1)[0])
    opt.zero_grad()  # torch default: set_to_none=True
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("name,ref_cls,kwargs", OPT_CASES)
def test_add_param_group_mid_training(name, ref_cls, kwargs):
    params = make_params()
    grads = make_grads(steps=STEPS)
    extra = {"lr": 0.03} if name == "SGD" else {"lr": 0.03, "amsgrad": True, "betas": (0.7, 0.9)}
    runs = []
    for factory in (fo_factory(name, **kwargs), torch_ref(ref_cls, **kwargs)):
        ps = clone_params(params)
        opt = factory(ps[:3])
        for k in range(STEPS):
            if k == 3:
                opt.add_param_group(dict(params=ps[3:], **extra))
            set_grads(ps, grads[k])
            opt.step()
        runs.append((ps, opt))
    (got_p, got_opt), (ref_p, ref_opt) = runs
    assert_optimizers_match(got_p, got_opt, ref_p, ref_opt)
    assert len(got_opt.param_groups) == 2
    assert set(got_opt.param_groups[1]) == set(ref_opt.param_groups[1]), "defaults filled as torch"


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("name,ref_cls,kwargs", OPT_CASES)
def test_step_lr_scheduler_drives_both(name, ref_cls, kwargs, tensor_lr):
    kwargs = dict(kwargs)
    if tensor_lr:
        kwargs["lr"] = torch.tensor(kwargs["lr"])
    params = make_params()
    grads = make_grads(steps=STEPS)
    runs = []
    for factory in (fo_factory(name, **kwargs), torch_ref(ref_cls, **kwargs)):
        ps = clone_params(params)
        opt = factory(ps)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        lrs = []
        for row in grads:
            set_grads(ps, row)
            opt.step()
            sched.step()
            lrs.append(float(opt.param_groups[0]["lr"]))
        runs.append((ps, opt, lrs))
    (got_p, got_opt, got_lrs), (ref_p, ref_opt, ref_lrs) = runs
    assert got_lrs == ref_lrs
    assert torch.is_tensor(got_opt.param_groups[0]["lr"]) == tensor_lr
    assert_optimizers_match(got_p, got_opt, ref_p, ref_opt)


HPARAM_CHANGES = [
    pytest.param("AdamW", torch.optim.AdamW, dict(lr=0.01),
                 dict(lr=0.03, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.5, maximize=True), id="adamw"),
    pytest.param("Adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.1),
                 dict(decoupled_weight_decay=True, lr=torch.tensor(0.02)), id="adam-decoupled"),
    pytest.param("SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9),
                 dict(momentum=0.5, dampening=0.5, weight_decay=0.1, maximize=True), id="sgd"),
    pytest.param("SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(nesterov=True), id="sgd-nesterov-on"),
    pytest.param("SGD", torch.optim.SGD, dict(lr=0.1), dict(momentum=0.9), id="sgd-momentum-on"),
    pytest.param("SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(momentum=0.0), id="sgd-momentum-off"),
]


@pytest.mark.parametrize("name,ref_cls,kwargs,change", HPARAM_CHANGES)
def test_hyperparameters_changed_between_steps_take_effect(name, ref_cls, kwargs, change):
    """Editing param_groups between steps (as schedulers and users do) acts as in torch."""
    params = make_params()
    grads = make_grads(steps=STEPS)
    runs = []
    for factory in (fo_factory(name, **kwargs), torch_ref(ref_cls, **kwargs)):
        ps = clone_params(params)
        opt = factory(ps)
        for k, row in enumerate(grads):
            if k == 3:
                opt.param_groups[0].update(copy.deepcopy(change))
            set_grads(ps, row)
            opt.step()
        runs.append((ps, opt))
    (got_p, got_opt), (ref_p, ref_opt) = runs
    assert_optimizers_match(got_p, got_opt, ref_p, ref_opt)


@pytest.mark.parametrize("name,ref_cls,kwargs", [
    pytest.param("AdamW", torch.optim.AdamW, dict(lr=0.01), id="adamw-cycles-betas"),
    pytest.param("SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9), id="sgd-cycles-momentum"),
])
def test_one_cycle_lr_scheduler_drives_both(name, ref_cls, kwargs):
    """OneCycleLR changes lr and beta1 / momentum in the param groups every step."""
    params = make_params()
    grads = make_grads(steps=STEPS)
    runs = []
    for factory in (fo_factory(name, **kwargs), torch_ref(ref_cls, **kwargs)):
        ps = clone_params(params)
        opt = factory(ps)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS,
                                                    cycle_momentum=True)
        for row in grads:
            set_grads(ps, row)
            opt.step()
            sched.step()
        runs.append((ps, opt))
    (got_p, got_opt), (ref_p, ref_opt) = runs
    assert_optimizers_match(got_p, got_opt, ref_p, ref_opt)


TRAIN_CASES = OPT_CASES + [
    pytest.param("SGD", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True,
                                              weight_decay=1e-3), id="sgd-nesterov"),
]


@pytest.mark.parametrize("name,ref_cls,kwargs", TRAIN_CASES)
def test_tiny_model_trains_like_torch(name, ref_cls, kwargs):
    model_f = tiny_model()
    model_t = copy.deepcopy(model_f)
    opt_f = getattr(fusedopt, name)(model_f.parameters(), **copy.deepcopy(kwargs))
    opt_t = ref_cls(model_t.parameters(), foreach=False, **copy.deepcopy(kwargs))
    losses = {"f": [], "t": []}
    for x, y in batches(5):
        for key, model, opt in (("f", model_f, opt_f), ("t", model_t, opt_t)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["f"]), torch.tensor(losses["t"]))
    assert losses["t"][-1] != losses["t"][0]
    for (n, pf), pt in zip(model_f.named_parameters(), model_t.parameters(), strict=True):
        assert_close(pf, pt, msg=n)
        assert_state_matches(opt_f.state[pf], opt_t.state[pt], torch.float32, msg=n)


# --------------------------------------------------------------------------------------------
# torch implementation switches, named parameters
# --------------------------------------------------------------------------------------------

SWITCHES = {
    "AdamW": [dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False),
              dict(capturable=True), dict(differentiable=False)],
    "Adam": [dict(foreach=True), dict(foreach=False), dict(fused=True), dict(capturable=True),
             dict(differentiable=False)],
    "SGD": [dict(foreach=True), dict(foreach=False), dict(fused=True), dict(differentiable=False)],
}


@pytest.mark.parametrize(
    "name,ref_cls,kwargs,switch",
    [pytest.param(n, c, kw, sw, id=f"{n}-{next(iter(sw))}={next(iter(sw.values()))}")
     for n, c, kw in [("AdamW", torch.optim.AdamW, dict(lr=0.01)),
                      ("Adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.1)),
                      ("SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9))]
     for sw in SWITCHES[n]],
)
def test_implementation_switches_are_accepted_and_ignored(name, ref_cls, kwargs, switch):
    params = make_params()
    grads = make_grads(steps=STEPS)
    base_p, base_opt = run_steps(fo_factory(name, **kwargs), params, grads)
    sw_p, sw_opt = run_steps(fo_factory(name, **kwargs, **switch), params, grads)
    for i, (a, b) in enumerate(zip(sw_p, base_p, strict=True)):
        assert_bits_equal(a.detach(), b.detach(), msg=f"param {i} with {switch}")
    ref_p, ref_opt = run_steps(torch_ref(ref_cls, **kwargs), params, grads)
    assert_optimizers_match(sw_p, sw_opt, ref_p, ref_opt)


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD"])
def test_differentiable_true_raises_value_error(name):
    with pytest.raises(ValueError):
        getattr(fusedopt, name)(make_params(), differentiable=True)


@pytest.mark.parametrize("name,ref_cls,kwargs", OPT_CASES)
def test_named_parameters(name, ref_cls, kwargs):
    model_f = tiny_model()
    model_t = copy.deepcopy(model_f)
    opt_f = getattr(fusedopt, name)(model_f.named_parameters(), **copy.deepcopy(kwargs))
    opt_t = ref_cls(model_t.named_parameters(), foreach=False, **copy.deepcopy(kwargs))
    for x, y in batches(3):
        for model, opt in ((model_f, opt_f), (model_t, opt_t)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    sd_f, sd_t = opt_f.state_dict(), opt_t.state_dict()
    assert sd_f["param_groups"][0]["param_names"] == sd_t["param_groups"][0]["param_names"]
    assert sd_f["param_groups"][0]["param_names"] == [n for n, _ in model_f.named_parameters()]
    assert sd_f["param_groups"][0]["params"] == sd_t["param_groups"][0]["params"]
    for (n, pf), pt in zip(model_f.named_parameters(), model_t.parameters(), strict=True):
        assert_close(pf, pt, msg=n)


def test_named_parameter_groups():
    model_f = tiny_model()
    model_t = copy.deepcopy(model_f)

    def groups(model):
        named = list(model.named_parameters())
        return [dict(params=named[:2], weight_decay=0.0), dict(params=named[2:], lr=0.02)]

    opt_f = fusedopt.AdamW(groups(model_f), lr=0.01)
    opt_t = torch.optim.AdamW(groups(model_t), lr=0.01, foreach=False)
    for x, y in batches(3):
        for model, opt in ((model_f, opt_f), (model_t, opt_t)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    gf, gt = opt_f.state_dict()["param_groups"], opt_t.state_dict()["param_groups"]
    assert [g["param_names"] for g in gf] == [g["param_names"] for g in gt]
    for (n, pf), pt in zip(model_f.named_parameters(), model_t.parameters(), strict=True):
        assert_close(pf, pt, msg=n)

