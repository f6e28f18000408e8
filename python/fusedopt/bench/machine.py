"""What the numbers were measured on: machine, versions, fusedopt build."""
from __future__ import annotations

import importlib
import os
import platform
import sys

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info(device: str) -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = dict(platform=platform.platform(), cpu=cpu_model(), cores=os.cpu_count(),
                usable_cores=usable, torch_threads=torch.get_num_threads(), memory_gib=_mem_gib(),
                gpu=None)
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = dict(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                           capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                           count=torch.cuda.device_count())
    return info


def versions() -> dict:
    out = dict(python=platform.python_version(), torch=torch.__version__, numpy=None,
               fusedopt=None, fusedopt_isa=None)
    np = sys.modules.get("numpy")
    if np is not None:
        out["numpy"] = np.__version__
    try:
        fo = importlib.import_module("fusedopt")
        out["fusedopt"] = getattr(fo, "__version__", None)
        c = importlib.import_module("fusedopt._C")
        if hasattr(c, "isa"):
            out["fusedopt_isa"] = c.isa()
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    return out
