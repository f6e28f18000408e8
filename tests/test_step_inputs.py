"""One-step inputs (fusedopt/_step_inputs.py): restores and SAM's grad mix handed to the next
step, which does them inside its pass. Each test runs the same step twice — once with the
inputs handed to the step, once with plain copies (or a lerp written here) before a normal
step — and requires the same bits; other tests check what must fall back to copies."""
from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt import _multi_tensor

SHAPES = [(37, 29), (4096 + 7,), (3, 5, 7)]  # odd sizes: tails of the vector loops

CONFIGS = {
    "adamw-fp32": (torch.float32, dict()),
    "adamw-bf16-sr-bf16state": (torch.bfloat16, dict(stochastic_rounding=True, state_dtype=torch.bfloat16)),
    "adamw-bf16-kahan": (torch.bfloat16, dict(kahan_summation=True)),
    "adamw-bf16-master": (torch.bfloat16, dict(master_weights=True)),
    "adamw-fp32-8bit": (torch.float32, dict(state_dtype=torch.uint8)),
}


def _make(dtype, kwargs, seed=0, cls=fusedopt.AdamW, **extra):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    opt = cls(params, lr=1e-2, weight_decay=0.1, **kwargs, **extra)
    return params, opt


def _set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _state_tensors(opt, params):
    return [(p, k, v) for p in params for k, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)]


def _train(params, opt, steps, seed):
    for s in range(steps):
        _set_grads(params, seed + s)
        opt.step()


def _assert_same(a_params, a_opt, b_params, b_opt):
    for pa, pb in zip(a_params, b_params):
        assert torch.equal(pa, pb)
    for (pa, ka, va), (pb, kb, vb) in zip(_state_tensors(a_opt, a_params), _state_tensors(b_opt, b_params)):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.parametrize("config", list(CONFIGS))
def test_restored_state_taken_by_the_step_equals_copies(config, monkeypatch):
    dtype, kwargs = CONFIGS[config]
    runs = []
    for deferred in (True, False):
        params, opt = _make(dtype, kwargs)
        _train(params, opt, 2, seed=10)
        saved = [(t, t.clone()) for _, _, t in _state_tensors(opt, params)]
        _train(params, opt, 2, seed=20)  # the state moves on (a trial)
        calls = []
        real = _multi_tensor.copy_
        monkeypatch.setattr(_multi_tensor, "copy_", lambda d, s: (calls.append(list(d)), real(d, s)))
        if deferred:
            rest = opt._defer_copies([(t, buf) for t, buf in saved], params=False)
            if rest:
                real([t for t, _ in rest], [b for _, b in rest])
        else:
            real([t for t, _ in saved], [b for _, b in saved])
        _set_grads(params, 99)
        opt.step()
        monkeypatch.setattr(_multi_tensor, "copy_", real)
        if deferred:
            taken = {t.data_ptr() for t, _ in saved} - {t.data_ptr() for t, _ in rest}
            copied = {t.data_ptr() for c in calls for t in c}
            assert not (taken & copied), "a restore handed to the step was copied anyway"
            if kwargs.get("state_dtype") == torch.uint8:
                assert all(t.dtype != torch.uint8 for t, _ in saved if t.data_ptr() in taken)
            else:
                moments = {opt.state[p][k].data_ptr() for p in params for k in ("exp_avg", "exp_avg_sq")}
                assert moments <= taken
        runs.append((params, opt))
    _assert_same(*runs[0], *runs[1])


@pytest.mark.parametrize("config", ["adamw-fp32", "adamw-bf16-sr-bf16state", "adamw-bf16-kahan",
                                    "adamw-bf16-master", "adamw-fp32-8bit"])
def test_param_restore_taken_by_the_step_equals_copies(config):
    """SAM's second step: w comes back from a saved copy inside the base step."""
    dtype, kwargs = CONFIGS[config]
    runs = []
    for deferred in (True, False):
        params, opt = _make(dtype, kwargs)
        _train(params, opt, 2, seed=1)
        saved = [(p, p.detach().clone()) for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(torch.ones_like(p))  # w + e
        _set_grads(params, 5)
        if deferred:
            rest = opt._defer_copies([(p.detach(), w) for p, w in saved])
            assert rest == []
        else:
            with torch.no_grad():
                for p, w in saved:
                    p.copy_(w)
        opt.step()
        runs.append((params, opt))
    _assert_same(*runs[0], *runs[1])


def _lerp_reference(g, m, w):
    """torch.lerp's two formulas as separate float ops (the kernel's; torch's own vectorized
    lerp fuses a multiply-add, which may differ in the last bit), rounded to the grad's dtype."""
    g32, m32 = g.float(), m.float()
    out = g32 + w * (m32 - g32) if abs(w) < 0.5 else m32 - (m32 - g32) * (1.0 - w)
    return out.to(g.dtype)


@pytest.mark.parametrize("weight", [0.3, 0.75])
@pytest.mark.parametrize("config", ["adamw-fp32", "adamw-bf16-sr-bf16state", "adamw-fp32-8bit"])
def test_grad_mix_taken_by_the_step(config, weight):
    dtype, kwargs = CONFIGS[config]
    runs = []
    for deferred in (True, False):
        params, opt = _make(dtype, kwargs)
        _train(params, opt, 1, seed=3)
        _set_grads(params, 7)
        g = torch.Generator().manual_seed(8)
        mixes = [torch.randn(p.shape, generator=g).to(dtype) for p in params]
        grads_before = [p.grad.clone() for p in params]
        if deferred:
            assert opt._defer_grad_mix(params, mixes, weight) == []
        else:
            for p, m in zip(params, mixes):
                p.grad = _lerp_reference(p.grad, m, weight)
        opt.step()
        if deferred:  # the mix was used by the step, never written into .grad
            assert all(torch.equal(p.grad, gb) for p, gb in zip(params, grads_before))
        runs.append((params, opt))
    _assert_same(*runs[0], *runs[1])


def test_grad_mix_under_clipping_is_done_before_the_norm():
    """The global norm must see the mixed grads: under max_grad_norm the mix is done in .grad
    first (torch.lerp_), then the clipped step runs."""
    runs = []
    for deferred in (True, False):
        params, opt = _make(torch.float32, {}, max_grad_norm=0.5)
        _set_grads(params, 7)
        mixes = [torch.full(p.shape, 3.0) for p in params]
        if deferred:
            opt._defer_grad_mix(params, mixes, 0.25)
        else:
            torch._foreach_lerp_([p.grad for p in params], mixes, 0.25)
        opt.step()
        runs.append((params, opt, opt.last_grad_norm))
    assert torch.equal(runs[0][2], runs[1][2])
    _assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])


def test_reading_state_does_pending_restores():
    params, opt = _make(torch.float32, {})
    _train(params, opt, 2, seed=1)
    saved = [(t, t.clone()) for _, _, t in _state_tensors(opt, params)]
    _train(params, opt, 1, seed=2)
    rest = opt._defer_copies(saved, params=False)
    assert len(rest) == len(params)  # the step counters; the moments were taken
    _multi_tensor.copy_([t for t, _ in rest], [b for _, b in rest])
    assert opt._step_inputs
    state = opt.state  # reading the state does the pending copies first
    assert not opt._step_inputs
    for t, buf in saved:
        assert torch.equal(t, buf)
    assert all(state[p]["exp_avg"] is t for p, t in zip(params, [t for t, _ in saved if t.shape != ()][::2]))


def test_skipped_step_still_restores(monkeypatch):
    """GradScaler's found_inf may skip the step: the restores are then done as copies."""
    params, opt = _make(torch.float32, {})
    _train(params, opt, 2, seed=1)
    saved = [(t, t.clone()) for _, _, t in _state_tensors(opt, params)]
    _train(params, opt, 1, seed=2)
    rest = opt._defer_copies(saved, params=False)
    _multi_tensor.copy_([t for t, _ in rest], [b for _, b in rest])
    _set_grads(params, 3)
    opt.found_inf = torch.ones(())
    before = [p.detach().clone() for p in params]
    opt.step()
    del opt.found_inf
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    for t, buf in saved:
        assert torch.equal(t, buf)


def test_failed_step_still_restores():
    params, opt = _make(torch.float32, {})
    _train(params, opt, 1, seed=1)
    saved = [(p.detach(), p.detach().clone()) for p in params]
    with torch.no_grad():
        for p in params:
            p.mul_(2.0)
    opt._defer_copies(saved)
    _set_grads(params, 3)
    opt.param_groups[0]["lr"] = -1.0  # the step raises before any kernel
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.step()
    for p, (_, w) in zip(params, saved):
        assert torch.equal(p.detach(), w)


def test_param_without_grad_is_restored_by_copy():
    params, opt = _make(torch.float32, {})
    _train(params, opt, 1, seed=1)
    saved = [(p.detach(), p.detach().clone()) for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    opt._defer_copies(saved)
    _set_grads(params, 3)
    params[1].grad = None  # not stepped: its restore must still happen
    opt.step()
    assert torch.equal(params[1].detach(), saved[1][1])


def test_foreign_and_mismatched_pairs_are_returned():
    params, opt = _make(torch.float32, {})
    _train(params, opt, 1, seed=1)
    other = torch.zeros(5)
    wrong_layout = torch.zeros(SHAPES[0]).t().contiguous().t()  # same shape, other strides
    pairs = [(other, torch.ones(5)), (params[0].detach(), wrong_layout),
             (params[1].detach(), torch.zeros(SHAPES[1], dtype=torch.float64))]
    assert opt._defer_copies(pairs) == pairs
    assert not opt._step_inputs


# ---- saves (a LossAdaptiveLR snapshot taken by the next step) ---------------------------------
def _moment_buffers(opt, params):
    """The live tensors a snapshot may hand to the step: moments and master/Kahan buffers."""
    keys = ("exp_avg", "exp_avg_sq", "master_param", "kahan_comp")
    return [opt.state[p][k] for p in params for k in keys if k in opt.state[p]]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_saved_state_taken_by_the_step_equals_copies(config, monkeypatch):
    """The step saves each buffer's value from before its update into the snapshot buffer;
    params and state after the step, and the saved values, equal a copy made before a plain
    step."""
    dtype, kwargs = CONFIGS[config]
    runs = []
    for deferred in (True, False):
        params, opt = _make(dtype, kwargs)
        _train(params, opt, 2, seed=10)
        live = [t for _, _, t in _state_tensors(opt, params)]
        expected = [t.clone() for t in live]
        snapshot = [torch.full_like(t, 7) for t in live]  # stale contents the saves must replace
        calls = []
        real = _multi_tensor.copy_
        monkeypatch.setattr(_multi_tensor, "copy_", lambda d, s: (calls.append(list(d)), real(d, s)))
        pairs = list(zip(snapshot, live))
        rest = opt._defer_saves(pairs) if deferred else pairs
        if rest:
            real([d for d, _ in rest], [s for _, s in rest])
        _set_grads(params, 99)
        opt.step()
        monkeypatch.setattr(_multi_tensor, "copy_", real)
        for buf, want in zip(snapshot, expected):
            assert torch.equal(buf, want)
        if deferred:
            taken = {d.data_ptr() for d, _ in pairs} - {d.data_ptr() for d, _ in rest}
            copied = {t.data_ptr() for c in calls for t in c}
            assert not (taken & copied), "a save handed to the step was copied anyway"
            live_taken = {s.data_ptr() for d, s in pairs if d.data_ptr() in taken}
            wanted = {t.data_ptr() for t in _moment_buffers(opt, params) if t.dtype != torch.uint8}
            assert live_taken == wanted  # every full-precision moment / master / Kahan buffer, nothing else
        runs.append((params, opt))
    _assert_same(*runs[0], *runs[1])


def test_save_after_a_pending_restore_saves_the_restored_values():
    """restore, then snapshot, then step: the step restores first, then saves what it restored."""
    params, opt = _make(torch.float32, {})
    _train(params, opt, 2, seed=1)
    live = _moment_buffers(opt, params)
    old = [t.clone() for t in live]
    _train(params, opt, 1, seed=2)
    assert opt._defer_copies(list(zip(live, old)), params=False) == []
    snapshot = [torch.zeros_like(t) for t in live]
    assert opt._defer_saves(list(zip(snapshot, live))) == []
    _set_grads(params, 3)
    opt.step()
    for buf, want in zip(snapshot, old):
        assert torch.equal(buf, want)


def test_restore_after_a_pending_save_does_the_save_first():
    """snapshot, then restore (no step between): the snapshot holds the values before the
    restore."""
    params, opt = _make(torch.float32, {})
    _train(params, opt, 2, seed=1)
    live = _moment_buffers(opt, params)
    other = [torch.full_like(t, 0.5) for t in live]
    before = [t.clone() for t in live]
    snapshot = [torch.zeros_like(t) for t in live]
    assert opt._defer_saves(list(zip(snapshot, live))) == []
    opt._defer_copies(list(zip(live, other)), params=False)
    for buf, want in zip(snapshot, before):
        assert torch.equal(buf, want)
    state = opt.state  # does the pending restore
    assert all(torch.equal(t, o) for t, o in zip(_moment_buffers(opt, params), other)) and state


@pytest.mark.parametrize("how", ["read-state", "skipped-step", "failed-step", "no-grad"])
def test_pending_saves_are_done_by_copy_when_the_step_cannot(how):
    params, opt = _make(torch.float32, {})
    _train(params, opt, 2, seed=1)
    live = _moment_buffers(opt, params)
    before = [t.clone() for t in live]
    snapshot = [torch.zeros_like(t) for t in live]
    assert opt._defer_saves(list(zip(snapshot, live))) == []
    _set_grads(params, 3)
    if how == "read-state":
        opt.state
        assert not opt._step_inputs
    elif how == "skipped-step":
        opt.found_inf = torch.ones(())
        opt.step()
        del opt.found_inf
    elif how == "failed-step":
        opt.param_groups[0]["lr"] = -1.0
        with pytest.raises(ValueError, match="Invalid learning rate"):
            opt.step()
    else:
        params[1].grad = None  # not stepped: its save is a copy before the kernels
        opt.step()
    for buf, want in zip(snapshot, before):
        assert torch.equal(buf, want)


def test_saves_of_foreign_and_mismatched_pairs_are_returned():
    params, opt = _make(torch.float32, {})
    _train(params, opt, 1, seed=1)
    m = opt.state[params[0]]["exp_avg"]
    pairs = [(torch.zeros(5), torch.ones(5)),                           # not the optimizer's
             (torch.zeros_like(params[0]).detach(), params[0].detach()),  # a param: copied now
             (torch.zeros(m.shape).t().contiguous().t(), m),             # other strides
             (torch.zeros(m.shape, dtype=torch.float64), m)]             # other dtype
    assert opt._defer_saves(pairs) == pairs
    assert not opt._step_inputs
