"""state_dict / load_state_dict: torch's layout, cross-loading, checkpoints, bad state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fusedopt
from conftest import (
    assert_bits_equal,
    assert_close,
    assert_optimizers_match,
    assert_unchanged,
    clone_params,
    make_grads,
    make_params,
    mentions,
    names_param,
    set_grads,
    snapshot,
    torch_ref,
)

STEPS = 6
SPLIT = 3  # switch / checkpoint after this many steps

CASES = [
    pytest.param("AdamW", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1), id="adamw"),
    pytest.param("AdamW", torch.optim.AdamW, dict(lr=0.01, amsgrad=True), id="adamw-amsgrad"),
    pytest.param("Adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.1), id="adam"),
    pytest.param("Adam", torch.optim.Adam,
                 dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True),
                 id="adam-decoupled-amsgrad"),
    pytest.param("Adam", torch.optim.Adam, dict(lr=torch.tensor(0.01)), id="adam-tensor-lr"),
    pytest.param("SGD", torch.optim.SGD, dict(lr=0.1), id="sgd"),
    pytest.param("SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01), id="sgd-momentum"),
    pytest.param("SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True), id="sgd-nesterov"),
]

# param 2 never gets a grad (no state), param 4 only from step 2 on
NONE = lambda k, i: i == 2 or (i == 4 and k < 2)  # noqa: E731


def fo(name, kwargs):
    return lambda ps: getattr(fusedopt, name)(ps, **copy.deepcopy(kwargs))


def build_groups(ps):
    return [dict(params=ps[:2]), dict(params=ps[2:], lr=0.02)]


def run(factory, ps, grads):
    opt = factory(ps)
    for row in grads:
        set_grads(ps, row)
        opt.step()
    return opt


def continue_run(opt, ps, grads):
    for row in grads:
        set_grads(ps, row)
        opt.step()


@pytest.mark.parametrize("name,ref_cls,kwargs", CASES)
def test_state_dict_layout_equals_torch(name, ref_cls, kwargs):
    params = make_params()
    grads = make_grads(steps=SPLIT, none=NONE)
    ps_f, ps_t = clone_params(params), clone_params(params)
    opt_f = run(fo(name, kwargs), ps_f, grads)
    opt_t = run(torch_ref(ref_cls, **kwargs), ps_t, grads)
    sd_f, sd_t = opt_f.state_dict(), opt_t.state_dict()
    assert set(sd_f) == set(sd_t) == {"state", "param_groups"}
    # same params have state, with the same keys, shapes, dtypes and devices
    assert set(sd_f["state"]) == set(sd_t["state"])
    for idx, st_t in sd_t["state"].items():
        st_f = sd_f["state"][idx]
        assert set(st_f) == set(st_t), f"param {idx}: {set(st_f)} vs torch {set(st_t)}"
        for key, v_t in st_t.items():
            v_f = st_f[key]
            assert torch.is_tensor(v_f), (idx, key)
            assert (v_f.shape, v_f.dtype, v_f.device) == (v_t.shape, v_t.dtype, v_t.device), (idx, key)
            if key == "step":
                assert float(v_f) == float(v_t)
            else:
                assert_close(v_f, v_t, msg=f"param {idx} {key}")
    # same group keys (a default fusedopt state dict is a valid torch one), same hparams
    assert len(sd_f["param_groups"]) == len(sd_t["param_groups"])
    for gf, gt in zip(sd_f["param_groups"], sd_t["param_groups"]):
        assert set(gf) == set(gt), f"group keys {sorted(gf)} vs torch {sorted(gt)}"
        assert gf["params"] == gt["params"]
        for k in set(gt) - {"params", "foreach", "fused", "capturable", "differentiable"}:
            assert gf[k] == gt[k] if not torch.is_tensor(gt[k]) else torch.equal(gf[k], gt[k]), k


@pytest.mark.parametrize("name,ref_cls,kwargs", CASES)
def test_group_keys_with_several_groups_equal_torch(name, ref_cls, kwargs):
    params = make_params()
    grads = make_grads(steps=2)
    opt_f = run(lambda ps: getattr(fusedopt, name)(build_groups(ps), **copy.deepcopy(kwargs)),
                clone_params(params), grads)
    opt_t = run(lambda ps: ref_cls(build_groups(ps), foreach=False, **copy.deepcopy(kwargs)),
                clone_params(params), grads)
    gf, gt = opt_f.state_dict()["param_groups"], opt_t.state_dict()["param_groups"]
    assert [sorted(g) for g in gf] == [sorted(g) for g in gt]
    assert [g["params"] for g in gf] == [g["params"] for g in gt]


@pytest.mark.parametrize("name,ref_cls,kwargs", CASES)
def test_torch_state_dict_loads_into_fusedopt_and_training_continues(name, ref_cls, kwargs):
    params = make_params()
    grads = make_grads(steps=STEPS, none=NONE)
    # uninterrupted torch run
    ps_ref = clone_params(params)
    opt_ref = run(torch_ref(ref_cls, **kwargs), ps_ref, grads)
    # torch for SPLIT steps, then fusedopt takes over from torch's params and state dict
    ps_t = clone_params(params)
    opt_t = run(torch_ref(ref_cls, **kwargs), ps_t, grads[:SPLIT])
    ps_f = clone_params(ps_t)
    opt_f = getattr(fusedopt, name)(ps_f, **copy.deepcopy(kwargs))
    opt_f.load_state_dict(opt_t.state_dict())
    continue_run(opt_f, ps_f, grads[SPLIT:])
    assert_optimizers_match(ps_f, opt_f, ps_ref, opt_ref)


@pytest.mark.parametrize("name,ref_cls,kwargs", CASES)
def test_fusedopt_state_dict_loads_into_torch_and_training_continues(name, ref_cls, kwargs):
    params = make_params()
    grads = make_grads(steps=STEPS, none=NONE)
    ps_ref = clone_params(params)
    opt_ref = run(torch_ref(ref_cls, **kwargs), ps_ref, grads)
    ps_f = clone_params(params)
    opt_f = run(fo(name, kwargs), ps_f, grads[:SPLIT])
    ps_t = clone_params(ps_f)
    opt_t = ref_cls(ps_t, foreach=False, **copy.deepcopy(kwargs))
    opt_t.load_state_dict(opt_f.state_dict())
    continue_run(opt_t, ps_t, grads[SPLIT:])
    assert_optimizers_match(ps_t, opt_t, ps_ref, opt_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,ref_cls,kwargs", CASES)
def test_checkpoint_roundtrip_weights_only_resumes_bit_exactly(name, ref_cls, kwargs, dtype):
    params = make_params(dtype=dtype)
    grads = make_grads(steps=STEPS, dtype=dtype, none=NONE)
    # uninterrupted fusedopt run, with two param groups
    factory = lambda ps: getattr(fusedopt, name)(build_groups(ps), **copy.deepcopy(kwargs))  # noqa: E731
    ps_ref = clone_params(params)
    opt_ref = run(factory, ps_ref, grads)
    # SPLIT steps, torch.save, torch.load(weights_only=True) into a fresh optimizer, continue
    ps_a = clone_params(params)
    opt_a = run(factory, ps_a, grads[:SPLIT])
    buf = io.BytesIO()
    torch.save({"optim": opt_a.state_dict(), "params": [p.detach() for p in ps_a]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    ps_b = [nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt_b = factory(ps_b)
    opt_b.load_state_dict(ckpt["optim"])
    continue_run(opt_b, ps_b, grads[SPLIT:])
    for i, (pb, pr) in enumerate(zip(ps_b, ps_ref, strict=True)):
        assert_bits_equal(pb.detach(), pr.detach(), msg=f"param {i}")
        sb, sr = opt_b.state.get(pb, {}), opt_ref.state.get(pr, {})
        assert set(sb) == set(sr), i
        for k in sr:
            assert_bits_equal(sb[k], sr[k], msg=f"param {i} state[{k}]")
    for gb, gr in zip(opt_b.param_groups, opt_ref.param_groups):
        assert float(gb["lr"]) == float(gr["lr"])


def test_load_state_dict_keeps_saved_state_dtypes():
    """torch's own loader casts floating state to the param dtype; fusedopt must not."""
    params = make_params(dtype=torch.bfloat16)
    grads = make_grads(steps=2, dtype=torch.bfloat16)
    ps = clone_params(params)
    opt = run(lambda ps: fusedopt.AdamW(ps, lr=0.05, amsgrad=True), ps, grads)
    sd = opt.state_dict()
    fp32_state = {}
    for idx, st in sd["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            st[key] = st[key].float() + 1e-3  # values not representable in bf16
            fp32_state[(idx, key)] = st[key].clone()
    ps2 = clone_params(ps)
    opt2 = fusedopt.AdamW(ps2, lr=0.05, amsgrad=True)
    opt2.load_state_dict(sd)
    for (idx, key), v in fp32_state.items():
        loaded = opt2.state[ps2[idx]][key]
        assert loaded.dtype == torch.float32, f"param {idx} {key} loaded as {loaded.dtype}"
        assert_bits_equal(loaded, v, msg=f"param {idx} {key}")
    for idx, p in enumerate(ps2):
        st = opt2.state[p]["step"]
        assert st.dtype == torch.float32 and st.dim() == 0 and float(st) == 2.0


@pytest.mark.parametrize("what", ["state-shape", "state-numel", "state-int-dtype"])
@pytest.mark.parametrize("name,kwargs,key", [
    pytest.param("AdamW", dict(lr=0.01), "exp_avg", id="adamw-exp_avg"),
    pytest.param("Adam", dict(lr=0.01, amsgrad=True), "max_exp_avg_sq", id="adam-max_exp_avg_sq"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.9), "momentum_buffer", id="sgd-momentum_buffer"),
])
def test_state_that_does_not_fit_its_param_is_reported_by_step(name, kwargs, key, what):
    """The next step() raises naming the param, and nothing (params, state, steps) changed."""
    shapes = [(1023,), (7,), (33, 17), (40000,)]
    params = make_params(shapes)
    grads = make_grads(shapes, steps=3)
    groups = lambda ps: [dict(params=ps[:2]), dict(params=ps[2:])]  # noqa: E731
    ps = clone_params(params)
    opt = run(lambda ps: getattr(fusedopt, name)(groups(ps), **kwargs), ps, grads[:2])
    sd = opt.state_dict()
    bad = 2  # global index; group 1, position 0, shape (33, 17)
    good = sd["state"][bad][key]
    sd["state"][bad][key] = {
        "state-shape": lambda: good.reshape(17, 33).clone(),  # same numel, wrong shape
        "state-numel": lambda: torch.zeros(100),
        "state-int-dtype": lambda: torch.zeros(33, 17, dtype=torch.int32),
    }[what]()
    ps2 = clone_params(ps)
    opt2 = getattr(fusedopt, name)(groups(ps2), **kwargs)
    opt2.load_state_dict(sd)
    set_grads(ps2, grads[2])
    snap = snapshot(opt2)
    with pytest.raises((ValueError, RuntimeError)) as exc:
        opt2.step()
    msg = str(exc.value)
    assert names_param(msg, indices=(2,), shape=(33, 17), name="group 1"), (
        f"message does not name the param: {msg}")
    problem = ("dtype", "int") if what == "state-int-dtype" else ("shape", "size", "numel")
    assert mentions(msg, *problem) or mentions(msg, key), f"message does not name the problem: {msg}"
    assert_unchanged(opt2, snap)


@pytest.mark.parametrize("reset", ["state.clear()", "new state dict", "replace a state tensor",
                                   "in-place zero_()"])
@pytest.mark.parametrize("name,ref_cls,kwargs", [
    pytest.param("AdamW", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1), id="adamw"),
    pytest.param("SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9), id="sgd-momentum"),
])
def test_optimizer_state_reset_mid_training_acts_as_in_torch(name, ref_cls, kwargs, reset):
    """Resetting or replacing optimizer state between steps (a common idiom) is seen by the
    next step: ``optimizer.state`` is the only source of truth."""
    from collections import defaultdict

    params = make_params()
    grads = make_grads(steps=STEPS)
    key = "exp_avg" if name != "SGD" else "momentum_buffer"
    runs = []
    for factory in (fo(name, kwargs), torch_ref(ref_cls, **kwargs)):
        ps = clone_params(params)
        opt = factory(ps)
        for k, row in enumerate(grads):
            if k == 3:
                if reset == "state.clear()":
                    opt.state.clear()
                elif reset == "new state dict":
                    opt.state = defaultdict(dict)
                elif reset == "replace a state tensor":
                    for p in ps:
                        opt.state[p][key] = torch.full_like(p, 0.25)
                        if "step" in opt.state[p]:
                            opt.state[p]["step"] = torch.tensor(1.0)
                else:
                    for p in ps:
                        opt.state[p][key].zero_()
            set_grads(ps, row)
            opt.step()
        runs.append((ps, opt))
    (got_p, got_opt), (ref_p, ref_opt) = runs
    assert_optimizers_match(got_p, got_opt, ref_p, ref_opt)


@pytest.mark.parametrize("name,ref_cls,kwargs", CASES[:1] + CASES[6:7])
def test_load_state_dict_into_a_stepped_optimizer_rewinds_it(name, ref_cls, kwargs):
    """Reloading an earlier checkpoint into the same optimizer (rewind) continues from the
    loaded state, bit for bit like an uninterrupted run from that point."""
    params = make_params()
    grads = make_grads(steps=STEPS + 2)
    ps_ref = clone_params(params)
    opt_ref = run(fo(name, kwargs), ps_ref, grads[:SPLIT] + grads[SPLIT + 2:])
    ps = clone_params(params)
    opt = run(fo(name, kwargs), ps, grads[:SPLIT])
    saved_sd = copy.deepcopy(opt.state_dict())
    saved_p = [p.detach().clone() for p in ps]
    continue_run(opt, ps, grads[SPLIT:SPLIT + 2])  # steps that the rewind throws away
    opt.load_state_dict(saved_sd)
    with torch.no_grad():
        for p, s in zip(ps, saved_p):
            p.copy_(s)
    continue_run(opt, ps, grads[SPLIT + 2:])
    for i, (p, pr) in enumerate(zip(ps, ps_ref, strict=True)):
        assert_bits_equal(p.detach(), pr.detach(), msg=f"param {i}")
        st, sr = opt.state.get(p, {}), opt_ref.state.get(pr, {})
        assert set(st) == set(sr)
        for k in sr:
            assert_bits_equal(st[k], sr[k], msg=f"param {i} state[{k}]")


# --------------------------------------------------------------------------------------------
# Issue 13.14-13.16: drop-in gaps found by torch's own optimizer tests.
# --------------------------------------------------------------------------------------------


def test_adam_state_dict_loaded_into_adamw_keeps_decoupled_decay():
    """torch's AdamW forces decoupled decay on load; an Adam state dict must not turn fusedopt's
    AdamW into L2 decay (0.90 instead of torch's 0.95 after a zero-grad step)."""
    def one_step(cls):
        w = nn.Parameter(torch.ones(1))
        sd = torch.optim.Adam([nn.Parameter(torch.ones(1))], lr=0.1, weight_decay=0.5).state_dict()
        o = cls([w], lr=0.1, weight_decay=0.5)
        o.load_state_dict(sd)
        w.grad = torch.zeros(1)
        o.step()
        return w.detach().clone(), o.param_groups[0]["decoupled_weight_decay"]
    (want, want_flag), (got, got_flag) = one_step(torch.optim.AdamW), one_step(fusedopt.AdamW)
    assert want_flag is True and got_flag is True
    assert torch.equal(got, want) and float(got) == pytest.approx(0.95)


def _trained(cls=fusedopt.AdamW, **kwargs):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5))
    opt = cls([p], lr=0.1, **kwargs)
    p.grad = torch.randn(5)
    opt.step()
    return p, opt


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_keeps_its_hooks_and_saves_plain_state(how):
    """torch pickles only defaults, state and param_groups: the copy must still export plain
    dicts (weights_only loadable), keep saved dtypes on load and have last_grad_norm."""
    import pickle
    p, opt = _trained(max_grad_norm=1.0)
    copied = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert copied.last_grad_norm is None  # not stepped yet, but the attribute exists
    buf = io.BytesIO()
    torch.save(copied.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert all(type(v) is dict for v in loaded["state"].values())
    # The copy steps like the original (its params are its own copies).
    cp = copied.param_groups[0]["params"][0]
    g = torch.randn(5)
    p.grad, cp.grad = g.clone(), g.clone()
    opt.step()
    copied.step()
    assert torch.equal(cp, p) and copied.last_grad_norm is not None


def test_copied_optimizer_keeps_fp32_state_of_bf16_params_on_load():
    """The load hooks (which keep fp32 moments of bf16 params) survive a deepcopy."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8).bfloat16())
    opt = fusedopt.AdamW([p], lr=0.1, state_dtype=torch.float32)
    p.grad = torch.randn(8).bfloat16()
    opt.step()
    copied = copy.deepcopy(opt)
    copied.load_state_dict(opt.state_dict())
    cp = copied.param_groups[0]["params"][0]
    assert copied.state[cp]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_non_dict_state_values_pass_through_like_torch(name):
    """torch's test puts state["test"] = 1 from a state-dict pre-hook; users keep counters there."""
    ps, refs = [], []
    for mod in (fusedopt, torch.optim):
        p, _ = nn.Parameter(torch.ones(3)), None
        opt = getattr(mod, name)([p], lr=0.1)
        p.grad = torch.ones(3)
        opt.step()
        opt.state["test"] = 1
        ps.append(opt)
    fo_sd, torch_sd = ps[0].state_dict(), ps[1].state_dict()
    assert fo_sd["state"]["test"] == torch_sd["state"]["test"] == 1
    assert copy.deepcopy(ps[0]).state["test"] == 1
    buf = io.BytesIO()
    torch.save(fo_sd, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["state"]["test"] == 1
    ps[0].load_state_dict(fo_sd)
    assert ps[0].state["test"] == 1
