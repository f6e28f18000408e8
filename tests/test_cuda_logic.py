"""The CUDA kernels' logic, tested on the CPU: no GPU and no CUDA toolkit needed.

``tests/cpp/cuda_logic_test.cpp`` includes the headers the kernels are built from
(csrc/cuda/launch_plan.h, csrc/cuda/element_tiles.h and the shared math in csrc/fusedopt/) and
checks, with the system C++ compiler: that the launch plan covers every element of every tensor
exactly once (tensors past 2**31 and 2**32 elements included), that the 16-byte tile path with
its one-element tail writes the same bits as a plain loop of the element functions for every
combination the step dispatch builds, and that a misaligned buffer selects the one-element
path. What it cannot cover is the device's own arithmetic and memory system; tests/test_cuda.py
compares those with the CPU build where a GPU is present.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "cpp" / "cuda_logic_test.cpp"


def _compiler() -> list[str] | None:
    """$CXX (may carry a launcher or flags, e.g. "ccache g++"), else c++ or g++ on PATH."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = shutil.which("c++") or shutil.which("g++")
    return [found] if found else None


def test_cuda_logic_on_host(tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler: set CXX or put c++/g++ on PATH")
    exe = tmp_path / "cuda_logic_test"
    cmd = [*cxx, "-std=c++17", "-O1", "-I", str(ROOT / "csrc"), str(SOURCE), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"compiling failed: {shlex.join(cmd)}\n{build.stdout}{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{exe.name} exited with {run.returncode}:\n{run.stdout}{run.stderr}"
