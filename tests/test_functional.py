"""fusedopt.functional.adamw_ / adam_ / sgd_ against a float64 NumPy reference.

The reference implements the update rules as torch documents them (torch.optim.Adam, AdamW,
SGD docstrings), in float64, independently of both torch.optim and fusedopt.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusedopt import functional as F
from conftest import STANDARD_SHAPES, TOLERANCES, assert_close, make_tensors

STEPS = 6


# --------------------------------------------------------------------------------------------
# float64 NumPy reference
# --------------------------------------------------------------------------------------------


def ref_adam(p, g, m, v, *, step, lr, beta1, beta2, eps, weight_decay, maximize, decoupled):
    """One Adam/AdamW step in float64; returns new (p, m, v)."""
    g = -g if maximize else g
    if weight_decay != 0:
        if decoupled:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    m_hat = m / (1.0 - beta1 ** step)
    v_hat = v / (1.0 - beta2 ** step)
    p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v


def ref_sgd(p, g, b, *, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step):
    """One SGD step in float64; returns new (p, b)."""
    g = -g if maximize else g
    if weight_decay != 0:
        g = g + weight_decay * p
    if momentum != 0:
        b = g.copy() if first_step else momentum * b + (1.0 - dampening) * g
        g = g + momentum * b if nesterov else b
    return p - lr * g, b


# --------------------------------------------------------------------------------------------
# containers: lists of torch tensors or of NumPy arrays
# --------------------------------------------------------------------------------------------

NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


def to_container(tensors, kind, dtype):
    if kind == "torch":
        return [t.to(dtype).clone() for t in tensors]
    return [t.to(dtype).numpy().astype(NP_DTYPES[dtype]).copy() for t in tensors]


def as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def round_to(x64: np.ndarray, dtype) -> np.ndarray:
    """Round a float64 array to ``dtype`` (nearest-even) and back to float64."""
    return torch.from_numpy(np.ascontiguousarray(x64)).to(dtype).double().numpy()


def addresses(xs):
    return [x.data_ptr() if isinstance(x, torch.Tensor) else x.__array_interface__["data"][0]
            for x in xs]


def check(actual, expected64, dtype, msg):
    """Compare a tensor/array in ``dtype`` to a float64 reference (tolerance table)."""
    got = torch.from_numpy(as_f64(actual).copy())
    exp = torch.from_numpy(np.ascontiguousarray(expected64))
    if dtype == torch.float32:
        # fp32 results vs a float64 reference: torch's fp32 defaults (a few ulps per step).
        tol = TOLERANCES[torch.float32]
        torch.testing.assert_close(got, exp, rtol=tol["rtol"], atol=tol["atol"],
                                   msg=lambda m: f"{msg}: {m}")
    else:
        # low precision: reference rounded to dtype once per step (see TOLERANCES)
        assert_close(got.to(dtype), exp.to(dtype), dtype, msg=msg)


# --------------------------------------------------------------------------------------------
# Adam / AdamW
# --------------------------------------------------------------------------------------------

ADAM_HPARAMS = [
    pytest.param(dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0), id="defaults-wd0"),
    pytest.param(dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1), id="wd"),
    pytest.param(dict(lr=0.02, beta1=0.5, beta2=0.9, eps=1e-4, weight_decay=0.05, maximize=True),
                 id="wd-maximize"),
]


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("fn_name,decoupled", [("adamw_", True), ("adam_", False)])
@pytest.mark.parametrize("hp", ADAM_HPARAMS)
def test_adam_functional_matches_float64_reference(fn_name, decoupled, hp, kind):
    dtype = torch.float32
    fn = getattr(F, fn_name)
    init = make_tensors(STANDARD_SHAPES, seed=0)
    params = to_container(init, kind, dtype)
    exp_avgs = to_container([torch.zeros_like(t) for t in init], kind, dtype)
    exp_avg_sqs = to_container([torch.zeros_like(t) for t in init], kind, dtype)
    objects = (list(map(id, params)), list(map(id, exp_avgs)), list(map(id, exp_avg_sqs)))
    ptrs = (addresses(params), addresses(exp_avgs), addresses(exp_avg_sqs))
    ref = [(as_f64(p).copy(), np.zeros(p.shape), np.zeros(p.shape)) for p in params]
    maximize = hp.get("maximize", False)
    scalars = {k: v for k, v in hp.items() if k != "maximize"}
    for k in range(STEPS):
        step = k + 1
        grads = to_container(make_tensors(STANDARD_SHAPES, seed=100 + k, zero_frac=0.05), kind, dtype)
        grads_before = [as_f64(g).copy() for g in grads]
        fn(params, grads, exp_avgs, exp_avg_sqs, step=step, maximize=maximize, **scalars)
        ref = [ref_adam(p, as_f64(g), m, v, step=step, maximize=maximize, decoupled=decoupled, **scalars)
               for (p, m, v), g in zip(ref, grads)]
        for g, g0 in zip(grads, grads_before):
            np.testing.assert_array_equal(as_f64(g), g0)  # grads are inputs only
    # updated in place: same objects, same memory
    assert (list(map(id, params)), list(map(id, exp_avgs)), list(map(id, exp_avg_sqs))) == objects
    assert (addresses(params), addresses(exp_avgs), addresses(exp_avg_sqs)) == ptrs
    for i, (p, m, v) in enumerate(ref):
        check(params[i], p, dtype, f"param {i}")
        check(exp_avgs[i], m, dtype, f"exp_avg {i}")
        check(exp_avg_sqs[i], v, dtype, f"exp_avg_sq {i}")
    moved = max(np.abs(r[0] - as_f64(t)).max() for r, t in zip(ref, init))
    assert moved > 100 * TOLERANCES[dtype]["atol"]


@pytest.mark.parametrize("kind,dtype", [("torch", torch.bfloat16), ("torch", torch.float16),
                                        ("numpy", torch.float16)], ids=["torch-bf16", "torch-fp16", "numpy-fp16"])
@pytest.mark.parametrize("fn_name,decoupled", [("adamw_", True), ("adam_", False)])
def test_adam_functional_low_precision(fn_name, decoupled, kind, dtype):
    """Math in fp32, params and moments rounded once per step: reference rounded the same way."""
    fn = getattr(F, fn_name)
    hp = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    init = make_tensors(STANDARD_SHAPES, dtype=dtype, seed=0)
    params = to_container(init, kind, dtype)
    exp_avgs = to_container([torch.zeros_like(t) for t in init], kind, dtype)
    exp_avg_sqs = to_container([torch.zeros_like(t) for t in init], kind, dtype)
    ref = [(as_f64(p).copy(), np.zeros(p.shape), np.zeros(p.shape)) for p in params]
    for k in range(STEPS):
        grads = to_container(make_tensors(STANDARD_SHAPES, dtype=dtype, seed=100 + k), kind, dtype)
        fn(params, grads, exp_avgs, exp_avg_sqs, step=k + 1, **hp)
        ref = [tuple(round_to(x, dtype) for x in
                     ref_adam(p, as_f64(g), m, v, step=k + 1, maximize=False, decoupled=decoupled, **hp))
               for (p, m, v), g in zip(ref, grads)]
    for i, (p, m, v) in enumerate(ref):
        check(params[i], p, dtype, f"param {i}")
        check(exp_avgs[i], m, dtype, f"exp_avg {i}")
        check(exp_avg_sqs[i], v, dtype, f"exp_avg_sq {i}")


# --------------------------------------------------------------------------------------------
# SGD
# --------------------------------------------------------------------------------------------

SGD_HPARAMS = [
    pytest.param(dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False), id="momentum"),
    pytest.param(dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01, nesterov=False), id="dampening-wd"),
    pytest.param(dict(lr=0.05, momentum=0.8, dampening=0.0, weight_decay=0.01, nesterov=True), id="nesterov"),
    pytest.param(dict(lr=0.05, momentum=0.5, dampening=0.2, weight_decay=0.02, nesterov=False, maximize=True),
                 id="maximize"),
    pytest.param(dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.05, nesterov=False), id="no-momentum"),
]


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("hp", SGD_HPARAMS)
def test_sgd_functional_matches_float64_reference(hp, kind):
    """first_step=True on the first call initialises the buffers to the grad (they start as
    NaN here, so any read of the old contents would show), then first_step=False."""
    dtype = torch.float32
    init = make_tensors(STANDARD_SHAPES, seed=0)
    params = to_container(init, kind, dtype)
    bufs = to_container([torch.full_like(t, float("nan")) for t in init], kind, dtype)
    ptrs = (addresses(params), addresses(bufs))
    maximize = hp.get("maximize", False)
    scalars = {k: v for k, v in hp.items() if k != "maximize"}
    ref = [(as_f64(p).copy(), None) for p in params]
    for k in range(STEPS):
        grads = to_container(make_tensors(STANDARD_SHAPES, seed=100 + k, zero_frac=0.05), kind, dtype)
        grads_before = [as_f64(g).copy() for g in grads]
        F.sgd_(params, grads, bufs, maximize=maximize, first_step=(k == 0), **scalars)
        ref = [ref_sgd(p, as_f64(g), b, maximize=maximize, first_step=(k == 0), **scalars)
               for (p, b), g in zip(ref, grads)]
        for g, g0 in zip(grads, grads_before):
            np.testing.assert_array_equal(as_f64(g), g0)
        if k == 0 and scalars["momentum"] != 0:
            # after the first step the buffer is exactly the (decayed, signed) grad, in fp32
            for i, (b, (_, rb)) in enumerate(zip(bufs, ref)):
                check(b, rb, dtype, f"momentum_buffer {i} after the first step")
    assert (addresses(params), addresses(bufs)) == ptrs
    for i, (p, b) in enumerate(ref):
        check(params[i], p, dtype, f"param {i}")
        if scalars["momentum"] != 0:
            check(bufs[i], b, dtype, f"momentum_buffer {i}")


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_sgd_first_step_false_uses_existing_buffers(kind):
    """With first_step=False from the start, given buffers are decayed, not overwritten: with
    dampening the two semantics give different results, and only the right one may match."""
    dtype = torch.float32
    hp = dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.0, nesterov=False)
    init = make_tensors(STANDARD_SHAPES, seed=0)
    start_bufs = make_tensors(STANDARD_SHAPES, seed=77)
    params = to_container(init, kind, dtype)
    bufs = to_container(start_bufs, kind, dtype)
    ref = [(as_f64(p).copy(), as_f64(b).copy()) for p, b in zip(params, bufs)]
    for k in range(3):
        grads = to_container(make_tensors(STANDARD_SHAPES, seed=100 + k), kind, dtype)
        F.sgd_(params, grads, bufs, first_step=False, **hp)
        ref = [ref_sgd(p, as_f64(g), b, maximize=False, first_step=False, **hp)
               for (p, b), g in zip(ref, grads)]
    for i, (p, b) in enumerate(ref):
        check(params[i], p, dtype, f"param {i}")
        check(bufs[i], b, dtype, f"momentum_buffer {i}")


@pytest.mark.parametrize("kind,dtype", [("torch", torch.bfloat16), ("numpy", torch.float16)],
                         ids=["torch-bf16", "numpy-fp16"])
def test_sgd_functional_low_precision(kind, dtype):
    hp = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False)
    init = make_tensors(STANDARD_SHAPES, dtype=dtype, seed=0)
    params = to_container(init, kind, dtype)
    bufs = to_container([torch.zeros_like(t) for t in init], kind, dtype)
    ref = [(as_f64(p).copy(), None) for p in params]
    for k in range(STEPS):
        grads = to_container(make_tensors(STANDARD_SHAPES, dtype=dtype, seed=100 + k), kind, dtype)
        F.sgd_(params, grads, bufs, first_step=(k == 0), **hp)
        ref = [tuple(round_to(x, dtype) for x in
                     ref_sgd(p, as_f64(g), b, maximize=False, first_step=(k == 0), **hp))
               for (p, b), g in zip(ref, grads)]
    for i, (p, b) in enumerate(ref):
        check(params[i], p, dtype, f"param {i}")
        check(bufs[i], b, dtype, f"momentum_buffer {i}")

