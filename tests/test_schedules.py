"""fusedopt.schedules.WSD / WarmupCosine against closed-form formulas written here (API.md)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as torch_sched

import fusedopt
from fusedopt.schedules import WSD, WarmupCosine

BASE_LRS = (0.1, 0.03)  # two groups with different initial lrs

# --------------------------------------------------------------------------------------------
# References: the formulas of API.md, written out independently of the library.
# --------------------------------------------------------------------------------------------


def g_ref(shape, s):
    return {
        "linear": 1 - s,
        "1-sqrt": 1 - math.sqrt(s),
        "cosine": (1 + math.cos(math.pi * s)) / 2,
        "square": 1 - s**2,
    }[shape]


def wsd_ref(t, warmup_steps, total_steps, cooldown_fraction=0.2, shape="1-sqrt", warmup_start_factor=0.01,
            final_factor=0.0):
    c = round(cooldown_fraction * total_steps)
    if t < warmup_steps:
        return warmup_start_factor + (1 - warmup_start_factor) * t / warmup_steps
    if t >= total_steps:
        return final_factor
    if t < total_steps - c:
        return 1.0
    s = (t - (total_steps - c)) / c
    return final_factor + (1 - final_factor) * g_ref(shape, s)


def warmup_cosine_ref(t, warmup_steps, total_steps, warmup_start_factor=0.01, final_factor=0.0):
    if t < warmup_steps:
        return warmup_start_factor + (1 - warmup_start_factor) * t / warmup_steps
    if t >= total_steps:
        return final_factor
    s = (t - warmup_steps) / (total_steps - warmup_steps)
    return final_factor + (1 - final_factor) * (1 + math.cos(math.pi * s)) / 2


def make_optimizer(lr_type=float, cls=torch.optim.SGD):
    params = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))]
    groups = [{"params": [p], "lr": lr_type(lr)} for p, lr in zip(params, BASE_LRS)]
    return cls(groups, lr=lr_type(BASE_LRS[0]))


def tensor_lr(x):
    return torch.tensor(x, dtype=torch.float64)


def run(opt, sched, steps):
    """lrs of every group before each optimizer step (t = 0 .. steps-1), then one more."""
    out = []
    for _ in range(steps):
        out.append([float(g["lr"]) for g in opt.param_groups])
        opt.step()
        sched.step()
    out.append([float(g["lr"]) for g in opt.param_groups])
    return out


def assert_lrs(got, expected_factor, rel=1e-12, msg=""):
    for t, row in enumerate(got):
        for gi, (lr, base) in enumerate(zip(row, BASE_LRS)):
            want = base * expected_factor(t)
            assert math.isclose(lr, want, rel_tol=rel, abs_tol=1e-15), f"{msg} t={t} group {gi}: {lr} != {want}"


# --------------------------------------------------------------------------------------------
# Closed-form values at every step.
# --------------------------------------------------------------------------------------------

WSD_CONFIGS = [
    dict(warmup_steps=3, total_steps=20),                                       # defaults: c = 4
    dict(warmup_steps=2, total_steps=10, cooldown_fraction=0.4, final_factor=0.1, warmup_start_factor=0.2),
    dict(warmup_steps=0, total_steps=8, cooldown_fraction=1.0),                 # all cooldown
    dict(warmup_steps=5, total_steps=10, cooldown_fraction=0.5),                # no stable phase
    dict(warmup_steps=4, total_steps=12, cooldown_fraction=0.0),                # no cooldown
    dict(warmup_steps=1, total_steps=10, cooldown_fraction=0.25),               # round(2.5) == 2
    dict(warmup_steps=3, total_steps=7, cooldown_fraction=0.3, warmup_start_factor=0.0),  # round(2.1)
]


@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "cosine", "square"])
@pytest.mark.parametrize("cfg", WSD_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_wsd_closed_form_every_step(shape, cfg):
    opt = make_optimizer()
    sched = WSD(opt, shape=shape, **cfg)
    got = run(opt, sched, cfg["total_steps"] + 4)
    assert_lrs(got, lambda t: wsd_ref(t, shape=shape, **cfg), msg=f"{shape} {cfg}")
    assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]


def test_wsd_hand_computed_anchors():
    """A few values worked out by hand, independent of any formula code."""
    cases = {  # shape: lr/base at t = 8 and t = 7 (cooldown from 6 to 10, c = 4, s = 0.5 and 0.25)
        "linear": (0.5, 0.75),
        "1-sqrt": (1 - 0.5**0.5, 0.5),
        "cosine": (0.5, (1 + 0.5**0.5) / 2),
        "square": (0.75, 0.9375),
    }
    for shape, (at8, at7) in cases.items():
        opt = make_optimizer()
        sched = WSD(opt, warmup_steps=2, total_steps=10, cooldown_fraction=0.4, shape=shape,
                    warmup_start_factor=0.5)
        lrs = [row[0] / BASE_LRS[0] for row in run(opt, sched, 12)]
        assert lrs[:7] == pytest.approx([0.5, 0.75, 1, 1, 1, 1, 1], rel=1e-12)
        assert lrs[7] == pytest.approx(at7, rel=1e-12), shape
        assert lrs[8] == pytest.approx(at8, rel=1e-12), shape
        assert lrs[10:] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("cfg", [dict(warmup_steps=3, total_steps=15),
                                 dict(warmup_steps=0, total_steps=6, final_factor=0.1),
                                 dict(warmup_steps=4, total_steps=4, warmup_start_factor=0.3)])
def test_warmup_cosine_closed_form_every_step(cfg):
    opt = make_optimizer()
    sched = WarmupCosine(opt, **cfg)
    got = run(opt, sched, cfg["total_steps"] + 3)
    assert_lrs(got, lambda t: warmup_cosine_ref(t, **cfg), msg=str(cfg))


def test_long_run_has_no_drift():
    """Closed form, not a product of ratios: exact lr values over a long run."""
    opt = make_optimizer()
    sched = WSD(opt, warmup_steps=1000, total_steps=20000, shape="cosine", final_factor=0.05)
    for t in range(1, 20001):
        opt.step()
        sched.step()
        if t % 997 == 0 or t in (999, 1000, 16000, 16001, 19999, 20000):
            want = BASE_LRS[0] * wsd_ref(t, 1000, 20000, shape="cosine", final_factor=0.05)
            assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-14, abs=0), t


# --------------------------------------------------------------------------------------------
# Tensor lrs: updated in place.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, fusedopt.AdamW], ids=["torch.SGD", "fusedopt.AdamW"])
@pytest.mark.parametrize("sched_factory", [
    lambda o: WSD(o, warmup_steps=2, total_steps=8, cooldown_fraction=0.5, shape="square"),
    lambda o: WarmupCosine(o, warmup_steps=2, total_steps=8),
], ids=["WSD", "WarmupCosine"])
def test_tensor_lr_is_filled_in_place(opt_cls, sched_factory):
    opt = make_optimizer(lr_type=lambda x: torch.tensor(x), cls=opt_cls)
    lr_objects = [g["lr"] for g in opt.param_groups]
    sched = sched_factory(opt)
    ref_opt = make_optimizer()
    ref_sched = sched_factory(ref_opt)
    for p in (p for g in opt.param_groups for p in g["params"]):
        p.grad = torch.ones_like(p)
    for t in range(10):
        for gi, group in enumerate(opt.param_groups):
            assert group["lr"] is lr_objects[gi], f"t={t}: group {gi} lr tensor was replaced"
            assert group["lr"].dtype == torch.float32 and group["lr"].dim() == 0
            want = ref_opt.param_groups[gi]["lr"]
            assert float(group["lr"]) == pytest.approx(want, rel=1e-6, abs=1e-9), f"t={t} group {gi}"
        last = sched.get_last_lr()
        assert all(isinstance(x, torch.Tensor) and x is not lr for x, lr in zip(last, lr_objects))
        assert [float(x) for x in last] == [float(lr) for lr in lr_objects]
        opt.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
    assert float(lr_objects[0]) == 0.0  # past total_steps with final_factor=0: the value moved


def test_tensor_lr_in_place_even_if_base_class_assigns(monkeypatch):
    """Older torch assigned group["lr"] = value; step() still fills the same tensor."""
    def assign(group, key, val):
        group[key] = float(val)

    monkeypatch.setattr(torch_sched, "_update_param_group_val", assign)
    opt = make_optimizer(lr_type=tensor_lr)
    lr0 = opt.param_groups[0]["lr"]
    sched = WSD(opt, warmup_steps=2, total_steps=6, cooldown_fraction=0.5, shape="linear")
    for t in range(1, 7):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] is lr0
        assert float(lr0) == pytest.approx(BASE_LRS[0] * wsd_ref(t, 2, 6, 0.5, "linear"), rel=1e-12)


# --------------------------------------------------------------------------------------------
# state_dict round trip and resume; chaining.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr_type", [float, tensor_lr], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("factory", [
    lambda o: WSD(o, warmup_steps=3, total_steps=12, cooldown_fraction=0.5, shape="cosine", final_factor=0.1),
    lambda o: WarmupCosine(o, warmup_steps=3, total_steps=12),
], ids=["WSD", "WarmupCosine"])
def test_state_dict_resume_matches_uninterrupted(lr_type, factory):
    full_opt = make_optimizer(lr_type)
    full = factory(full_opt)
    want = run(full_opt, full, 15)

    opt = make_optimizer(lr_type)
    sched = factory(opt)
    first = run(opt, sched, 5)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    opt2 = make_optimizer(lr_type)
    sched2 = factory(opt2)  # fresh: back at step 0
    assert [float(g["lr"]) for g in opt2.param_groups] == want[0]
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert sched2.last_epoch == 5 and sched2.get_last_lr() == sched.get_last_lr()
    rest = run(opt2, sched2, 10)
    assert first[:5] + rest == want  # bit-exact: same closed form from the same step


@pytest.mark.parametrize("lr_type", [float, tensor_lr], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("factory", [
    lambda o: WSD(o, warmup_steps=5, total_steps=20),
    lambda o: WarmupCosine(o, warmup_steps=5, total_steps=20),
], ids=["WSD", "WarmupCosine"])
def test_loaded_onto_a_fresh_optimizer_continues_the_closed_form(lr_type, factory):
    """Issue 13.1: the fresh optimizer holds the warmup-start lr (1% of the initial lr) when the
    saved scheduler state arrives; the next lrs must still be initial_lr * factor(t), not 1% of it."""
    opt = make_optimizer(lr_type)
    sched = factory(opt)
    want = run(opt, sched, 12)
    opt = make_optimizer(lr_type)
    sched = factory(opt)
    run(opt, sched, 7)
    saved = sched.state_dict()
    opt2 = make_optimizer(float)  # as in the report: the saved run had a tensor lr, the new one a float
    sched2 = factory(opt2)
    sched2.load_state_dict(saved)
    assert run(opt2, sched2, 5)[1:] == want[8:13]


def test_chainable_resume_with_the_optimizer_state_continues_the_chain():
    """chainable=True reads the chained lr off the optimizer: resumed with the optimizer's state
    dict (which holds that lr) it continues the chain exactly."""
    gamma = 0.9
    cfg = dict(warmup_steps=3, total_steps=12, cooldown_fraction=0.5, shape="linear")

    def build():
        o = make_optimizer()
        return o, WSD(o, **cfg, chainable=True), torch_sched.ExponentialLR(o, gamma)

    opt, wsd, exp = build()
    for _ in range(6):
        opt.step()
        wsd.step()
        exp.step()
    saved = (wsd.state_dict(), exp.state_dict(), opt.state_dict())
    opt2, wsd2, exp2 = build()
    opt2.load_state_dict(saved[2])
    wsd2.load_state_dict(saved[0])
    exp2.load_state_dict(saved[1])
    got = []
    for _ in range(3):
        opt2.step()
        wsd2.step()
        exp2.step()
        got.append([g["lr"] for g in opt2.param_groups])
    # ExponentialLR multiplies the group's current lr by gamma each step; its chain with WSD
    # gives wsd(t) * gamma**t.
    for i, lrs in enumerate(got):
        t = 7 + i
        for lr, base in zip(lrs, BASE_LRS):
            assert lr == pytest.approx(base * wsd_ref(t, **cfg) * gamma**t, rel=1e-10), t


def test_plain_schedule_ignores_an_lr_set_by_hand():
    """Without chainable, the closed form owns the lr: a hand-set lr is overwritten next step."""
    cfg = dict(warmup_steps=2, total_steps=10, cooldown_fraction=0.3, shape="linear")
    opt = make_optimizer()
    sched = WSD(opt, **cfg)
    opt.step()
    sched.step()
    opt.param_groups[0]["lr"] = 123.0
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(BASE_LRS[0] * wsd_ref(2, **cfg), rel=1e-12)


@pytest.mark.parametrize("order", ["wsd-first", "other-first"])
def test_chained_with_exponential_lr(order):
    gamma = 0.9
    cfg = dict(warmup_steps=3, total_steps=12, cooldown_fraction=0.5, shape="1-sqrt", final_factor=0.2)
    opt = make_optimizer()
    wsd = WSD(opt, **cfg, chainable=True)
    exp = torch_sched.ExponentialLR(opt, gamma)
    chain = torch_sched.ChainedScheduler([wsd, exp] if order == "wsd-first" else [exp, wsd])
    got = run(opt, chain, 15)
    assert_lrs(got, lambda t: wsd_ref(t, **cfg) * gamma**t, rel=1e-10, msg=order)
    assert chain.get_last_lr() == [g["lr"] for g in opt.param_groups]


def test_chained_with_multistep_by_hand_and_linear_warmup_built_first():
    """Two schedulers stepped by hand; the other one (LinearLR) already changed the lr when
    WSD is built, and a MultiStepLR halves it later."""
    cfg = dict(warmup_steps=2, total_steps=10, cooldown_fraction=0.3, shape="linear")
    opt = make_optimizer()
    lin = torch_sched.LinearLR(opt, start_factor=0.5, total_iters=4)
    wsd = WSD(opt, **cfg, chainable=True)
    ms = torch_sched.MultiStepLR(opt, milestones=[5], gamma=0.5)

    def lin_ref(t):
        return 0.5 + 0.5 * min(t, 4) / 4

    got = []
    for _ in range(12):
        got.append([g["lr"] for g in opt.param_groups])
        opt.step()
        lin.step()
        wsd.step()
        ms.step()
    assert_lrs(got, lambda t: wsd_ref(t, **cfg) * lin_ref(t) * (0.5 if t >= 5 else 1.0), rel=1e-10)


def test_sequential_lr_first_phase_is_closed_form():
    opt = make_optimizer()
    cfg = dict(warmup_steps=2, total_steps=6, cooldown_fraction=0.5, shape="linear")
    seq = torch_sched.SequentialLR(opt, [WSD(opt, **cfg), torch_sched.ExponentialLR(opt, 0.5)], milestones=[6])
    got = run(opt, seq, 8)
    assert_lrs(got[:6], lambda t: wsd_ref(t, **cfg), msg="WSD phase")
    assert_lrs(got[6:], lambda t: 0.5**t, msg="ExponentialLR phase")


# --------------------------------------------------------------------------------------------
# Argument errors.
# --------------------------------------------------------------------------------------------

WSD_ERRORS = [
    (dict(warmup_steps=9, total_steps=10), "warmup_steps"),  # cooldown starts at 8
    (dict(warmup_steps=2, total_steps=10, shape="exp"), "shape"),
    (dict(warmup_steps=2, total_steps=10, cooldown_fraction=1.5), "cooldown_fraction"),
    (dict(warmup_steps=2, total_steps=10, cooldown_fraction=-0.1), "cooldown_fraction"),
    (dict(warmup_steps=0, total_steps=0), "total_steps"),
    (dict(warmup_steps=2, total_steps=10.0), "total_steps"),
    (dict(warmup_steps=-1, total_steps=10), "warmup_steps"),
    (dict(warmup_steps=2, total_steps=10, warmup_start_factor=1.5), "warmup_start_factor"),
    (dict(warmup_steps=2, total_steps=10, final_factor=-0.5), "final_factor"),
]


@pytest.mark.parametrize("kwargs,word", WSD_ERRORS, ids=[w + str(i) for i, (_, w) in enumerate(WSD_ERRORS)])
def test_wsd_errors_name_the_argument(kwargs, word):
    opt = make_optimizer()
    before = [g["lr"] for g in opt.param_groups]
    with pytest.raises(ValueError, match=word):
        WSD(opt, **kwargs)
    assert [g["lr"] for g in opt.param_groups] == before


def test_wsd_error_message_gives_the_numbers():
    with pytest.raises(ValueError) as e:
        WSD(make_optimizer(), warmup_steps=9, total_steps=10)
    assert "9" in str(e.value) and "8" in str(e.value)
    WSD(make_optimizer(), warmup_steps=8, total_steps=10)  # the boundary itself is fine


@pytest.mark.parametrize("kwargs,word", [
    (dict(warmup_steps=11, total_steps=10), "warmup_steps"),
    (dict(warmup_steps=1, total_steps=-3), "total_steps"),
    (dict(warmup_steps=1, total_steps=10, final_factor=2.0), "final_factor"),
])
def test_warmup_cosine_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        WarmupCosine(make_optimizer(), **kwargs)


def test_exported():
    assert fusedopt.schedules.WSD is WSD and issubclass(WSD, torch_sched.LRScheduler)
    assert issubclass(WarmupCosine, torch_sched.LRScheduler)
