"""The pointer tables of a step: params bucketed by (device, dtype, kernel variant), one row
per tensor, one kernel call per bucket.

A plan is built (with full validation and lazy state creation) when anything it depends on
changed, and reused otherwise. Reuse is safe because the plan holds a reference to every
tensor whose address it stores (so no address can be recycled while the plan lives), and
each step re-checks in C that every group still holds the same params (`_C.same_items`, by
identity: an item replaced in a list is caught), that every param still has the address the
plan recorded, and reads the fresh grad addresses, dtypes, sizes and contiguity
(`_C.refresh_grads`). tests/test_plan_reuse.py makes each change this proof must catch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import _backend as B
from . import _distributed as D


@dataclass
class Bucket:
    device: torch.device
    param_dtype: torch.dtype
    state_dtype: torch.dtype
    precision: int
    variant: bool
    params: list = field(default_factory=list)
    rows: list = field(default_factory=list)      # table rows while building
    keepalive: list = field(default_factory=list)  # every tensor whose address is in the table
    table: np.ndarray | None = None
    lr_rows: list = field(default_factory=list)   # (row, group index) of rows with a device lr
    beta_rows: list = field(default_factory=list)  # (row, group index) of rows with device tensor betas
    writebacks: list = field(default_factory=list)  # (param, contiguous stand-in) to copy back
    first_step_rows: bool = False
    # Rows whose param (and grad) is dense but not contiguous (channels_last, a transposed
    # view): moved to the end of the table by freeze(); refreshed in Python, the rest in C.
    strided: list = field(default_factory=list)  # while building: one bool per row
    n_contiguous: int = 0
    # DTensor support (_distributed.py): False for rows whose elements another rank counts in
    # the global norms (replicated shards); True for everything else, plain tensors included.
    counted: bool = True
    dtensor: bool = False  # has DTensor rows: refreshed by D.refresh_grads, never the C loop

    def freeze(self):
        order = sorted(range(len(self.rows)), key=lambda i: bool(self.strided[i]))  # stable: contiguous first
        where = {old: new for new, old in enumerate(order)}
        self.table = np.array([self.rows[i] for i in order], dtype=np.int64).reshape(-1, B.TABLE_COLUMNS)
        self.params = [self.params[i] for i in order]
        self.lr_rows = [(where[row], gi) for row, gi in self.lr_rows]
        self.beta_rows = [(where[row], gi) for row, gi in self.beta_rows]
        self.n_contiguous = len(self.rows) - sum(bool(x) for x in self.strided)
        self.rows = []
        self.first_step_rows = bool((self.table[:, B.COL_FLAGS] & B.FLAG_FIRST_STEP).any())

    def refresh(self) -> bool:
        """Fills the grad column for this step; False when the fast path does not apply."""
        if self.dtensor:
            return D.refresh_grads(self)
        n = self.n_contiguous
        if n == len(self.params):
            return B._C.refresh_grads(self.params, self.param_dtype, self.table) < 0
        if n and B._C.refresh_grads(self.params[:n], self.param_dtype, self.table[:n]) >= 0:
            return False
        for row, p in enumerate(self.params[n:], start=n):
            # The C refresh's checks, with "grad has the param's strides" for "contiguous".
            g = p.grad
            if (g is None or p.data_ptr() != self.table[row, B.COL_PARAM] or g.dtype != self.param_dtype
                    or g.shape != p.shape or g.stride() != p.stride()):
                return False
            self.table[row, B.COL_GRAD] = g.data_ptr()
        return True

    def clear_first_step(self):
        if self.first_step_rows:
            self.table[:, B.COL_FLAGS] &= ~B.FLAG_FIRST_STEP
            self.first_step_rows = False


@dataclass
class Plan:
    generation: int             # the optimizer's state/group mutation count when built
    state: object               # the optimizer.state object it was built from
    structures: list            # per group, what shapes the plan (FusedOptimizer._structure)
    group_lists: list           # the groups' `params` lists, by identity
    group_items: list           # per group, a tuple of its params when built (checked by identity)
    buckets: list
    without_grad: list          # params that had no grad when the plan was built
    reusable: bool              # False: rebuild next step (staged or non-contiguous params)
    mesh: object = None         # D.MeshInfo when params are DTensors: norms are all-reduced over it

    def still_valid(self, optimizer) -> bool:
        if not self.reusable or self.generation != optimizer._gen.value or self.state is not optimizer.state:
            return False
        groups = optimizer.param_groups
        if len(groups) != len(self.group_lists):
            return False
        for g, lst, items, structure in zip(groups, self.group_lists, self.group_items, self.structures):
            # (an item replaced in place keeps the list and its length: compare every item, in C)
            if g["params"] is not lst or not B._C.same_items(lst, items) or optimizer._structure(g) != structure:
                return False
        # A param that gained a grad must join a bucket.
        for p in self.without_grad:
            if p.grad is not None:
                return False
        return True
