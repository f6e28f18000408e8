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
        "openmp_threads": B._C.omp_max_threads(),
        "torch_threads": torch.get_num_threads(),
        "cuda_archs": None,
    }
    if B.cuda_built():
        mod = B.cuda_module()
        info["backends"].append("cuda")
        info["cuda_archs"] = list(mod.archs())
        info["cuda_runtime"] = mod.cuda_runtime_version()
        info["cuda_devices"] = mod.device_count()
    return info


def show_config() -> None:
    """Prints version, backends built, SIMD level, OpenMP threads and CUDA archs."""
    for key, value in config().items():
        print(f"{key:>15}: {value}")
