"""Shared helpers for the fusedopt test suite.

Everything here is independent of fusedopt (this file does not import it), so that a broken
package shows up as failing tests, never as a broken harness.

References used by the tests:
* fp32: ``torch.optim.{AdamW,Adam,SGD}(foreach=False)``, the single-tensor for-loop.
* bf16/fp16: the same torch for-loop run on an fp32 shadow copy whose params and state are
  rounded to the low-precision dtype after every step (``rounded_reference``). That is exactly
  the contract "math in fp32, round to nearest once per step". (torch's own ``fused=True`` CPU
  path is used as a second opinion for Adam/AdamW only: its bf16 SGD kernel in torch 2.13
  leaves params untouched for tensors of >= 16 elements, so it cannot serve as a reference.)
* NumPy float64 code written in the tests (functional API).
"""

from __future__ import annotations

import os

# Idle OpenMP workers (torch's and fusedopt's) otherwise spin for a while after every
# parallel region; on a 2-core machine that spinning competes with the Python code of the
# test and makes the suite several times slower. Numerics are unaffected. Must be set
# before torch is imported; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import copy  # noqa: E402
import re  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# --------------------------------------------------------------------------------------------
# Tolerance table (per param dtype) and the reason for each entry.
# --------------------------------------------------------------------------------------------

EPS = {dt: torch.finfo(dt).eps for dt in (torch.float32, torch.bfloat16, torch.float16)}

TOLERANCES = {
    # torch.testing.assert_close defaults for fp32. Both sides compute in fp32; only the order
    # of operations differs (FMA, precomputed bias corrections), i.e. a few ulps per step.
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    # Low precision: both sides do the math in fp32 and round to nearest once per step, so
    # they agree except where an fp32 op-order difference lands on the other side of a
    # rounding boundary: a 1-ulp flip. It persists (the update does not depend on the param
    # except through weight decay) but does not grow, so allow 2 ulps relative (rtol=2*eps)
    # plus an absolute 2 ulps at the tensor's RMS magnitude, which covers a flip on an element
    # that later shrinks towards zero (the flip's absolute size stays that of the old value).
    # Tests use lr >= 0.05 so one step's update is many ulps and a missed or doubled update
    # is far outside this band (checked by `assert_moved`).
    torch.bfloat16: dict(rtol=2 * EPS[torch.bfloat16], atol_rms=2 * EPS[torch.bfloat16]),
    torch.float16: dict(rtol=2 * EPS[torch.float16], atol_rms=2 * EPS[torch.float16]),
}

LOW_PRECISION = (torch.bfloat16, torch.float16)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, msg: str = ""):
    """Compare with the tolerance of the table row for ``dtype`` (default: expected.dtype).

    Shapes and dtypes must match exactly; NaN positions must match.
    """
    dtype = dtype or expected.dtype
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    if dtype in LOW_PRECISION:
        tol = TOLERANCES[dtype]
        e = expected.detach().double()
        finite = e[torch.isfinite(e)]
        rms = finite.pow(2).mean().sqrt().item() if finite.numel() else 0.0
        atol = max(tol["atol_rms"] * rms, 1e-6)
        torch.testing.assert_close(
            actual.detach().double(), e, rtol=tol["rtol"], atol=atol, equal_nan=True,
            msg=lambda m: f"{msg}: {m}",
        )
    else:
        torch.testing.assert_close(
            actual.detach(), expected.detach(), equal_nan=True, msg=lambda m: f"{msg}: {m}"
        )


def assert_bits_equal(a, b, msg: str = ""):
    """Exact (bitwise) equality of two tensors, including dtype, shape, -0.0 and NaN payloads."""
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), msg
    assert a.dtype == b.dtype, f"{msg}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{msg}: shape {a.shape} != {b.shape}"
    assert a.device == b.device, f"{msg}: device {a.device} != {b.device}"
    if a.device.type == "meta":
        return
    a, b = a.detach(), b.detach()
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.is_floating_point():
        itype = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
        a, b = a.contiguous().view(itype), b.contiguous().view(itype)
    assert torch.equal(a, b), f"{msg}: tensors differ bitwise"


def assert_moved(before: torch.Tensor, after: torch.Tensor, dtype):
    """Sanity check that makes a comparison meaningful: the reference moved well outside tol."""
    diff = (after.detach().double() - before.detach().double()).abs().max().item()
    if dtype in LOW_PRECISION:
        scale = TOLERANCES[dtype]["atol_rms"] * before.detach().double().pow(2).mean().sqrt().item()
    else:
        scale = TOLERANCES[dtype]["atol"]
    assert diff > 5 * scale, f"test setup: params moved only {diff}, tolerance scale {scale}"


# --------------------------------------------------------------------------------------------
# Seeded factories
# --------------------------------------------------------------------------------------------

# Odd sizes so that SIMD widths and chunk boundaries are crossed, plus a 2-D param.
STANDARD_SHAPES = [(1,), (7,), (1023,), (40000,), (37, 29)]


def make_tensors(shapes, dtype=torch.float32, seed=0, scale=1.0, zero_frac=0.0):
    """Seeded N(0, scale^2) tensors rounded to ``dtype``; a fraction of exact zeros if asked."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=gen, dtype=torch.float64) * scale
        if zero_frac:
            t[torch.rand(s, generator=gen, dtype=torch.float64) < zero_frac] = 0.0
        out.append(t.to(dtype))
    return out


def make_params(shapes=STANDARD_SHAPES, dtype=torch.float32, seed=0, scale=1.0):
    return [nn.Parameter(t) for t in make_tensors(shapes, dtype, seed, scale)]


def make_grads(shapes=STANDARD_SHAPES, steps=6, dtype=torch.float32, seed=1000, scale=1.0,
               none=None):
    """``grads[step][i]``: a fresh seeded random grad per step (with ~5% exact zeros).

    ``none``: optional callable ``(step, i) -> bool``; where true the grad is ``None``.
    """
    grads = []
    for k in range(steps):
        row = make_tensors(shapes, dtype, seed=seed + 7919 * k, scale=scale, zero_frac=0.05)
        if none is not None:
            row = [None if none(k, i) else g for i, g in enumerate(row)]
        grads.append(row)
    return grads


def clone_params(params: Sequence[torch.Tensor]) -> list[nn.Parameter]:
    """Independent copies; keeps strides of dense layouts (e.g. transposed) and requires_grad."""
    out = []
    for p in params:
        c = p.detach().clone()  # preserve_format: keeps dense non-contiguous strides
        out.append(nn.Parameter(c, requires_grad=p.requires_grad))
    return out


def set_grads(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone()


def run_steps(opt_factory: Callable, params, grads_per_step, *, clone=True):
    """Clone ``params``, build ``opt_factory(params)`` and do one step per row of grads."""
    ps = clone_params(params) if clone else list(params)
    opt = opt_factory(ps)
    for grads in grads_per_step:
        set_grads(ps, grads)
        opt.step()
    return ps, opt


def torch_ref(cls, **kwargs):
    """Factory for the reference: torch's single-tensor for-loop implementation."""
    return lambda ps: cls(ps, foreach=False, **copy.deepcopy(kwargs))


def rounded_reference(torch_cls, kwargs, params, grads_per_step):
    """fp32 torch for-loop reference with params and state rounded to the param dtype per step.

    Returns (params in their low-precision dtype, list of state dicts with tensors in the
    param dtype and an fp32 ``step``).
    """
    dtypes = [p.dtype for p in params]
    shadow = [nn.Parameter(p.detach().float(), requires_grad=p.requires_grad) for p in params]
    opt = torch_cls(shadow, foreach=False, **copy.deepcopy(kwargs))
    for grads in grads_per_step:
        for s, g in zip(shadow, grads, strict=True):
            s.grad = None if g is None else g.float()
        opt.step()
        with torch.no_grad():
            for s, dt in zip(shadow, dtypes):
                s.copy_(s.to(dt).float())
                for key, v in opt.state.get(s, {}).items():
                    if key != "step" and torch.is_tensor(v) and v.is_floating_point():
                        v.copy_(v.to(dt).float())
    out_p = [s.detach().to(dt) for s, dt in zip(shadow, dtypes)]
    out_s = []
    for s, dt in zip(shadow, dtypes):
        st = {}
        for key, v in opt.state.get(s, {}).items():
            st[key] = v.clone() if key == "step" else v.to(dt)
        out_s.append(st)
    return out_p, out_s


# --------------------------------------------------------------------------------------------
# Comparisons of whole optimizers
# --------------------------------------------------------------------------------------------


def assert_state_matches(got_state: dict, ref_state: dict, dtype, msg=""):
    """Same state keys; ``step`` exactly equal; tensors same shape/dtype and close."""
    assert set(got_state) == set(ref_state), f"{msg}: state keys {set(got_state)} != {set(ref_state)}"
    for key, ref in ref_state.items():
        got = got_state[key]
        if key == "step":
            assert torch.is_tensor(got) and got.dim() == 0, f"{msg}: step must be a 0-dim tensor"
            assert got.dtype == torch.float32, f"{msg}: step dtype {got.dtype}"
            assert float(got) == float(ref), f"{msg}: step {float(got)} != {float(ref)}"
        else:
            assert_close(got, ref, dtype, msg=f"{msg} state[{key!r}]")


def assert_optimizers_match(got_params, got_opt, ref_params, ref_opt, dtype=torch.float32):
    for i, (gp, rp) in enumerate(zip(got_params, ref_params, strict=True)):
        assert_close(gp, rp, dtype, msg=f"param {i}")
        # (Empty state entries are checked separately, against torch's state_dict keys.)
        got_st, ref_st = got_opt.state.get(gp, {}), ref_opt.state.get(rp, {})
        assert bool(got_st) == bool(ref_st), (
            f"param {i}: has state={bool(got_st)}, torch: {bool(ref_st)}"
        )
        if ref_st:
            assert_state_matches(got_st, ref_st, dtype, msg=f"param {i}")


# --------------------------------------------------------------------------------------------
# Snapshots for "nothing changed" checks
# --------------------------------------------------------------------------------------------


def snapshot(opt) -> dict:
    """Deep copy of every param, grad, state tensor and group hyper-parameter of ``opt``."""
    snap = {"params": [], "groups": []}
    for group in opt.param_groups:
        snap["groups"].append({k: copy.deepcopy(v) for k, v in group.items() if k != "params"})
        for p in group["params"]:
            st = opt.state.get(p, None)
            snap["params"].append(
                (
                    p.detach().clone(),
                    None if p.grad is None else p.grad.detach().clone(),
                    None if st is None else {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                                             for k, v in st.items()},
                )
            )
    return snap


def assert_unchanged(opt, snap: dict):
    """Every param, grad, state tensor (incl. step) bit-identical to ``snap``; no state created."""
    i = 0
    for gi, group in enumerate(opt.param_groups):
        for k, v in snap["groups"][gi].items():
            if torch.is_tensor(v):
                assert_bits_equal(group[k], v, msg=f"group {gi} {k}")
            else:
                assert group[k] == v, f"group {gi} {k}: {group[k]!r} != {v!r}"
        for p in group["params"]:
            p0, g0, st0 = snap["params"][i]
            assert_bits_equal(p.detach(), p0, msg=f"param {i}")
            if g0 is None:
                assert p.grad is None, f"param {i}: grad appeared"
            else:
                assert p.grad is not None, f"param {i}: grad was removed"
                if p.grad.is_sparse:
                    assert_bits_equal(p.grad.to_dense(), g0.to_dense(), msg=f"grad {i}")
                else:
                    assert_bits_equal(p.grad, g0, msg=f"grad {i}")
            st = opt.state.get(p, None)
            if st0 is None or len(st0) == 0:
                assert st is None or len(st) == 0, f"param {i}: state was created: {list(st)}"
            else:
                assert st is not None and set(st) == set(st0), f"param {i}: state keys changed"
                for k, v in st0.items():
                    if torch.is_tensor(v):
                        assert_bits_equal(st[k], v, msg=f"param {i} state[{k!r}]")
                    else:
                        assert st[k] == v, f"param {i} state[{k!r}] changed"
            i += 1


# --------------------------------------------------------------------------------------------
# Error message checks
# --------------------------------------------------------------------------------------------


def _shape_forms(shape) -> list[str]:
    dims = [str(int(d)) for d in shape]
    forms = ["(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")",
             "[" + ", ".join(dims) + "]", "x".join(dims), "(" + ",".join(dims) + ")",
             "[" + ",".join(dims) + "]"]
    if len(dims) == 1:
        forms.append("(" + dims[0] + ")")
    return forms


def names_param(message: str, indices=(), shape=None, name=None) -> bool:
    """Does ``message`` identify a parameter, by name, shape or index near 'param'/'group'?"""
    if name and name in message:
        return True
    if shape is not None and any(f in message for f in _shape_forms(shape)):
        return True
    for idx in indices:
        pat = rf"(param|parameter|group|index|tensor|#)[^0-9\n]{{0,24}}\b{idx}\b"
        if re.search(pat, message, flags=re.IGNORECASE):
            return True
    return False


def mentions(message: str, *words: str) -> bool:
    low = message.lower()
    return any(w.lower() in low for w in words)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Seed torch for any test that draws from the global RNG (models' init)."""
    torch.manual_seed(1234)
    yield
