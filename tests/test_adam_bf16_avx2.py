"""The AVX2 build's hand-vectorized Adam on bf16 params (csrc/cpu/adam_bf16_avx2.h) against the
generic element step it replaces there (element.h: step_element, what the baseline and AVX-512
builds and the CUDA kernels run), bit for bit, compiled with the AVX2 build's flags:
tests/cpp/adam_bf16_avx2_check.cpp. It reaches what the optimizer-level tests cannot: every
precision x state dtype x amsgrad, coupled / decoupled / no decay, maximize with a grad scale,
lengths around the 16-element block, stochastic-rounding offsets past 2**32 (a carry inside a
piece, a nonzero high half), and NaN, inf, signed-zero, subnormal, overflow and tie inputs.
tests/test_isa.py checks the whole AVX2 build against the baseline one through the optimizer.
"""
from __future__ import annotations

import platform
import subprocess

import pytest

from test_bf16_rounding import COMMON_FLAGS, ISA_CPU_FLAGS, ISA_FLAGS, ROOT, _compiler, _cpu_flags

SOURCE = ROOT / "tests" / "cpp" / "adam_bf16_avx2_check.cpp"


def test_avx2_adam_bf16_kernel_equals_step_element(tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler: set CXX or put c++/g++ on PATH")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the avx2 build exists on x86-64 only")
    missing = ISA_CPU_FLAGS["avx2"] - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {sorted(missing)}: the avx2 build is never picked here")
    exe = tmp_path / "adam_bf16_avx2_check"
    cmd = [*cxx, *COMMON_FLAGS, *ISA_FLAGS["avx2"], "-I", str(ROOT / "csrc"), str(SOURCE), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"compiling failed: {' '.join(cmd)}\n{build.stdout}{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 2, "the kernel header was not compiled in: the AVX2 flags did not reach it"
    assert run.returncode == 0, run.stderr[-4000:]
