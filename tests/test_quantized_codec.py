"""The 8-bit codec of every CPU build (the AVX-512 build reads the maps from registers,
cpu/quantized_simd.h; the others read bucket tables, quantized.h: quantize_code) against a
reference written here with numpy, exactly (no tolerance: codes are promised bit for bit):

- nearest code: the number of float32 midpoints (map[c] + map[c+1]) / 2 below x
  (np.searchsorted, side left); NaN as quantize_code has always treated it: a NaN falls in the
  last bucket of its sign, so 255 with the sign bit clear, 0 with it set;
- stochastic code: quantize_code<true>'s formula in float32 on that nearest code, with the
  random bits of element_random (lowbias32 of the element index under the key);
- dequantize: map[c] * scale in float32.

Each ISA runs in its own process (FUSEDOPT_CPU_ISA), as in test_isa.py; a build the CPU
lacks falls back to a narrower one and is then tested twice.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from fusedopt import _quantization as Q

SCRIPT = r"""
import sys, numpy as np, torch
from fusedopt import _C
from fusedopt import _quantization as Q
values = np.load(sys.argv[1])
maps = Q.maps(torch.device("cpu"))
out = {"isa": np.array(_C.isa())}
for state in (0, 1, 2):
    out[f"nearest{state}"] = _C.quantize_codes(maps.data_ptr(), values, state)
    out[f"stochastic{state}"] = _C.quantize_codes(maps.data_ptr(), values, state, True, 0x1234567, 0x89ABCDEF)
    for j, scale in enumerate((1.0, 0.37, 3e-5, 1e-40, float("inf"))):
        codes = np.arange(1000, dtype=np.uint8)  # every code, in an array that ends mid-vector
        out[f"dequantized{state}_{j}"] = _C.dequantize_codes(maps.data_ptr(), codes, state, scale)
np.savez(sys.argv[2], **out)
"""
SCALES = (1.0, 0.37, 3e-5, 1e-40, float("inf"))
KEY_A, KEY_B = 0x1234567, 0x89ABCDEF


def f32(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def probe_values() -> np.ndarray:
    """Every map value and midpoint of both maps with their float32 neighbours (for midpoints
    up to 128 steps away), signed zeros,
    values below 2^-24 (denormals included), +-1 and beyond, infinities, NaNs of both signs,
    then uniform values in [-1, 1], log-spaced magnitudes and random bit patterns. An odd
    length, so the last block and the last vector are partial."""
    parts = []
    for signed in (True, False):
        m = Q.dynamic_map(signed).numpy()
        mids = ((m[:-1].astype(np.float64) + m[1:]) / 2).astype(np.float32)
        for v in (m, mids, -m, -mids):
            parts += [v, np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))]
        # 1..128 float32 steps either side of every midpoint: across the band around each one
        # where the AVX-512 build's decade search hands the lane to the exact path.
        steps = np.arange(1, 129, dtype=np.int64)
        bits = np.concatenate([mids, -mids]).view(np.uint32).astype(np.int64)[:, None]
        parts.append(np.concatenate([bits + steps, bits - steps]).reshape(-1).astype(np.uint32).view(np.float32))
    special = [0.0, -0.0, 1e-30, -1e-30, 2.0**-25, -(2.0**-25), 2.0**-24, -(2.0**-24), 1.0, -1.0, 2.0, -2.0, 3e38,
               -3e38, np.inf, -np.inf]
    parts.append(np.array(special, dtype=np.float32))
    parts.append(f32([1, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x3F800001, 0xBF800001]))  # denormals, 1 + ulp
    parts.append(f32([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF]))  # NaNs
    rng = np.random.default_rng(0)
    parts.append(rng.uniform(-1, 1, 300_000).astype(np.float32))
    mags = (10.0 ** rng.uniform(-9, 0.5, 100_000)).astype(np.float32)
    parts.append(mags * rng.choice(np.array([-1, 1], dtype=np.float32), mags.size))
    parts.append(rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32))
    values = np.concatenate(parts).astype(np.float32)
    return values[:-3] if values.size % 16 == 0 else values


def ref_nearest(x: np.ndarray, qmap: np.ndarray) -> np.ndarray:
    mids = ((qmap[:-1].astype(np.float64) + qmap[1:]) / 2).astype(np.float32)
    with np.errstate(invalid="ignore"):
        codes = np.searchsorted(mids, x, side="left").astype(np.int64)
    nan = np.isnan(x)
    codes[nan] = np.where(np.signbit(x[nan]), 0, 255)
    return codes


def mix32(x: np.ndarray) -> np.ndarray:
    """precision.h: mix32 (lowbias32) on uint32 arrays."""
    x = x.astype(np.uint64)
    m = np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & m
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & m
    x ^= x >> np.uint64(16)
    return x.astype(np.uint32)


def ref_stochastic(x: np.ndarray, qmap: np.ndarray, state: int) -> np.ndarray:
    """quantize_code<true> (quantized.h) in float32 on the reference nearest code. The random
    bits of element g are mix32(g ^ key) (random_bits with a 32-bit index): state 0 takes the
    high half of stream a, state 1 the low half of stream b, state 2 its high half."""
    g = np.arange(x.size, dtype=np.uint32)
    bits = mix32(g ^ np.uint32(KEY_A if state == 0 else KEY_B))
    r16 = (bits & np.uint32(0xFFFF)) if state == 1 else (bits >> np.uint32(16))
    nearest = ref_nearest(x, qmap)
    with np.errstate(invalid="ignore", over="ignore"):
        lo = np.maximum(nearest - (x < qmap[nearest]), 0)
        hi = np.minimum(lo + 1, 255)
        below = x - qmap[lo]
        above = qmap[hi] - x
        u = r16.astype(np.float32) * np.float32(1.0 / 65536.0)
        up = (below > 0) & (u * (below + above) < below) & (hi != lo)
    return lo + up


def run_isa(isa: str | None, values_path, out_path) -> dict:
    env = dict(os.environ)
    env.pop("FUSEDOPT_CPU_ISA", None)
    if isa:
        env["FUSEDOPT_CPU_ISA"] = isa
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(values_path), str(out_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return dict(np.load(out_path))


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    values = probe_values()
    path = tmp_path_factory.mktemp("codec") / "values.npy"
    np.save(path, values)
    return values, path


# None: the widest build, on a CPU with AVX512_VBMI the AVX-512 build with byte-permute
# dequantizing; "avx512" caps it to the permutes of AVX-512F/BW.
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512", None])
def test_codec_matches_the_numpy_reference(isa, probes, tmp_path):
    values, path = probes
    out = run_isa(isa, path, tmp_path / "out.npz")
    for state in (0, 1, 2):
        qmap = Q.dynamic_map(state == 0).numpy()
        want = ref_nearest(values, qmap)
        got = out[f"nearest{state}"].astype(np.int64)
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, (f"{out['isa']} state {state}: {bad.size} nearest codes differ, e.g. x="
                               f"{values[bad[:5]].tolist()} got {got[bad[:5]].tolist()} want {want[bad[:5]].tolist()}")
        want = ref_stochastic(values, qmap, state)
        got = out[f"stochastic{state}"].astype(np.int64)
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, (f"{out['isa']} state {state}: {bad.size} stochastic codes differ, e.g. x="
                               f"{values[bad[:5]].tolist()} got {got[bad[:5]].tolist()} want {want[bad[:5]].tolist()}")
        codes = np.arange(1000, dtype=np.uint8)
        for j, scale in enumerate(SCALES):
            with np.errstate(invalid="ignore", over="ignore"):
                want = qmap[codes] * np.float32(scale)
            got = out[f"dequantized{state}_{j}"]
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (state, scale)


def test_stochastic_reference_draws_both_neighbours():
    """The reference above is not vacuous: on values between codes it rounds up for some
    elements and down for others."""
    values = probe_values()
    qmap = Q.dynamic_map(True).numpy()
    inside = (np.abs(values) < 1) & ~np.isin(values, qmap)
    sr = ref_stochastic(values, qmap, 0)[inside]
    nearest = ref_nearest(values, qmap)[inside]
    assert 0.2 < np.mean(sr != nearest) < 0.8


def test_codec_hooks_refuse_bad_arguments():
    import torch

    from fusedopt import _C

    maps = Q.maps(torch.device("cpu")).data_ptr()
    values = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match="state"):
        _C.quantize_codes(maps, values, 3)
    with pytest.raises(ValueError, match="maps"):
        _C.quantize_codes(0, values, 0)
    with pytest.raises(ValueError, match="1-D"):
        _C.dequantize_codes(maps, np.zeros((2, 2), dtype=np.uint8), 0)
