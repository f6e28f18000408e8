"""`fusedopt.show_config()` / `python -m fusedopt`: what this build can do on this machine."""
from __future__ import annotations

import torch

from . import _backend as B
from ._version import __version__


def config() -> dict:
    info = {
        "version": __version__,
        "torch": torch.__version__,
        "backends": ["cpu"],
        "cpu_isa": B._C.isa(),
        "torch_threads": torch.get_num_threads(),  # the CPU kernels' threads too (caller + pool)
        "cuda_archs": None,
    }
    if B.cuda_built():
        mod = B.cuda_module()
        info["backends"].append("cuda")
        info["cuda_archs"] = list(mod.archs())
        info["cuda_runtime"] = B.cuda_version_text(mod.runtime_version)
        info["cuda_driver"] = B.cuda_version_text(mod.driver_version) if mod.driver_version > 0 else "none"
        info["cuda_devices"] = mod.device_count()
        problem = B.cuda_driver_problem()
        if problem is not None:
            info["cuda_problem"] = problem
    return info


def show_config() -> None:
    """Prints version, backends built, SIMD level, threads and CUDA archs; with the
    CUDA module, also its runtime and the driver's CUDA version, and why that driver cannot
    run it when it is too old."""
    for key, value in config().items():
        print(f"{key:>15}: {value}")
