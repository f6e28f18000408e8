"""The bf16 rounding of csrc/fusedopt/precision.h, compiled the way each CPU kernel build is
(baseline, AVX2, AVX-512 flags of CMakeLists.txt) in loops the compiler vectorizes, against a
NumPy reference written here from the definitions:

* nearest: the bf16 value closest to the fp32 input, ties to the even mantissa, overflow to
  inf; a NaN becomes a quiet NaN with its sign and top payload bits;
* stochastic: the bf16 neighbour below in magnitude, plus one ulp when the input's 16 dropped
  bits plus the random word's low 16 bits reach 2**16; NaN as above;
* the Kahan store reads back exactly the nearest value it wrote.

Cases: every one of the 65,536 bf16 high halves with the low halves that decide rounding (0,
1, just below / at / above the tie, all ones, two random) and random words at and next to
each carry boundary. No GPU needed; the CUDA kernels compile the same header
(tests/test_cuda_logic.py).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "cpp" / "bf16_rounding_dump.cpp"

# The per-ISA flags of CMakeLists.txt (FUSEDOPT_CPU_FLAGS + FUSEDOPT_ISA_FLAGS_<isa>).
COMMON_FLAGS = ["-std=c++17", "-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
ISA_FLAGS = {
    "baseline": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-mprefer-vector-width=512"],
}
ISA_CPU_FLAGS = {"baseline": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> list[str] | None:
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = shutil.which("c++") or shutil.which("g++")
    return [found] if found else None


def _cases() -> tuple[np.ndarray, np.ndarray]:
    """(fp32 bits, random words) covering every high half with the decisive low halves."""
    rng = np.random.default_rng(0)
    high = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lows = [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF]
    bits = [high | np.uint32(lo) for lo in lows]
    bits += [high | rng.integers(0, 1 << 16, size=high.size, dtype=np.uint32) for _ in range(2)]
    bits = np.concatenate(bits)
    low = bits & np.uint32(0xFFFF)
    upper = rng.integers(0, 1 << 16, size=bits.size, dtype=np.uint32) << np.uint32(16)
    at_boundary = (np.uint32(0x10000) - low) & np.uint32(0xFFFF)  # smallest word that carries
    below_boundary = (at_boundary - np.uint32(1)) & np.uint32(0xFFFF)
    random_words = rng.integers(0, 1 << 32, size=bits.size, dtype=np.uint32)
    all_bits = np.concatenate([bits, bits, bits])
    all_random = np.concatenate([random_words, upper | at_boundary, upper | below_boundary])
    return all_bits, all_random


def _reference(bits: np.ndarray, random: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    mag = bits & np.uint32(0x7FFFFFFF)
    nan = mag > np.uint32(0x7F800000)
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x0040)
    below = mag & np.uint32(0xFFFF0000)  # the bf16 neighbour at or below |x|
    above = below + np.uint32(0x10000)  # the next bf16 up (inf above the largest finite)

    def value(m):  # magnitude bits -> float64, inf counted as 2**128 (where rounding overflows to)
        v = m.view(np.float32).astype(np.float64)
        return np.where(np.isinf(v), 2.0 ** 128, v)

    with np.errstate(invalid="ignore"):
        x = value(np.where(nan, 0, mag).astype(np.uint32))
        d_below = x - value(np.where(nan, 0, below).astype(np.uint32))
        d_above = value(np.where(nan | (mag >= np.uint32(0x7F800000)), 0x7F800000, above).astype(np.uint32)) - x
    odd = (below >> np.uint32(16)) & np.uint32(1)
    up = (d_below > 0) & ((d_above < d_below) | ((d_above == d_below) & (odd == 1)))
    nearest = ((np.where(up, above, below) >> np.uint32(16)) | sign).astype(np.uint32)
    nearest = np.where(nan, quiet_nan, nearest)

    carries = (mag & np.uint32(0xFFFF)).astype(np.uint64) + (random & np.uint32(0xFFFF)) >= (1 << 16)
    stochastic = ((np.where(carries, above, below) >> np.uint32(16)) | sign).astype(np.uint32)
    stochastic = np.where(nan, quiet_nan, stochastic)
    return nearest, stochastic


@pytest.fixture(scope="module")
def cases():
    bits, random = _cases()
    nearest, stochastic = _reference(bits, random)
    return bits, random, nearest, stochastic


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_bf16_rounding_matches_reference(isa, cases, tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler: set CXX or put c++/g++ on PATH")
    if isa != "baseline":
        import platform

        if platform.machine().lower() not in ("x86_64", "amd64"):
            pytest.skip(f"the {isa} build exists on x86-64 only")
        missing = ISA_CPU_FLAGS[isa] - _cpu_flags()
        if missing:
            pytest.skip(f"this CPU lacks {sorted(missing)}: the {isa} build is never picked here")
    exe = tmp_path / f"bf16_rounding_{isa}"
    cmd = [*cxx, *COMMON_FLAGS, *ISA_FLAGS[isa], "-I", str(ROOT / "csrc"), str(SOURCE), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"compiling failed: {shlex.join(cmd)}\n{build.stdout}{build.stderr}"

    bits, random, nearest, stochastic = cases
    payload = np.uint32(bits.size).tobytes() + np.stack([bits, random], axis=1).astype(np.uint32).tobytes()
    run = subprocess.run([str(exe)], input=payload, capture_output=True, timeout=120)
    assert run.returncode == 0, f"{exe.name} exited with {run.returncode} (3: the Kahan store rounded differently)"
    out = np.frombuffer(run.stdout, dtype=np.uint32).reshape(-1, 3)
    assert out.shape[0] == bits.size

    for name, got, want in (("nearest", out[:, 0], nearest), ("stochastic", out[:, 1], stochastic),
                            ("Kahan read-back", out[:, 2], nearest << np.uint32(16))):
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, (f"{isa} {name}: {bad.size} mismatches, e.g. input {bits[bad[0]]:#010x} random "
                               f"{random[bad[0]]:#010x}: got {got[bad[0]]:#x}, want {want[bad[0]]:#x}")
