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
