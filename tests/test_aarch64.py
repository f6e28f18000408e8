"""The CPU kernels on AArch64 (Graviton, Grace), checked from this x86 machine: the kernels and
``tests/cpp/step_dump.cpp`` are built with the AArch64 cross-compiler (the baseline build, which
is what an AArch64 machine runs) and run under qemu-user; their output must be the bytes the
same program gives built for the host. The compiler's vectorization report of the AArch64
build must show the element loops vectorized about as often as on the host (NEON: 4 floats a
vector, as SSE2's 4).

Needs ``aarch64-linux-gnu-g++`` and ``qemu-aarch64`` (Debian: g++-aarch64-linux-gnu and
qemu-user; scripts/setup.sh installs them where it can).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CROSS = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
# The CPU kernels' flags (CMakeLists.txt: FUSEDOPT_CPU_FLAGS), baseline instruction set.
FLAGS = ["-std=c++17", "-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp",
         "-DFUSEDOPT_ISA=baseline", "-I", str(ROOT / "csrc"), "-fopt-info-vec-optimized"]


def _sources() -> list[str]:
    cpu = sorted(str(p) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    return [str(ROOT / "tests" / "cpp" / "step_dump.cpp"), *cpu]


def _element_loops_vectorized(report: str) -> int:
    return sum(1 for line in report.splitlines() if "loop vectorized" in line and "element.h" in line)


def test_aarch64_build_computes_the_host_bits_and_vectorizes(tmp_path):
    missing = [tool for tool in (CROSS, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: g++-aarch64-linux-gnu, qemu-user)")
    host_exe, a64_exe = tmp_path / "host_dump", tmp_path / "a64_dump"
    builds = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for cmd in ([shutil.which("g++") or "c++", *FLAGS, *_sources(), "-o", str(host_exe)],
                          [CROSS, *FLAGS, "-static", *_sources(), "-o", str(a64_exe)])]
    reports = []
    for b in builds:
        out, err = b.communicate(timeout=600)
        assert b.returncode == 0, f"build failed: {' '.join(b.args)}\n{err[-4000:]}"
        reports.append(err)
    host = subprocess.run([str(host_exe)], capture_output=True, timeout=300)
    a64 = subprocess.run([QEMU, str(a64_exe)], capture_output=True, timeout=600)
    assert host.returncode == 0, host.stderr.decode()[-2000:]
    assert a64.returncode == 0, a64.stderr.decode()[-2000:]
    assert b"isa: baseline" in a64.stderr
    assert len(host.stdout) > 10_000_000  # every case wrote its buffers
    assert a64.stdout == host.stdout, "the AArch64 build computes other bits than the host build"
    host_loops, a64_loops = map(_element_loops_vectorized, reports)
    assert host_loops > 100
    assert a64_loops >= 0.9 * host_loops, f"AArch64 vectorized {a64_loops} element loops, the host {host_loops}"
