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
    return {"num_threads": 1} if name == "cpu" else {"stream": 0}


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


def _keywords(fn):
    """Parameter names from pybind11's signature line."""
    first = fn.__doc__.splitlines()[0]
    return re.findall(r"(\w+):", first[first.index("(") + 1:])


@pytest.mark.parametrize("kernel", ["adam_step", "sgd_step"])
def test_step_keywords_match_the_cpu_module(kernel):
    cpu, cuda = _keywords(getattr(B._C, kernel)), _keywords(getattr(B.cuda_module(), kernel))
    assert cpu[:-1] == cuda[:-1], (cpu, cuda)
    assert (cpu[-1], cuda[-1]) == ("num_threads", "stream")


BAD_CALLS = [
    pytest.param(lambda t, g: (t[:, :-1], g, 0, 0, 0), r"table must be \(n_tensors, \d+\)", id="table-columns"),
    pytest.param(lambda t, g: (t, g[:, :-1], 0, 0, 0), r"groups must be \(n_groups, \d+\)", id="group-fields"),
    pytest.param(lambda t, g: (t, g, 7, 0, 0), "bad dtype code for params", id="param-dtype"),
    pytest.param(lambda t, g: (t, g, 0, -1, 0), "bad dtype code for state", id="state-dtype"),
    pytest.param(lambda t, g: (t, g, 0, 0, 4), "bad precision code", id="precision"),
]


@pytest.mark.parametrize("backend", MODULES)
@pytest.mark.parametrize("make_args,match", BAD_CALLS)
def test_malformed_step_calls_are_refused(backend, make_args, match):
    table, groups = _valid_tables()
    args = make_args(table, groups)
    with pytest.raises(ValueError, match=match):
        _module(backend).adam_step(*args, False, **_backend_kwargs(backend))


@pytest.mark.parametrize("backend", MODULES)
def test_a_row_naming_a_missing_group_is_refused(backend):
    table, groups = _valid_tables(n_rows=3, n_groups=2)
    table[1, B.COL_GROUP] = 2
    with pytest.raises(ValueError, match="table row names a missing group"):
        _module(backend).sgd_step(table, groups, 0, 0, 0, True, **_backend_kwargs(backend))


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

