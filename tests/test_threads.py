"""The CPU kernels' worker pool (csrc/cpu/worker_pool.h): every kernel that runs on it (step,
sum of squares, telemetry, average, copy) gives the same bits for any thread count, call after
call; a forked child gets a working pool of its own; two threads stepping at once get the
bits of stepping one after the other.

References: the same kernels on one thread, which never touch the pool (run_chunks runs a
one-thread job on the caller), and, for the step itself, torch.optim.AdamW(foreach=False)."""
from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time

import pytest
import torch

import fusedopt
from fusedopt import _backend as B
from fusedopt import _multi_tensor as M

from conftest import assert_close

# Sizes around the kernels' chunk of 2**15 elements: many chunks, a partial last chunk, tensors
# that share a chunk, and one tensor alone below the parallel threshold would not start the pool.
SHAPES = [(3, 2**15 + 7), (2**15,), (1000, 33), (17,), (5, 4096), (1,)]
THREADS = (1, 2, 3)


@pytest.fixture
def restore_threads():
    """The thread count as it was, and the pool switched on for the test (the kernels' default
    is torch's OpenMP team: worker_pool.h, use_pool)."""
    old, old_pool = torch.get_num_threads(), B._C.use_pool()
    B._C.set_use_pool(True)
    yield
    B._C.set_use_pool(old_pool)
    torch.set_num_threads(old)


def test_openmp_team_is_the_default_and_gives_the_pool_bits(restore_threads):
    """Without FUSEDOPT_CPU_POOL=1 the kernels run on torch's OpenMP team; both give the bits
    of one thread."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "FUSEDOPT_CPU_POOL"}
    probe = "from fusedopt import _backend as B; print(B._C.use_pool())"
    for value, expected in ((None, "False"), ("1", "True")):
        if value is not None:
            env["FUSEDOPT_CPU_POOL"] = value
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == expected, out.stderr[-2000:]
    one, _ = _adamw_run(1, 3, max_grad_norm=1.0, track_stats=True)
    for pool in (False, True):
        B._C.set_use_pool(pool)
        two, _ = _adamw_run(2, 3, max_grad_norm=1.0, track_stats=True)
        _assert_bits_equal(one, two, f"2 threads, pool={pool}")


def _tensors(seed: int, shapes=SHAPES, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) * scale for s in shapes]


def _adamw_run(threads: int | None, steps: int, **kw) -> tuple[list[torch.Tensor], fusedopt.AdamW]:
    if threads is not None:
        torch.set_num_threads(threads)
    params = [torch.nn.Parameter(t) for t in _tensors(0)]
    opt = fusedopt.AdamW(params, lr=0.01, weight_decay=0.1, **kw)
    for step in range(steps):
        for p, g in zip(params, _tensors(100 + step, scale=0.1)):
            p.grad = g
        opt.step()
    return params, opt


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.int32 if t.element_size() == 4 else torch.int64)


def _assert_bits_equal(a: list[torch.Tensor], b: list[torch.Tensor], what: str):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(_bits(x), _bits(y)), f"{what}: tensor {i} {tuple(x.shape)} differs"


def test_step_clip_and_stats_bits_do_not_depend_on_thread_count(restore_threads):
    runs = {n: _adamw_run(n, steps=3, max_grad_norm=0.5, track_stats=True) for n in THREADS}
    params1, opt1 = runs[1]
    for n in THREADS[1:]:
        params, opt = runs[n]
        _assert_bits_equal(params1, params, f"params, 1 vs {n} threads")
        for key in ("exp_avg", "exp_avg_sq"):
            _assert_bits_equal([opt1.state[p][key] for p in params1], [opt.state[p][key] for p in params],
                               f"{key}, 1 vs {n} threads")
        assert opt.last_grad_norm.item() == opt1.last_grad_norm.item(), f"grad norm, 1 vs {n} threads"
        for s1, s in zip(opt1.stats(), opt.stats()):
            assert {k: v.item() for k, v in s.items()} == {k: v.item() for k, v in s1.items()}
    # (and the 1-thread run is the step: torch's for-loop AdamW with the same clipping)
    ref = [torch.nn.Parameter(t) for t in _tensors(0)]
    ref_opt = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1, foreach=False)
    for step in range(3):
        for p, g in zip(ref, _tensors(100 + step, scale=0.1)):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(ref, 0.5, foreach=False)
        ref_opt.step()
    for a, b in zip(params1, ref):
        assert_close(a.detach(), b.detach())


def test_average_and_copy_bits_do_not_depend_on_thread_count(restore_threads):
    results = {}
    for n in THREADS:
        torch.set_num_threads(n)
        avgs, srcs = _tensors(1), _tensors(2)
        M.average_(avgs, srcs, 0.3)
        dsts = [torch.empty_like(s) for s in srcs]
        M.copy_(dsts, srcs)
        assert all(torch.equal(d, s) for d, s in zip(dsts, srcs)), f"copy with {n} threads"
        results[n] = avgs
    expected = [a + 0.3 * (s - a) for a, s in zip(_tensors(1), _tensors(2))]  # fp32, one rounding each
    for a, e in zip(results[1], expected):
        assert_close(a, e)
    for n in THREADS[1:]:
        _assert_bits_equal(results[1], results[n], f"average, 1 vs {n} threads")


def test_many_calls_in_a_row_lose_no_chunk(restore_threads):
    # Back-to-back jobs are where a late worker could take a chunk of the next job or a chunk
    # could be lost: every step must update every element exactly once. SGD with lr 1 and
    # grads of 1 counts the steps in each element (exactly, in fp32).
    torch.set_num_threads(2)
    n_steps = 400
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = fusedopt.SGD(params, lr=1.0)
    for _ in range(n_steps):
        opt.step()
    for p in params:
        assert torch.equal(p.detach(), torch.full_like(p, -float(n_steps))), tuple(p.shape)
    assert B._C.pool_workers() >= 1  # the pool did run (a 2-thread job of many chunks)


def test_thread_count_sets_the_workers(restore_threads):
    torch.set_num_threads(3)
    _adamw_run(3, steps=1)
    assert B._C.pool_workers() >= 2


def _child_step(out_path: str) -> None:
    # In the forked child: the parent's workers do not exist here; a 2-thread step must start
    # new ones and give the 1-thread bits. torch itself runs on one thread here, as in a
    # DataLoader worker: its OpenMP pool is not fork-safe (a parallel torch op hangs in the
    # child of a parent that ran one), so fusedopt is asked for 2 threads directly.
    code = 1
    try:
        torch.set_num_threads(1)
        B.num_threads = lambda: 2
        workers_at_fork = B._C.pool_workers()
        params, _ = _adamw_run(None, steps=2)
        with open(out_path, "wb") as f:
            pickle.dump((workers_at_fork, B._C.pool_workers(), [p.detach() for p in params]), f)
        code = 0
    finally:
        os._exit(code)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_step_in_a_forked_child(restore_threads, tmp_path):
    expected, _ = _adamw_run(1, steps=2)
    _adamw_run(2, steps=1)  # the parent's pool is running when it forks
    assert B._C.pool_workers() >= 1
    out_path = str(tmp_path / "child.pkl")
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        _child_step(out_path)
    deadline = time.monotonic() + 120  # a child stuck on the parent's threads fails, not hangs
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the step in the forked child did not finish")
    assert os.waitstatus_to_exitcode(done[1]) == 0, "the child's step failed"
    with open(out_path, "rb") as f:
        workers_at_fork, workers_after, params = pickle.load(f)
    assert workers_at_fork == 0 and workers_after >= 1
    _assert_bits_equal(expected, params, "child with 2 threads vs parent with 1")
    # ... and the parent's pool still works after the fork
    again, _ = _adamw_run(2, steps=2)
    _assert_bits_equal(expected, again, "parent after the fork")


def test_two_threads_stepping_at_once(restore_threads):
    # Two optimizers stepped from two Python threads (the GIL is released in the kernels): one
    # job has the pool, the other runs on its own thread; both give the sequential bits.
    expected, _ = _adamw_run(1, steps=5)
    torch.set_num_threads(2)
    results, errors = [None, None], []

    def train(i):
        try:
            results[i] = _adamw_run(2, steps=5)[0]
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in results:
        _assert_bits_equal(expected, r, "concurrent vs sequential")
