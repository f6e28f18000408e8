"""float64 params (issue 13.13): float64 state, updated in double as torch does, through the same
shared math; the precision keywords stay low-precision-only. Parity of every Adam/SGD row of the
torch grid is in test_parity.py::test_parity_float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fusedopt

# Both sides compute in double and differ only in operation order: see test_parity_float64.
TOL = dict(rtol=1e-12, atol=1e-14)


def _pair(shape=(37, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g, dtype=torch.float64)
    return nn.Parameter(p.clone()), nn.Parameter(p.clone())


@pytest.mark.parametrize("kw", [dict(master_weights=True), dict(stochastic_rounding=True),
                                dict(kahan_summation=True)])
def test_precision_keywords_refuse_float64_params(kw):
    p, _ = _pair()
    with pytest.raises(ValueError, match="float64"):
        fusedopt.AdamW([p], lr=0.1, **kw)


def test_bf16_state_refused_for_float64_params_before_anything_changes():
    p, _ = _pair()
    opt = fusedopt.AdamW([p], lr=0.1, state_dtype=torch.bfloat16)
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="moments of dtype torch.bfloat16"):
        opt.step()
    assert torch.equal(p, before) and not opt.state


def test_clipping_float64_matches_clip_grad_norm_then_torch():
    p, q = _pair()
    opt = fusedopt.AdamW([p], lr=0.01, max_grad_norm=0.5)
    ref = torch.optim.AdamW([q], lr=0.01, foreach=False)
    for k in range(4):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + k), dtype=torch.float64) * 3
        p.grad, q.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_([q], 0.5, foreach=False)
        opt.step()
        ref.step()
        # The clip factor is computed in float32 from the float64 norm (as for every dtype):
        # it may differ from torch's double factor by an fp32 ulp, i.e. ~1e-7 relative.
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(opt.last_grad_norm.double(), norm, rtol=1e-6, atol=0)


def test_functional_adamw_float64_tensors_and_numpy():
    p, q = _pair()
    g = torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = torch.optim.AdamW([q], lr=0.01, weight_decay=0.1, foreach=False)
    q.grad = g.clone()
    ref.step()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    with torch.no_grad():
        fusedopt.functional.adamw_([p], [g], [m], [v], step=1, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8,
                                   weight_decay=0.1)
    torch.testing.assert_close(p, q, **TOL)
    a, ga = p.detach().numpy().copy(), g.numpy().copy()
    ma, va = np.zeros_like(a), np.zeros_like(a)
    fusedopt.functional.sgd_([a], [ga], [ma], lr=0.1, momentum=0.9, dampening=0, weight_decay=0, nesterov=False,
                             first_step=True)
    np.testing.assert_allclose(a, p.detach().numpy() - 0.1 * ga, rtol=1e-15, atol=0)


def test_mixed_float32_and_float64_params_in_one_optimizer():
    torch.manual_seed(0)
    a32, a64 = nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(10, dtype=torch.float64))
    r32, r64 = nn.Parameter(a32.detach().clone()), nn.Parameter(a64.detach().clone())
    opt = fusedopt.SGD([a32, a64], lr=0.1, momentum=0.9, nesterov=True)
    ref = torch.optim.SGD([r32, r64], lr=0.1, momentum=0.9, nesterov=True, foreach=False)
    for _ in range(3):
        for x, y in ((a32, r32), (a64, r64)):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(a64, r64, **TOL)
    torch.testing.assert_close(a32, r32)
    assert opt.state[a64]["momentum_buffer"].dtype == torch.float64
