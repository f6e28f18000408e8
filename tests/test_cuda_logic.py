"""The CUDA kernels' logic, tested on the CPU: no GPU and no CUDA toolkit needed.

``tests/cpp/cuda_logic_test.cpp`` includes the headers the kernels are built from
(csrc/cuda/launch_plan.h, csrc/cuda/element_tiles.h and the shared math in csrc/fusedopt/) and
checks, with the system C++ compiler: that the launch plan covers every element of every tensor
exactly once (tensors past 2**31 and 2**32 elements included), that the 16-byte tile path with
its one-element tail writes the same bits as a plain loop of the element functions for every
combination the step dispatch builds, and that a misaligned buffer selects the one-element
path. What it cannot cover is the device's own arithmetic and memory system; tests/test_cuda.py
compares those with the CPU build where a GPU is present.

The Python side of the CUDA paths is tested here too, with stand-ins for what needs a device:
which device and stream a launch names, the driver/runtime version check, the float64 clip
arithmetic under a large GradScaler scale, and the compiled sum-of-squares op's output type.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fusedopt
from fusedopt import _backend as B
from fusedopt._norms import clip_norm_and_factor

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


# ---- which device a CUDA launch names ---------------------------------------------------------
class _FakeStream:
    def __init__(self, index):
        self.cuda_stream = 0  # torch's default stream: handle 0 on every device


def test_cuda_launch_kwargs_name_the_tensors_device(monkeypatch):
    """Every CUDA launch takes its keywords from launch_kwargs: the stream alone (0 for
    torch's default stream on any device) cannot say which device to launch on, so the
    device index travels with it, also when another device is current."""
    asked = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: asked.append(index) or _FakeStream(index))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert B.launch_kwargs(torch.device("cuda", 1)) == {"stream": 0, "device": 1}
    assert B.launch_kwargs(torch.device("cuda")) == {"stream": 0, "device": 0}  # no index: the current one
    assert asked == [1, 0]  # each time the stream of that same device
    assert B.launch_kwargs(torch.device("cpu")) == {"num_threads": torch.get_num_threads()}


# ---- the driver against the runtime the CUDA module links ----------------------------------------
@pytest.mark.parametrize("driver,runtime", [(13000, 13000), (13020, 13000), (13000, 13010), (14000, 13000),
                                            (12080, 12040)])
def test_a_driver_of_the_runtimes_major_version_or_newer_is_enough(driver, runtime):
    # CUDA's minor-version compatibility: any 13.x driver runs a 13.y runtime.
    assert B.driver_problem(driver, runtime) is None


@pytest.mark.parametrize("driver,runtime,names", [
    (12080, 13000, ("12.8", "13.0")),
    (12090, 13010, ("12.9", "13.1")),
    (11040, 12000, ("11.4", "12.0")),
])
def test_an_older_driver_is_reported_with_both_versions(driver, runtime, names):
    problem = B.driver_problem(driver, runtime)
    assert problem is not None and all(v in problem for v in names), problem


def test_no_driver_is_reported():
    problem = B.driver_problem(0, 13000)
    assert problem is not None and "no NVIDIA driver" in problem and "13.0" in problem, problem


class _FakeCudaModule:
    """What fusedopt._backend reads from fusedopt._C_cuda at import, on a machine whose driver
    supports CUDA 12.8 while the module was built with CUDA 13.0."""
    driver_version, runtime_version = 12080, 13000

    @staticmethod
    def archs():
        return [90]

    @staticmethod
    def device_count():
        return 0  # what the real runtime reports under an insufficient driver


def test_an_old_driver_is_shown_and_refuses_cuda_params_clearly(monkeypatch, capsys):
    """The module imports fine under an old driver; show_config() says why it cannot run and
    the first launch for CUDA params raises naming both versions, instead of the driver's
    "insufficient" error from inside a kernel launch."""
    real_import = B.importlib.import_module
    monkeypatch.setattr(B.importlib, "import_module",
                        lambda name: _FakeCudaModule if name == "fusedopt._C_cuda" else real_import(name))
    monkeypatch.setattr(B, "_cuda_module", None)
    monkeypatch.setattr(B, "_cuda_error", None)
    monkeypatch.setattr(B, "_cuda_driver_error", None)
    assert B.cuda_built()  # imported: the module itself is fine
    assert B.module_for(torch.device("cpu")) is B._C  # CPU params are unaffected
    with pytest.raises(RuntimeError, match=r"fusedopt cannot run on CUDA params: .*12\.8.*13\.0"):
        B.module_for(torch.device("cuda", 0))
    fusedopt.show_config()
    shown = capsys.readouterr().out
    assert "cuda_driver: 12.8" in shown and "cuda_runtime: 13.0" in shown, shown
    assert "cuda_problem:" in shown and "update the driver" in shown, shown


# ---- the clip norm under a large GradScaler scale ---------------------------------------------------
def test_clip_norm_of_grads_scaled_by_2_70_stays_finite():
    """GradScaler's scale keeps doubling while bf16/fp32 grads never overflow: at 2**70 the
    scaled grads' sum of squares (2**140 * sum g^2) is past float32's range, so it must reach
    clip_norm_and_factor as float64 (as the CPU's and, now, the CUDA kernel's output is). The
    unscaled norm is exact here: 3 * 2**70 and its square are powers of two times 3 and 9."""
    scale = 2.0 ** 70
    grads = [torch.tensor([2.0, -1.0]), torch.tensor([2.0])]  # global norm 3
    sum_sq = torch.stack([(g.double() * scale).pow(2).sum() for g in grads]).sum()
    assert torch.isinf(sum_sq.float()), "premise: the scaled sum of squares overflows float32"
    norm, factor = clip_norm_and_factor(sum_sq, torch.tensor(scale), max_norm=1.0)
    assert norm.dtype == torch.float32 and float(norm) == 3.0
    # torch.nn.utils.clip_grad_norm_'s coefficient on the unscaled grads (the reference).
    expected = torch.clamp(torch.tensor(1.0, dtype=torch.float64) / (3.0 + 1e-6), max=1.0).float()
    assert float(factor) == float(expected) and 0.0 < float(factor) < 1.0


def test_compiled_sum_squares_op_is_float64_on_cuda():
    """The torch.compile op's output type (its fake implementation, what Inductor plans with)
    is float64 on a CUDA device as on the CPU: no float32 round trip of the scaled sum."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        grads = [torch.empty(5, device="cuda:1"), torch.empty(3, 2, device="cuda:1")]
        out = torch.ops.fusedopt.sum_squares(grads)
    assert (out.dtype, out.device, out.shape) == (torch.float64, torch.device("cuda", 1), torch.Size([]))


# ---- the GPU test tooling ----------------------------------------------------------------------------
def test_compute_sanitizer_runs_without_torchs_caching_allocator():
    """scripts/gpu_test.sh: the caching allocator's 512-byte blocks would hide accesses just
    past a tensor from memcheck, so every compute-sanitizer command turns it off."""
    script = (ROOT / "scripts" / "gpu_test.sh").read_text()
    commands = [line for line in script.replace("\\\n", " ").splitlines()
                if "compute-sanitizer --tool" in line and not line.lstrip().startswith("#")]
    assert commands, "no compute-sanitizer stage found"
    for command in commands:
        assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer" in command, command


def test_the_cuda_suite_filters_inductors_tf32_warning_verbatim():
    """tests/test_cuda.py filters the warning Inductor raises at the first CUDA compile on
    sm_80+ (pyproject turns warnings into errors); the filter must match torch's text."""
    import inspect

    from torch._inductor import compile_fx

    import test_cuda

    action, message = test_cuda.TF32_WARNING.split(":", 1)
    assert action == "ignore"
    assert f'"{message}' in inspect.getsource(compile_fx._warn_tf32_disabled)
    assert any(m.name == "filterwarnings" and m.args == (test_cuda.TF32_WARNING,) for m in test_cuda.pytestmark)
