"""The CUDA module as built, on any machine: it imports without a GPU, reports what it was
built for, and refuses malformed calls exactly as the CPU module does (both bind the same
checks, csrc/bindings_common.h) before any kernel could launch. Skipped only where the
module was not built (no nvcc at build time, or FUSEDOPT_CUDA=0); tests/test_cuda.py runs
the kernels where a GPU is present."""
from __future__ import annotations

import re

import numpy as np
import pytest

from fusedopt import _backend as B

pytestmark = pytest.mark.skipif(not B.cuda_built(), reason="fusedopt was built without its CUDA module")

MODULES = ["cpu", "cuda"]


def _module(name):
    return B._C if name == "cpu" else B.cuda_module()


def _backend_kwargs(name):
    return {"num_threads": 1} if name == "cpu" else {"stream": 0, "device": 0}


def _valid_tables(n_rows=2, n_groups=1):
    table = np.zeros((n_rows, B.TABLE_COLUMNS), dtype=np.int64)
    groups = np.zeros((n_groups, B.GROUP_FIELDS), dtype=np.float64)
    return table, groups


def test_imports_and_reports_without_a_device():
    mod = B.cuda_module()
    archs = mod.archs()
    assert archs and all(isinstance(a, int) and a >= 50 for a in archs), archs
    assert mod.device_count() >= 0  # 0 here: the probe clears the error instead of raising
    assert mod.table_columns == B._C.table_columns and mod.group_fields == B._C.group_fields


def test_reports_the_runtime_and_driver_versions_read_at_import():
    mod = B.cuda_module()
    assert mod.runtime_version == mod.cuda_runtime_version() >= 11000, mod.runtime_version
    assert mod.driver_version == mod.cuda_driver_version() >= 0  # 0: no driver on this machine
    assert B.cuda_driver_problem() == B.driver_problem(mod.driver_version, mod.runtime_version)


def _keywords(fn):
    """Parameter names from pybind11's signature line."""
    first = fn.__doc__.splitlines()[0]
    return re.findall(r"(\w+):", first[first.index("(") + 1:])


def test_step_keywords_match_the_cpu_module():
    cpu, cuda = _keywords(B._C.step), _keywords(B.cuda_module().step)
    assert cpu[:-1] == cuda[:-2], (cpu, cuda)
    assert (cpu[-1], cuda[-2:]) == ("num_threads", ["stream", "device"])


def _empty_calls(mod):
    """One well-formed call per kernel of the CUDA module, over no tensors at all."""
    table, groups = _valid_tables(n_rows=0)
    none = np.zeros(0, np.int64)
    return {
        "adam": lambda **kw: mod.step(B.ADAM, table, groups, 0, 0, 0, False, **kw),
        "sgd": lambda **kw: mod.step(B.SGD, table, groups, 0, 0, 0, True, **kw),
        "sum_squares": lambda **kw: mod.sum_squares(none, none, 0, 8, 8, **kw),
        "average": lambda **kw: mod.average(none, none, none, 0, 0.5, **kw),
    }


@pytest.mark.parametrize("kernel", ["adam", "sgd", "sum_squares", "average"])
@pytest.mark.parametrize("kwargs", [{"stream": 0}, {"stream": 0, "device": -1}], ids=["no-device", "negative"])
def test_every_launch_must_name_its_device(kernel, kwargs):
    """Stream 0 is the default stream of whichever device is current, so a call without the
    tensors' device could launch on the wrong GPU: it is refused before anything runs."""
    with pytest.raises(ValueError, match=r"device must be the CUDA device index \(>= 0\) of the tensors"):
        _empty_calls(B.cuda_module())[kernel](**kwargs)


BAD_CALLS = [
    pytest.param(lambda t, g: (t[:, :-1], g, 0, 0, 0), r"table must be \(n_tensors, \d+\)", id="table-columns"),
    pytest.param(lambda t, g: (t, g[:, :-1], 0, 0, 0), r"groups must be \(n_groups, \d+\)", id="group-fields"),
    pytest.param(lambda t, g: (t, g, 7, 0, 0), "bad dtype code for params", id="param-dtype"),
    pytest.param(lambda t, g: (t, g, 0, -1, 0), "bad dtype code for state", id="state-dtype"),
    pytest.param(lambda t, g: (t, g, 0, 0, 4), "bad precision code", id="precision"),
]


@pytest.mark.parametrize("backend", MODULES)
@pytest.mark.parametrize("algorithm", [-1, 5])
def test_an_unknown_algorithm_is_refused(backend, algorithm):
    table, groups = _valid_tables()
    with pytest.raises(ValueError, match=f"unknown algorithm id {algorithm}"):
        _module(backend).step(algorithm, table, groups, 0, 0, 0, False, **_backend_kwargs(backend))


@pytest.mark.parametrize("backend", MODULES)
@pytest.mark.parametrize("make_args,match", BAD_CALLS)
def test_malformed_step_calls_are_refused(backend, make_args, match):
    table, groups = _valid_tables()
    args = make_args(table, groups)
    with pytest.raises(ValueError, match=match):
        _module(backend).step(B.ADAM, *args, False, **_backend_kwargs(backend))


@pytest.mark.parametrize("backend", MODULES)
def test_a_row_naming_a_missing_group_is_refused(backend):
    table, groups = _valid_tables(n_rows=3, n_groups=2)
    table[1, B.COL_GROUP] = 2
    with pytest.raises(ValueError, match="table row names a missing group"):
        _module(backend).step(B.SGD, table, groups, 0, 0, 0, True, **_backend_kwargs(backend))


@pytest.mark.parametrize("backend", MODULES)
def test_mismatched_lists_are_refused(backend):
    mod = _module(backend)
    a, b = np.zeros(3, np.int64), np.zeros(2, np.int64)
    extra = _backend_kwargs(backend)
    with pytest.raises(ValueError, match="avgs, srcs and numels must be 1-d and of equal length"):
        mod.average(a, a, b, 0, 0.5, **extra)
    with pytest.raises(ValueError, match="ptrs and numels must be 1-d and of equal length"):
        if backend == "cpu":
            mod.sum_squares(a, b, 0, **extra)
        else:
            mod.sum_squares(a, b, 0, 1, 1, **extra)

