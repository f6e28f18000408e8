"""fusedopt.averaging.EMA / SWA against torch.optim.swa_utils.AveragedModel and against fp32
references computed here."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from conftest import assert_bits_equal
from conftest import make_params as _make_params
from fusedopt.averaging import EMA, SWA

UPDATES = 6
# Odd sizes, a 2-D param, and one tensor over the CPU kernel's 32768-element chunk.
SHAPES = [(1,), (7,), (1023,), (33000,), (37, 29)]
OTHER_SHAPES = [(1,), (7,), (1023,), (33000,), (29, 37)]  # last one transposed


def make_params(shapes=SHAPES, **kwargs):
    return _make_params(shapes, **kwargs)

# Tolerance (fp32 averages): both sides compute avg + w * (p - avg) (torch: lerp / running
# mean) in fp32; only FMA use and w = 1/n vs "/ n" differ, a few ulps per update. The
# averages move by O(0.1) per update here, far outside this band.
FP32_TOL = dict(rtol=1e-5, atol=1e-6)


def perturb(params, k):
    """Move the live params (as an optimizer would), deterministically per update k."""
    gen = torch.Generator().manual_seed(100 + k)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype).mul_(0.3))


def module_with(params):
    """An nn.Module whose parameters() are `params` (for AveragedModel)."""
    m = nn.Module()
    m.ps = nn.ParameterList(params)
    return m


def assert_averages(got, expected, msg=""):
    for i, (a, e) in enumerate(zip(got, expected, strict=True)):
        assert a.dtype == torch.float32, f"{msg} average {i} is {a.dtype}"
        torch.testing.assert_close(a, e.float(), **FP32_TOL, msg=lambda m: f"{msg} average {i}: {m}")


def assert_far(a_list, b_list, at_least=1e-2):
    """The comparison is meaningful: the two sides being told apart differ by far more than tol."""
    diff = max((a.double() - b.double()).abs().max().item() for a, b in zip(a_list, b_list))
    assert diff > at_least, f"test setup: only {diff} apart"


def with_transposed(params):
    """Add a dense non-contiguous (transposed) param to the standard set."""
    t = nn.Parameter(torch.randn(6, 5, dtype=torch.float64).to(params[0].dtype).t())
    assert not t.is_contiguous()
    return params + [t]


# --------------------------------------------------------------------------------------------
# EMA and SWA against AveragedModel (fp32 params).
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.9, 0.5, 0.99])
def test_ema_matches_averaged_model(decay):
    params = with_transposed(make_params())
    ema = EMA(params, decay=decay)
    # AveragedModel's first update_parameters() copies; EMA starts as that copy.
    ref = AveragedModel(module_with(params), multi_avg_fn=get_ema_multi_avg_fn(decay))
    ref.update_parameters(module_with(params))
    start = [p.detach().clone() for p in params]
    for k in range(UPDATES):
        perturb(params, k)
        ema.update()
        ref.update_parameters(module_with(params))
    assert_averages(ema.averages, list(ref.module.parameters()), msg=f"decay={decay}")
    assert_far(ema.averages, start, at_least=0.02)
    assert_far(ema.averages, [p.detach() for p in params], at_least=0.02)
    assert ema.num_updates == UPDATES and ema.num_calls == UPDATES


def test_swa_matches_averaged_model():
    params = with_transposed(make_params())
    swa = SWA(params)
    ref = AveragedModel(module_with(params))
    for k in range(UPDATES):
        perturb(params, k)
        swa.update()
        ref.update_parameters(module_with(params))
        if k == 0:  # the first update copies, exactly
            for a, p in zip(swa.averages, params):
                assert_bits_equal(a, p.detach())
        assert_averages(swa.averages, list(ref.module.parameters()), msg=f"after update {k}")
    assert swa.n == UPDATES == int(ref.n_averaged)
    assert_far(swa.averages, [p.detach() for p in params], at_least=0.05)


def test_swa_starts_as_copy_and_excludes_starting_params():
    params = make_params()
    start = [p.detach().clone() for p in params]
    swa = SWA(params)
    for a, s in zip(swa.averages, start):
        assert_bits_equal(a, s)
    seen = []
    for k in range(3):
        perturb(params, k)
        seen.append([p.detach().clone() for p in params])
        swa.update()
    mean = [sum(s[i].double() for s in seen) / 3 for i in range(len(params))]
    assert_averages(swa.averages, mean)


# --------------------------------------------------------------------------------------------
# Low-precision params: fp32 averages against an fp32 reference computed here.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["EMA", "SWA"])
def test_low_precision_params_have_fp32_averages(dtype, kind):
    params = with_transposed(make_params(dtype=dtype))
    avg = EMA(params, decay=0.8) if kind == "EMA" else SWA(params)
    ref = [p.detach().double() for p in params]  # float64 reference average
    for k in range(UPDATES):
        perturb(params, k)
        avg.update()
        for r, p in zip(ref, params):
            if kind == "EMA":
                r.mul_(0.8).add_(0.2 * p.detach().double())
            else:
                r.add_((p.detach().double() - r) / (k + 1)) if k else r.copy_(p.detach().double())
    for a, p in zip(avg.averages, params):
        assert a.dtype == torch.float32 and a.shape == p.shape and a.stride() == p.stride()
    assert_averages(avg.averages, ref, msg=f"{kind} {dtype}")
    # The point of fp32 averages: they keep bits a bf16/fp16 average would round away.
    rounded = [a.to(dtype).float() for a in avg.averages]
    assert any(not torch.equal(a, r) for a, r in zip(avg.averages, rounded))


# --------------------------------------------------------------------------------------------
# every / warmup
# --------------------------------------------------------------------------------------------


def test_ema_every_k_calls():
    params = make_params()
    ema = EMA(params, decay=0.7, every=3)
    ref = [p.detach().double() for p in params]
    for call in range(1, 8):
        perturb(params, call)
        ema.update()
        if call % 3 == 0:
            for r, p in zip(ref, params):
                r.mul_(0.7).add_(0.3 * p.detach().double())
    assert ema.num_calls == 7 and ema.num_updates == 2
    assert_averages(ema.averages, ref)


def test_swa_every_k_calls():
    params = make_params()
    swa = SWA(params, every=2)
    kept = []
    for call in range(1, 8):
        perturb(params, call)
        swa.update()
        if call % 2 == 0:
            kept.append([p.detach().double() for p in params])
    assert swa.n == 3
    assert_averages(swa.averages, [sum(k[i] for k in kept) / 3 for i in range(len(params))])


def test_ema_warmup_decay():
    params = make_params()
    decay, warmup = 0.95, 4
    ema = EMA(params, decay=decay, warmup=warmup)
    ref = [p.detach().double() for p in params]
    used = [0.1, 2 / 11, 3 / 12, 4 / 13, decay, decay]  # min(decay, (1+n)/(10+n)), n = 0, 1, ...
    for k in range(len(used)):
        assert ema.current_decay() == pytest.approx(used[k], rel=1e-15)
        perturb(params, k)
        ema.update()
        for r, p in zip(ref, params):
            r.mul_(used[k]).add_((1 - used[k]) * p.detach().double())
    assert_averages(ema.averages, ref)
    # warmup caps the decay only while (1+n)/(10+n) is below it
    small = EMA(make_params(), decay=0.05, warmup=10)
    assert small.current_decay() == 0.05


# --------------------------------------------------------------------------------------------
# average_parameters(): swap in, restore bit-exactly.
# --------------------------------------------------------------------------------------------


def special_params(dtype):
    """Params with -0.0, a NaN payload, infs and denormal-ish values, plus a transposed one."""
    params = with_transposed(make_params(dtype=dtype))
    with torch.no_grad():
        params[1][0] = -0.0
        params[1][1] = float("nan")
        params[1][2] = float("inf")
        params[2][:5] = torch.tensor([1e-40, -1e-40, 3.0e38, -2.0, 0.0]).to(dtype)
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["EMA", "SWA"])
def test_average_parameters_swaps_and_restores_bit_exactly(dtype, kind):
    params = special_params(dtype)
    avg = EMA(params, decay=0.6) if kind == "EMA" else SWA(params)
    for k in range(3):
        perturb(params, k)
        avg.update()
    perturb(params, 99)  # live params differ from the averages
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    before = [p.detach().clone() for p in params]
    ids = [id(p) for p in params]
    with avg.average_parameters():
        for p, a, b in zip(params, avg.averages, before):
            assert_bits_equal(p.detach(), a.to(dtype))  # the (rounded) average is in
        assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before))
    for p, b in zip(params, before):
        assert_bits_equal(p.detach(), b)
        assert_bits_equal(p.grad, torch.full_like(p, 7.0))
    assert [id(p) for p in params] == ids


def test_average_parameters_restores_when_the_body_raises():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)).to(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    perturb(list(model.parameters()), 0)
    ema.update()
    perturb(list(model.parameters()), 1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyError, match="boom"):
        with ema.average_parameters():
            assert not torch.equal(next(model.parameters()), before[0])
            raise KeyError("boom")
    for p, b in zip(model.parameters(), before):
        assert_bits_equal(p.detach(), b)
    with ema.average_parameters():  # usable again
        pass
    ema.update()  # and not stuck in "inside the context" mode


def test_update_or_reentry_inside_context_is_an_error():
    params = make_params()
    ema = EMA(params)
    before = [p.detach().clone() for p in params]
    with ema.average_parameters():
        with pytest.raises(RuntimeError, match="average"):
            ema.update()
        with pytest.raises(RuntimeError, match="already"):
            with ema.average_parameters():
                pass
    for p, b in zip(params, before):
        assert_bits_equal(p.detach(), b)
    assert ema.num_calls == 0


def test_average_parameters_gives_the_averaged_model_output():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    swa = SWA(model)
    ref = AveragedModel(model)
    x = torch.randn(4, 5)
    for k in range(4):
        perturb(list(model.parameters()), k)
        swa.update()
        ref.update_parameters(model)
    live = model(x)
    with swa.average_parameters():
        out = model(x)
    torch.testing.assert_close(out, ref(x), **FP32_TOL)
    assert (out - live).abs().max() > 0.05
    torch.testing.assert_close(model(x), live, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# copy_to, module input, state dicts
# --------------------------------------------------------------------------------------------


def test_copy_to_other_params_and_self():
    params = make_params(dtype=torch.bfloat16)
    ema = EMA(params, decay=0.5)
    perturb(params, 0)
    ema.update()
    other = make_params(dtype=torch.float32, seed=5)
    ema.copy_to(other)
    for o, a in zip(other, ema.averages):
        assert_bits_equal(o.detach(), a)
    ema.copy_to()  # into the averaged (bf16) params themselves
    for p, a in zip(params, ema.averages):
        assert_bits_equal(p.detach(), a.to(torch.bfloat16))
    with pytest.raises(ValueError, match="shape"):
        ema.copy_to(make_params(shapes=OTHER_SHAPES))
    with pytest.raises(ValueError, match="4 params"):
        ema.copy_to(other[:4])


def test_module_input_trainable_params_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False), nn.LayerNorm(10))
    model[1].weight = model[0].weight  # tied (both (10, 4))
    model[2].bias.requires_grad_(False)
    ema = EMA(model)
    expected = [model[0].weight, model[2].weight]  # tied weight once, frozen bias left out
    assert len(ema.averages) == 2
    for a, p in zip(ema.averages, expected):
        assert_bits_equal(a, p.detach())


@pytest.mark.parametrize("kind", ["EMA", "SWA"])
def test_state_dict_round_trip_and_resume(kind):
    def make(ps):
        return EMA(ps, decay=0.8, every=2, warmup=3) if kind == "EMA" else SWA(ps, every=2)

    params = make_params(dtype=torch.bfloat16)
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    full, part = make(params), make(twin)
    for k in range(5):  # part: 5 calls, then checkpoint
        perturb(params, k)
        perturb(twin, k)
        full.update()
        part.update()
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    loaded = make([nn.Parameter(p.detach().clone()) for p in twin])
    resumed_params = loaded._params
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    for a, b in zip(loaded.averages, full.averages):
        assert_bits_equal(a, b)
    assert loaded.num_calls == 5
    if kind == "EMA":
        assert loaded.num_updates == 2 and loaded.current_decay() == full.current_decay() == 3 / 12
    else:
        assert loaded.n == 2
    for k in range(5, 10):
        perturb(params, k)
        perturb(resumed_params, k)
        full.update()
        loaded.update()
    for a, b in zip(loaded.averages, full.averages):
        assert_bits_equal(a, b)  # same counters -> same weights -> same bits


def test_load_state_dict_rejects_mismatches_and_changes_nothing():
    ema = EMA(make_params(), decay=0.9)
    snap = [a.clone() for a in ema.averages]
    good = EMA(make_params(seed=3), decay=0.5).state_dict()
    bad_shape = EMA(make_params(shapes=OTHER_SHAPES)).state_dict()
    cases = [
        (SWA(make_params()).state_dict(), "SWA"),
        (EMA(make_params()[:3]).state_dict(), "3 averages"),
        (bad_shape, r"averages\[4\]"),
        ({k: v for k, v in good.items() if k != "num_updates"}, "num_updates"),
        ({**good, "decay": 1.5}, "decay"),
    ]
    for sd, word in cases:
        with pytest.raises(ValueError, match=word):
            ema.load_state_dict(sd)
        for a, s in zip(ema.averages, snap):
            assert_bits_equal(a, s)
        assert ema.decay == 0.9
    ema.load_state_dict(good)
    assert ema.decay == 0.5 and not torch.equal(ema.averages[0], snap[0])


@pytest.mark.parametrize("make,err,word", [
    (lambda: EMA(make_params(), decay=-0.1), ValueError, "decay"),
    (lambda: EMA(make_params(), decay=1.01), ValueError, "decay"),
    (lambda: EMA(make_params(), decay=float("nan")), ValueError, "decay"),
    (lambda: EMA(make_params(), every=0), ValueError, "every"),
    (lambda: EMA(make_params(), warmup=-1), ValueError, "warmup"),
    (lambda: SWA(make_params(), every=1.5), ValueError, "every"),
    (lambda: SWA([]), ValueError, "empty"),
    (lambda: SWA([torch.zeros(3, dtype=torch.float64)]), ValueError, "float64"),
    (lambda: SWA([torch.zeros(3), "w"]), TypeError, r"params\[1\]"),
    (lambda: EMA(3.0), TypeError, "iterable"),
    (lambda: EMA([torch.zeros(4, 4)[:, :2]]), ValueError, "dense"),
    (lambda: (lambda p: EMA([p, p]))(torch.zeros(3)), ValueError, "more than once"),
])
def test_argument_errors(make, err, word):
    with pytest.raises(err, match=word):
        make()


def test_decay_bounds_are_allowed():
    params = make_params()
    start = [p.detach().clone() for p in params]
    frozen = EMA(params, decay=1.0)
    follow = EMA(params, decay=0.0)
    perturb(params, 0)
    frozen.update()
    follow.update()
    for a, s in zip(frozen.averages, start):
        assert_bits_equal(a, s)  # weight 0: untouched
    # weight 1: avg + (p - avg) == p up to the rounding of (p - avg), 1 ulp of |p - avg|
    assert_averages(follow.averages, [p.detach() for p in params])
    assert_far(follow.averages, start, at_least=0.1)


@pytest.mark.parametrize("kind", ["EMA", "SWA"])
def test_empty_and_zero_dim_params(kind):
    params = [nn.Parameter(torch.tensor(1.5)), nn.Parameter(torch.ones(0)), nn.Parameter(torch.ones(3, 0, 2)),
              nn.Parameter(torch.full((5,), 2.0, dtype=torch.float16))]
    avg = EMA(params, decay=0.5) if kind == "EMA" else SWA(params)
    for _ in range(2):
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        avg.update()
    # EMA: 0.5 * (0.5 * x + 0.5 * (x + 1)) + 0.5 * (x + 2) = x + 1.25; SWA: mean(x + 1, x + 2)
    shift = 1.25 if kind == "EMA" else 1.5
    assert avg.averages[0].item() == 1.5 + shift
    assert torch.equal(avg.averages[3], torch.full((5,), 2.0 + shift))
    assert [tuple(a.shape) for a in avg.averages[1:3]] == [(0,), (3, 0, 2)]
    with avg.average_parameters():
        assert params[0].item() == 1.5 + shift
    assert params[0].item() == 3.5
