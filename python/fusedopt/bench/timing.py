"""Timing: the streaming-bandwidth probe and interleaved (round-robin) timing of contenders.

Every timed sample is ``synchronize; t0; k steps; synchronize; t1`` with ``k`` chosen once per
contender so that a sample lasts at least ``min_sample_s`` (tiny cases would otherwise measure
the timer). Contenders take turns, one sample each per round, and the starting contender
rotates every round, so drift and noise of a shared machine hit all of them alike.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from .contenders import Skip, short_error


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, k: int, device: str) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / k


def inner_steps(one_step_s: float, min_sample_s: float, max_inner: int) -> int:
    if one_step_s <= 0:
        return max_inner
    return max(1, min(max_inner, math.ceil(min_sample_s / one_step_s)))


def summary(samples: list[float]) -> dict:
    """Median/min/max in ms of per-step seconds."""
    return dict(ms_median=statistics.median(samples) * 1e3, ms_min=min(samples) * 1e3,
                ms_max=max(samples) * 1e3, samples=len(samples))


def measure_bandwidth(device: str, nbytes: int, repeats: int, min_sample_s: float,
                      max_inner: int = 50) -> dict:
    """In-place streaming bandwidth: ``x.mul_(c)`` on an fp32 tensor of ``nbytes``, counted
    as 8 bytes per element (one read, one write); median over ``repeats`` samples."""
    n = max(1024, nbytes // 4)
    x = torch.ones(n, dtype=torch.float32, device=device)
    factors = [1.25, 0.8]   # alternate so the values stay near 1
    i = [0]

    def op():
        x.mul_(factors[i[0] & 1])
        i[0] += 1

    for _ in range(3):
        op()
    k = inner_steps(_timed(op, 1, device), min_sample_s, max_inner)
    samples = [_timed(op, k, device) for _ in range(max(1, repeats))]
    del x
    s = summary(samples)
    moved = 8 * n
    return dict(method="x.mul_(c), fp32, in place, 8 bytes/element (read + write)",
                tensor_bytes=4 * n, numel=n, repeats=len(samples), inner=k,
                gb_s=moved / (s["ms_median"] * 1e-3) / 1e9,
                gb_s_best=moved / (s["ms_min"] * 1e-3) / 1e9, **s)


class BandwidthProbe:
    """The streaming-bandwidth probe as one more contender of a case's interleaved rounds, so
    each case's % of bandwidth is relative to the bandwidth measured while it ran (this
    machine's memory bandwidth drifts by tens of percent over a run)."""

    name = "_bandwidth"

    def __init__(self, device: str, nbytes: int, min_sample_s: float, max_inner: int = 50):
        self.numel = max(1024, nbytes // 4)
        self.x = torch.ones(self.numel, dtype=torch.float32, device=device)
        self._i = 0
        for _ in range(3):
            self.step()
        self.inner = inner_steps(_timed(self.step, 1, device), min_sample_s, max_inner)
        self.samples: list[float] = []

    def step(self):
        self.x.mul_(1.25 if self._i & 1 else 0.8)
        self._i += 1

    def gb_s(self) -> float | None:
        if not self.samples:
            return None
        return 8 * self.numel / statistics.median(self.samples) / 1e9


def warm_up(runners, steps: int, device: str, watch=None) -> dict:
    """Run ``steps`` steps of each runner (creating state), timing the last one into
    ``runner.warm_s``; ``{name: reason}`` of those that failed, which are removed from
    ``runners``. ``watch`` (``before(r) -> token``, ``after(r, token) -> reason or None``)
    surrounds the last step, e.g. to check that it still moves the params."""
    failed = {}
    for r in list(runners):
        try:
            for _ in range(max(1, steps) - 1):
                r.step()
            token = watch.before(r) if watch is not None else None
            r.warm_s = _timed(r.step, 1, device)
            reason = watch.after(r, token) if watch is not None else None
            if reason:
                failed[r.name] = reason
        except Skip as e:
            failed[r.name] = str(e)
        except Exception as e:  # noqa: BLE001
            failed[r.name] = f"step failed: {short_error(e)}"
        if r.name in failed:
            runners.remove(r)
    return failed


def calibrate(runners, min_sample_s: float, max_inner: int, device: str) -> None:
    """Steps per sample; a step that alone lasts ``min_sample_s`` (seen in warm-up) needs no
    extra calibration step."""
    for r in runners:
        one = getattr(r, "warm_s", None)
        if one is None or one < min_sample_s:
            one = _timed(r.step, 1, device)
        r.inner = inner_steps(one, min_sample_s, max_inner)


# A contender whose step takes more than SLOW_FACTOR times the case's baseline step and more
# than SLOW_MIN_S (e.g. bitsandbytes' 8-bit AdamW on the CPU) is timed in fewer rounds, so
# that it does not set the length of the run.
SLOW_FACTOR, SLOW_MIN_S = 5.0, 0.5


def limit_slow(runners, baseline: str, rounds: int) -> dict:
    """Sets ``max_samples`` (``max(2, rounds // 4)``) on slow runners, judged by their warm-up
    step; returns ``{name: seconds per step}`` of those."""
    base = next((r.warm_s for r in runners if r.name == baseline and r.warm_s), None)
    floor = SLOW_MIN_S if base is None else max(SLOW_MIN_S, SLOW_FACTOR * base)
    slow = {}
    for r in runners:
        if r.name != baseline and r.warm_s is not None and r.warm_s > floor:
            r.max_samples = max(2, rounds // 4)
            slow[r.name] = r.warm_s
    return slow


def interleaved(runners, rounds: int, device: str, on_round=None, deadline: float | None = None,
                min_rounds: int = 3) -> dict:
    """Round-robin timing: each round takes one sample of every runner, starting one further
    along each round. Stops after ``rounds``, or once ``time.perf_counter()`` passes
    ``deadline`` with at least ``min_rounds`` done; a runner with ``max_samples`` set (a slow
    one) sits out the rounds after it has that many. Appends seconds/step to
    ``runner.samples``; returns ``{name: reason}`` of runners that raised (removed from
    ``runners``)."""
    failed = {}
    for i in range(rounds):
        n = len(runners)
        order = runners[i % n:] + runners[: i % n] if n else []
        for r in order:
            limit = getattr(r, "max_samples", None)
            if limit is not None and len(r.samples) >= limit:
                continue
            try:
                r.samples.append(_timed(r.step, r.inner, device))
            except Exception as e:  # noqa: BLE001
                failed[r.name] = f"step failed while timing: {short_error(e)}"
                runners.remove(r)
        if on_round is not None:
            on_round(i)
        if deadline is not None and i + 1 >= min_rounds and time.perf_counter() > deadline:
            break
    return failed


def step_peak_bytes(runner, device: str) -> int | None:
    """CUDA only: memory allocated at the peak of one step beyond what was allocated before."""
    if device != "cuda":
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    runner.step()
    synchronize(device)
    return max(0, torch.cuda.max_memory_allocated() - base)
