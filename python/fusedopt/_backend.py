"""Loads the compiled modules and maps torch/NumPy dtypes to the kernels' dtype codes.

The CPU module `_C` is always built. The CUDA module `_C_cuda` is optional (built only where
a CUDA compiler was found) and loaded on first use by a CUDA tensor.
"""
from __future__ import annotations

import importlib

import numpy as np
import torch  # noqa: F401  (loads torch's OpenMP runtime first, so _C shares it)

from . import _C

# Wire codes of csrc/fusedopt/common.h.
FLOAT32, BFLOAT16, FLOAT16, FLOAT64, UINT8_BLOCKWISE = 0, 1, 2, 3, 4
PLAIN, MASTER, STOCHASTIC, KAHAN = 0, 1, 2, 3
COUPLED, DECOUPLED, INDEPENDENT = 0, 1, 2
WEIGHT_DECAY_MODES = {"coupled": COUPLED, "decoupled": DECOUPLED, "independent": INDEPENDENT}

# Columns of csrc/fusedopt/tensor_table.h.
(COL_PARAM, COL_GRAD, COL_STATE0, COL_STATE1, COL_STATE2, COL_EXTRA, COL_STEP, COL_NUMEL, COL_GROUP,
 COL_PARAM_INDEX, COL_FLAGS, COL_LR, COL_SEED, COL_RNG_OFFSET, COL_ABSMAX0, COL_ABSMAX1, COL_ABSMAX2, COL_BETA1,
 COL_BETA2, COL_PARAM_FROM, COL_EXTRA_FROM, COL_STATE0_FROM, COL_STATE1_FROM, COL_STATE2_FROM, COL_GRAD_MIX,
 COL_GRAD_MIX_WEIGHT, COL_EXTRA_TO, COL_STATE0_TO, COL_STATE1_TO, COL_STATE2_TO) = range(30)
TABLE_COLUMNS = 30
# The one-step input and output columns (zero between steps).
INPUT_FROM_COLUMNS = (COL_PARAM_FROM, COL_EXTRA_FROM, COL_STATE0_FROM, COL_STATE1_FROM, COL_STATE2_FROM, COL_GRAD_MIX,
                      COL_GRAD_MIX_WEIGHT, COL_EXTRA_TO, COL_STATE0_TO, COL_STATE1_TO, COL_STATE2_TO)
FLAG_FIRST_STEP = 1
(G_LR, G_BETA1, G_BETA2, G_EPS, G_WEIGHT_DECAY, G_WD_MODE, G_MAXIMIZE, G_NESTEROV, G_AUX0, G_AUX1,
 G_AUX2) = range(11)
GROUP_FIELDS = 11
# Ids of csrc/fusedopt/algorithms.h: the `algorithm` argument of the kernels' `step`.
ADAM, SGD, LION, SCHEDULE_FREE_ADAMW, SCHEDULE_FREE_SGD = range(5)
_TB = torch._C.TensorBase
_C.set_tensor_accessors(_TB.data_ptr, _TB.is_contiguous, _TB.numel, _TB.__dict__["grad"], _TB.__dict__["dtype"])
assert (_C.table_columns, _C.group_fields, _C.num_algorithms) == (TABLE_COLUMNS, GROUP_FIELDS, 5), \
    "stale fusedopt._C build"

TORCH_DTYPE_CODES = {torch.float32: FLOAT32, torch.bfloat16: BFLOAT16, torch.float16: FLOAT16,
                     torch.float64: FLOAT64}
# State dtypes: the same codes, plus 8-bit blockwise codes (csrc/fusedopt/quantized.h).
STATE_DTYPE_CODES = {**TORCH_DTYPE_CODES, torch.uint8: UINT8_BLOCKWISE}
# Weight averages are float32 (averaging.h): float64 params would lose precision, so they are refused.
AVERAGE_SOURCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NUMPY_DTYPE_CODES = {np.dtype(np.float32): FLOAT32, np.dtype(np.float16): FLOAT16, np.dtype(np.float64): FLOAT64}


def group_row(lr, *, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0, wd_mode=COUPLED, maximize=False,
              nesterov=False, aux=()) -> list[float]:
    """One row of the group table (csrc/fusedopt/tensor_table.h); each algorithm's header
    says which fields it reads."""
    row = [lr, beta1, beta2, eps, float(weight_decay), wd_mode, float(maximize), float(nesterov), 0.0, 0.0, 0.0]
    row[G_AUX0:G_AUX0 + len(aux)] = aux
    return row

_cuda_module = None
_cuda_error: str | None = None
_cuda_driver_error: str | None = None


def cuda_module():
    """The CUDA kernels, or a RuntimeError saying why they are not available."""
    global _cuda_module, _cuda_error, _cuda_driver_error
    if _cuda_module is None and _cuda_error is None:
        try:
            _cuda_module = importlib.import_module("fusedopt._C_cuda")
        except ImportError as e:
            _cuda_error = str(e)
        else:
            _cuda_driver_error = driver_problem(_cuda_module.driver_version, _cuda_module.runtime_version)
    if _cuda_module is None:
        raise RuntimeError(
            "fusedopt was built without its CUDA module (no CUDA compiler at build time, or "
            f"FUSEDOPT_CUDA=0): {_cuda_error}. Rebuild with nvcc on PATH to optimize CUDA params.")
    return _cuda_module


def cuda_built() -> bool:
    try:
        cuda_module()
        return True
    except RuntimeError:
        return False


def cuda_version_text(version: int) -> str:
    """12080 -> "12.8" (CUDA's 1000 * major + 10 * minor)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_problem(driver_version: int, runtime_version: int) -> str | None:
    """Why the installed driver cannot run the CUDA runtime linked into fusedopt's CUDA
    module, or None when it can. Versions are CUDA's integers (1000 * major + 10 * minor);
    a driver version of 0 means no driver. CUDA's minor-version compatibility lets a driver of
    the runtime's major version run any of its minor versions, so only the major is compared;
    an older driver imports the module fine and fails at the first launch ("driver version
    is insufficient")."""
    runtime = cuda_version_text(runtime_version)
    if driver_version <= 0:
        return (f"no NVIDIA driver was found; fusedopt's CUDA module (CUDA {runtime} runtime) needs a driver "
                f"for CUDA {runtime_version // 1000}.x")
    if driver_version // 1000 < runtime_version // 1000:
        return (f"the NVIDIA driver supports CUDA up to {cuda_version_text(driver_version)}, but fusedopt's CUDA "
                f"module was built with the CUDA {runtime} runtime and needs a driver for CUDA "
                f"{runtime_version // 1000}.x: update the driver, or rebuild fusedopt with a CUDA toolkit of "
                f"major version {driver_version // 1000} or older")
    return None


def cuda_driver_problem() -> str | None:
    """driver_problem() of this machine, read when the CUDA module was loaded (None when it is
    not built: cuda_module() says why)."""
    if not cuda_built():
        return None
    return _cuda_driver_error


def cuda_launch_module():
    """The CUDA module for a launch: a RuntimeError naming both versions when the driver
    cannot run it, instead of the driver's "insufficient" error at the first kernel."""
    mod = cuda_module()
    if _cuda_driver_error is not None:
        raise RuntimeError(f"fusedopt cannot run on CUDA params: {_cuda_driver_error}")
    return mod


def module_for(device: torch.device):
    if device.type == "cpu":
        return _C
    if device.type == "cuda":
        return cuda_launch_module()
    raise ValueError(f"unsupported device {device}")


def num_threads() -> int:
    return torch.get_num_threads()


def launch_kwargs(device: torch.device) -> dict:
    """The backend's own trailing keywords of every kernel call: the CPU's thread count
    (torch's intra-op setting), or the CUDA stream (torch's current stream on that device)
    with that device's index. The index is needed as well: torch's default stream is handle 0
    on every device, so the module makes `device` current for the launch."""
    if device.type == "cpu":
        return {"num_threads": num_threads()}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"stream": torch.cuda.current_stream(index).cuda_stream, "device": index}


def is_dense(shape, strides) -> bool:
    """Contiguous or a permutation of a contiguous layout (no gaps, no overlap): the kernels
    can then walk the storage as one flat array in which every tensor of the same layout
    lines up element for element."""
    if any(n == 0 for n in shape):
        return True  # no elements: nothing to walk
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(strides, shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True
