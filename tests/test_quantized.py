"""8-bit optimizer state (state_dtype=torch.uint8, issue 18) against bitsandbytes and against a
reference written here with torch ops (dequantize with bitsandbytes' map, update in fp32, new
absmax per block of 256, exact nearest code by float64 distance).

Tolerances: codes are compared exactly except where the two neighbouring codes are at equal
distance to within float32 rounding of x = value * (1 / absmax) (a relative 1e-6 band); params
after one step from the same state use the fp32 moments before requantization on both sides,
so they agree to fp32 rounding (conftest's fp32 row); over 20 steps the quantization error of
the moments (about 1% of a moment per step, different codes on the two sides) makes the
trajectories differ by a few percent of the distance travelled, hence the 10% band.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fusedopt
from fusedopt import _quantization as Q

bnb = pytest.importorskip("bitsandbytes", reason="test requirement: pip install bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

N = 5000  # >= 4096: 8-bit; 20 blocks, the last one partial
SIGNED, UNSIGNED = BF.create_dynamic_map(signed=True), BF.create_dynamic_map(signed=False)


def ref_codes(values: torch.Tensor, qmap: torch.Tensor):
    """Exact nearest codes of values / absmax per block (float64 distances), the absmax, and
    a mask of the elements at a near-tie between two codes."""
    flat = values.reshape(-1).float()
    pad = (-flat.numel()) % 256
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 256)
    absmax = blocks.abs().amax(1)
    x = (blocks * torch.where(absmax > 0, 1 / absmax, 0)[:, None]).reshape(-1)[: flat.numel()].double()
    d = (x[:, None] - qmap.double()[None, :]).abs()
    best = d.argmin(1)
    two = d.topk(2, largest=False).values
    tie = (two[:, 1] - two[:, 0]) <= 1e-6 * x.abs().clamp_min(1e-30)
    return best.to(torch.uint8), absmax, tie


def deq(codes, absmax, qmap):
    return (qmap[codes.reshape(-1).long()] * absmax.repeat_interleave(256)[: codes.numel()]).reshape(codes.shape)


def test_maps_are_bitsandbytes_maps():
    assert torch.equal(Q.dynamic_map(True), SIGNED) and torch.equal(Q.dynamic_map(False), UNSIGNED)


def test_bucket_tables_give_the_nearest_code():
    """The kernels' two-read lookup (quantized.h: bucket of x's bits, base + (x > threshold)),
    replayed here with torch ops, equals the exact nearest code (float64 distances to
    bitsandbytes' map) on a dense sample of [-1, 1] including every map value and midpoint,
    except at exact ties."""
    for qmap in (SIGNED, UNSIGNED):
        m = qmap.double()
        mids = ((m[:-1] + m[1:]) / 2).float()
        x = torch.cat([torch.linspace(-1, 1, 400001), torch.logspace(-9, 0, 20001), -torch.logspace(-9, 0, 20001),
                       qmap, mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
        base, threshold = Q.bucket_tables(qmap)
        u = x.view(torch.int32).long() & 0xFFFFFFFF
        e = ((u >> 23) & 0xFF) - 103
        b = torch.where(e < 0, 0, torch.where(e > 24, 25 * 256 - 1, e * 256 + ((u >> 15) & 0xFF))) + (u >> 31) * 25 * 256
        got = base.long()[b] + (x > threshold[b]).long()
        want = (x.double()[:, None] - m[None, :]).abs().argmin(1)
        # A tie: x within a float32 ulp of an exact midpoint, where rounding the midpoint to
        # float32 may put it on either side.
        exact_mids = (m[:-1] + m[1:]) / 2
        tie = (x.double()[:, None] - exact_mids[None, :]).abs().amin(1) <= 2.0**-23 * x.double().abs()
        assert torch.equal(got[~tie], want[~tie])
        assert tie.float().mean() < 0.01


def test_packed_tables_refuse_maps_they_cannot_encode():
    """nearest_code_packed (quantized.h) relies on the signed map mirroring its positive
    midpoints and on the unsigned map's midpoints all being positive; _quantization checks both
    when it builds the tables (the codes themselves: tests/test_quantized_codec.py, every ISA)."""
    assert Q.packed_table(SIGNED, True).shape == (25 * 256,)
    assert Q.packed_table(UNSIGNED, False).shape == (25 * 256,)
    lopsided = SIGNED.clone()
    lopsided[3] *= 0.999  # one negative value no longer mirrors its positive twin
    with pytest.raises(AssertionError, match="symmetric"):
        Q.packed_table(lopsided, True)
    with pytest.raises(AssertionError, match="at or below 0"):
        Q.packed_table(SIGNED, False)  # the signed map as an unsigned one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_step_codes_are_the_nearest_and_params_use_the_fp32_moments(dtype):
    torch.manual_seed(0)
    p0, g = torch.randn(N), torch.randn(N)
    p = nn.Parameter(p0.clone().to(dtype))
    opt = fusedopt.AdamW([p], lr=1e-2, weight_decay=0.1, state_dtype=torch.uint8)
    p.grad = g.to(dtype)
    opt.step()
    gf = g.to(dtype).float()
    m, v = 0.1 * gf, 0.001 * (gf * gf)
    st = opt.state[p]
    for key, val, qmap in (("exp_avg", m, SIGNED), ("exp_avg_sq", v, UNSIGNED)):
        want, absmax, tie = ref_codes(val, qmap)
        torch.testing.assert_close(st[key + "_absmax"], absmax, rtol=1e-6, atol=0)
        got = st[key].reshape(-1)
        assert torch.equal(got, Q.quantize(val, key)[0].reshape(-1))  # the Python quantizer (for loads)
        assert st[key].dtype == torch.uint8 and st[key].shape == p.shape
        assert torch.equal(got[~tie], want[~tie]), (got != want).sum()
    # The update used the fp32 moments (before requantization): step 1 of AdamW is
    # p*(1-lr*wd) - lr * m_hat / (sqrt(v_hat) + eps) = ... - lr * g / (|g| + eps).
    ref = p0.to(dtype).float() * (1 - 1e-2 * 0.1) - 1e-2 * (m / 0.1) / ((v / 0.001).sqrt() + 1e-8)
    torch.testing.assert_close(p.float(), ref.to(dtype).float(), rtol=1e-2 if dtype == torch.bfloat16 else 1.3e-6,
                               atol=1e-5)


def _reference_8bit_step(kind, p, g, state, lr, hyper, step):
    """One step of 8-bit Adam(coupled L2)/SGD-momentum written here: dequantize with
    bitsandbytes' maps, update in fp32 in torch's order, requantize to the nearest codes."""
    if kind == "adam":
        b1, b2, eps, wd = hyper
        m = deq(state["exp_avg"], state["exp_avg_absmax"], SIGNED)
        v = deq(state["exp_avg_sq"], state["exp_avg_sq_absmax"], UNSIGNED)
        g = g + wd * p
        m = m + (1 - b1) * (g - m)
        v = b2 * v + (1 - b2) * g * g
        denom = v.sqrt() / (1 - b2 ** step) ** 0.5 + eps
        p = p - lr / (1 - b1 ** step) * (m / denom)
        out = {}
        for key, val, qmap in (("exp_avg", m, SIGNED), ("exp_avg_sq", v, UNSIGNED)):
            out[key], out[key + "_absmax"], _ = ref_codes(val, qmap)
        return p, out
    mom, wd = hyper
    buf = deq(state["momentum_buffer"], state["momentum_buffer_absmax"], SIGNED)
    g = g + wd * p
    buf = g if step == 1 else mom * buf + g
    p = p - lr * buf
    codes, absmax, _ = ref_codes(buf, SIGNED)
    return p, {"momentum_buffer": codes, "momentum_buffer_absmax": absmax}


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_adam_coupled_decay_and_sgd_momentum_match_the_reference(kind):
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(N))
    if kind == "adam":
        hyper = (0.9, 0.99, 1e-8, 0.05)
        opt = fusedopt.Adam([p], lr=1e-2, betas=hyper[:2], weight_decay=hyper[3], state_dtype=torch.uint8)
    else:
        hyper = (0.9, 0.01)
        opt = fusedopt.SGD([p], lr=1e-2, momentum=hyper[0], weight_decay=hyper[1], state_dtype=torch.uint8)
    for step in range(1, 6):
        g = torch.randn(N)
        before = {k: v.clone() for k, v in opt.state[p].items()} if step > 1 else None
        p_before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        if before is None:
            continue
        want_p, want_state = _reference_8bit_step(kind, p_before, g, before, 1e-2, hyper, step)
        torch.testing.assert_close(p.detach(), want_p, rtol=1.3e-6, atol=1e-6)
        for k, v in want_state.items():
            got = opt.state[p][k]
            if v.dtype == torch.uint8:  # nearest codes: allow the rare near-tie flip by one
                diff = (got.reshape(-1).int() - v.reshape(-1).int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, k
            else:
                torch.testing.assert_close(got, v, rtol=1e-6, atol=0)


def test_twenty_steps_track_bitsandbytes_and_fp32():
    torch.manual_seed(2)
    p0 = torch.randn(N)
    ps = [nn.Parameter(p0.clone()) for _ in range(3)]
    opts = [fusedopt.AdamW([ps[0]], lr=1e-3, state_dtype=torch.uint8), bnb.optim.AdamW8bit([ps[1]], lr=1e-3),
            torch.optim.AdamW([ps[2]], lr=1e-3, foreach=False)]
    for _ in range(20):
        g = torch.randn(N)
        for p, o in zip(ps, opts):
            p.grad = g.clone()
            o.step()
    travelled = (ps[2] - p0).norm()
    assert (ps[0] - ps[2]).norm() < 0.1 * travelled
    assert (ps[0] - ps[1]).norm() < 0.1 * travelled


def test_small_params_keep_fp32_moments_and_state_bytes():
    small, big = nn.Parameter(torch.randn(4095)), nn.Parameter(torch.randn(4096 * 3))
    opt = fusedopt.AdamW([small, big], state_dtype=torch.uint8)
    for p in (small, big):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in opt.state[small]
    st = opt.state[big]
    nbytes = sum(v.numel() * v.element_size() for k, v in st.items() if k != "step")
    assert nbytes / big.numel() == pytest.approx(2 + 2 * 4 / 256)  # two 1-byte codes + their absmax


def test_save_load_continue_is_bit_exact_with_weights_only():
    torch.manual_seed(3)
    p0 = torch.randn(N)
    a, b = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    oa = fusedopt.Lion([a], lr=1e-3, state_dtype=torch.uint8)
    grads = [torch.randn(N) for _ in range(6)]
    for g in grads[:3]:
        a.grad = g.clone()
        oa.step()
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)
    buf.seek(0)
    b.data.copy_(a.data)
    ob = fusedopt.Lion([b], lr=1e-3, state_dtype=torch.uint8)
    ob.load_state_dict(torch.load(buf, weights_only=True))
    assert ob.state[b]["exp_avg"].dtype == torch.uint8 and ob.state[b]["exp_avg_absmax"].dtype == torch.float32
    for g in grads[3:]:
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)
    assert all(torch.equal(oa.state[a][k], ob.state[b][k]) for k in oa.state[a])


def test_fp32_state_loads_quantized_and_dequantized_state_loads_into_torch():
    torch.manual_seed(4)
    p0 = torch.randn(N)
    t, f, back = (nn.Parameter(p0.clone()) for _ in range(3))
    ot = torch.optim.AdamW([t], lr=1e-3)
    t.grad = torch.randn(N)
    ot.step()
    of = fusedopt.AdamW([f], lr=1e-3, state_dtype=torch.uint8)
    of.load_state_dict(ot.state_dict())
    f.grad = torch.randn(N)
    of.step()  # quantizes the loaded fp32 moments, then steps
    st = of.state[f]
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg_absmax"].shape == (Q.num_blocks(N),)
    sd = of.state_dict()
    plain = fusedopt.dequantize_state_dict(sd)
    assert sd["state"][0]["exp_avg"].dtype == torch.uint8, "the argument was changed"
    assert set(plain["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert "state_dtype" not in plain["param_groups"][0]
    torch.testing.assert_close(plain["state"][0]["exp_avg"], deq(st["exp_avg"], st["exp_avg_absmax"], SIGNED))
    back.data.copy_(f.data)
    ob = torch.optim.AdamW([back], lr=1e-3)
    ob.load_state_dict(plain)
    back.grad = torch.randn(N)
    ob.step()
    assert torch.isfinite(back).all() and not torch.equal(back, f)


def test_bitsandbytes_state_dict_loads_and_training_continues():
    torch.manual_seed(5)
    p0 = torch.randn(N)
    a, b = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    ob = bnb.optim.AdamW8bit([a], lr=1e-3)
    for _ in range(3):
        a.grad = torch.randn(N)
        ob.step()
    sd = ob.state_dict()
    b.data.copy_(a.data)
    of = fusedopt.AdamW([b], lr=1e-3, state_dtype=torch.uint8)
    of.load_state_dict(sd)
    st = of.state[b]
    quant = sd["state"][0]["__bnb_optimizer_quant_state__"]
    assert torch.equal(st["exp_avg"].reshape(-1), quant["state1"]) and torch.equal(st["exp_avg_sq_absmax"], quant["absmax2"])
    assert float(st["step"]) == 3.0
    start = a.detach().clone()
    for _ in range(10):
        g = torch.randn(N)
        a.grad, b.grad = g.clone(), g.clone()
        ob.step()
        of.step()
    assert (a - b).norm() < 0.1 * (a - start).norm()


def test_stochastic_rounding_of_codes_is_unbiased_and_deterministic():
    """bf16 params with stochastic_rounding=True round the codes stochastically too. One step
    from zero state on a grad whose moments sit between codes: the mean of the dequantized
    first moment over 2^16 elements equals the fp32 moment's mean within 6 standard errors
    (each element's rounding error is at most one code gap; false-failure odds < 1e-8)."""
    n = 1 << 16

    def run(seed):
        p = nn.Parameter(torch.zeros(n, dtype=torch.bfloat16))
        opt = fusedopt.AdamW([p], lr=1e-3, state_dtype=torch.uint8, stochastic_rounding=True, seed=seed)
        g = torch.full((n,), 0.3)
        g[::256] = 1.0  # the block maximum: every other element normalises to 0.3 * 0.1 / 0.1 = 0.3
        p.grad = g.to(torch.bfloat16)
        opt.step()
        return opt.state[p]
    a, b = run(0), run(0)
    assert torch.equal(a["exp_avg"], b["exp_avg"])
    vals = deq(a["exp_avg"], a["exp_avg_absmax"], SIGNED).reshape(-1)
    mask = torch.ones(n, dtype=torch.bool)
    mask[::256] = False
    x = vals[mask] / a["exp_avg_absmax"].repeat_interleave(256)[mask]
    lo = SIGNED[(torch.searchsorted(SIGNED, torch.tensor(0.3), right=True) - 1)]
    hi = SIGNED[torch.searchsorted(SIGNED, torch.tensor(0.3), right=True)]
    assert set(x.unique().tolist()) <= {lo.item(), hi.item()}, "codes other than the two neighbours"
    gap = (hi - lo).item()
    se = gap / 2 / (mask.sum().item() ** 0.5)
    # The fp32 value the codes stand for: the bf16 grads' moments, normalised as the kernel does.
    g, gmax = torch.tensor(0.3).bfloat16().float(), torch.tensor(1.0)
    target = ((1 - 0.9) * g) * (1 / ((1 - 0.9) * gmax))
    assert abs(x.double().mean().item() - target.item()) < 6 * se
    assert 0 < (x == hi).float().mean().item() < 1  # (nearest rounding would put all on one code)


def test_uint8_state_refused_where_it_is_not_offered():
    p = nn.Parameter(torch.randn(N))
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        fusedopt.AdamW([p], state_dtype=torch.int8)
    opt = fusedopt.AdamWScheduleFree([p], state_dtype=torch.uint8)
    opt.train()
    p.grad = torch.randn(N)
    with pytest.raises(ValueError, match="moments of dtype torch.uint8 are not supported"):
        opt.step()
