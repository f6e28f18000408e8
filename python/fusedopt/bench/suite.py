"""Runs the cases: builds each contender from the same seeded tensors, warms up, times them
interleaved, and collects one JSON-ready document."""
from __future__ import annotations

import datetime as _dt
import gc
import time
from dataclasses import asdict, dataclass, field

import torch

from . import cases as _cases
from . import contenders as _ct
from . import guard as _guard
from . import timing
from .machine import machine_info, versions

SCHEMA = "fusedopt-bench/2"   # 2: guard, failed rows, compile and first-step times, slow


@dataclass
class Settings:
    device: str = "cpu"
    cases: list = field(default_factory=lambda: list(_cases.DEFAULT_CASES))
    scale: float = 1.0
    quick: bool = False
    repeats: int = 20              # timing rounds
    warmup: int = 3                # untimed steps per contender
    min_sample_s: float = 0.02     # a sample runs k steps to last at least this long
    max_inner: int = 100
    bandwidth_mib: float = 256.0
    bandwidth_repeats: int = 20
    peers: bool = True
    seed: int = 0
    time_budget_s: float | None = None   # --quick: stop timing rounds early (>= 3) to fit

    @classmethod
    def make(cls, *, device="cpu", cases=None, scale=1.0, quick=False, repeats=None, warmup=None,
             peers=True, seed=0, bandwidth_mib=None, time_budget_s=None) -> "Settings":
        """Defaults, or the ``--quick`` ones: 5 rounds, 1 warm-up step, >= 5 ms samples,
        5 bandwidth samples and a 120 s time budget (on a loaded machine a case stops after
        3 rounds once its share is spent); tensor sizes unchanged (``--scale`` changes them)."""
        s = cls(device=device, scale=scale, quick=quick, peers=peers, seed=seed)
        if cases is not None:
            s.cases = list(cases)
        if quick:
            s.repeats, s.warmup, s.min_sample_s, s.max_inner, s.bandwidth_repeats = 5, 1, 0.005, 20, 5
            s.time_budget_s = 120.0
        if time_budget_s is not None:
            s.time_budget_s = time_budget_s if time_budget_s > 0 else None
        if repeats is not None:
            s.repeats = max(1, int(repeats))
        if warmup is not None:
            s.warmup = max(1, int(warmup))
        base = 1024.0 if device == "cuda" else 256.0
        # The probe shrinks with --scale < 1 (tiny test runs), but never below 4 MiB.
        s.bandwidth_mib = bandwidth_mib if bandwidth_mib else max(4.0, base * min(1.0, scale))
        return s

    def describe(self) -> str:
        return (f"{self.repeats} interleaved rounds, {self.warmup} warm-up step(s), samples of "
                f">= {self.min_sample_s * 1e3:g} ms (<= {self.max_inner} steps), scale {self.scale:g}, "
                f"bandwidth probe {self.bandwidth_mib:g} MiB x {self.bandwidth_repeats}"
                + (f", time budget {self.time_budget_s:g} s" if self.time_budget_s else ""))


def _source_tensors(shapes, device: str, seed: int):
    """fp32 params ~ N(0, 0.02) and grads ~ N(0, 0.01), seeded; contenders cast copies."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, generator=gen, device=device).mul_(0.02) for s in shapes]
    grads = [torch.randn(s, generator=gen, device=device).mul_(0.01) for s in shapes]
    return params, grads


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _result(r: _ct.Runner, contender: _ct.Contender, bw_gb_s: float, device: str,
            peak_step_bytes) -> dict:
    s = timing.summary(r.samples)
    moved = r.bytes_per_param * r.numel
    gb_s = moved / (s["ms_median"] * 1e-3) / 1e9
    compile_s = None
    if contender.compiles and r.first_step_s is not None:
        compile_s = max(0.0, r.first_step_s - s["ms_median"] * 1e-3)
    return dict(contender=r.name, kind=contender.kind, status="ok", detail=contender.detail,
                param_dtype=_ct.dtype_name(r.param_dtype), bytes_per_param=r.bytes_per_param,
                steps_per_sample=r.inner, **s, gb_s=gb_s,
                pct_bandwidth=100.0 * gb_s / bw_gb_s if bw_gb_s else None,
                vs_torch_fused=None,
                state_bytes_per_param=_ct.state_bytes(r.optimizer) / r.numel if r.numel else None,
                step_peak_bytes_per_param=(peak_step_bytes / r.numel
                                           if peak_step_bytes is not None and r.numel else None),
                first_step_s=r.first_step_s, compiles=contender.compiles, compile_s=compile_s,
                guard=r.guard)


def _skipped(contender: _ct.Contender | str, reason: str, kind: str | None = None,
             status: str = "skipped") -> dict:
    name = contender if isinstance(contender, str) else contender.name
    kind = kind or (None if isinstance(contender, str) else contender.kind)
    return dict(contender=name, kind=kind, status=status, reason=reason)


def _failed(contender: _ct.Contender, reason: str) -> dict:
    """A contender that was built but gave wrong results (the guard) or raised in a step."""
    return _skipped(contender, reason, status="failed")


def _guarded_first_steps(case, runners, by_name, src_p, src_g, device) -> dict:
    """Each runner's first step, timed (compilation included) and checked by the guard;
    ``{name: reason}`` of those that failed (removed from ``runners``)."""
    failed, references = {}, {}
    for r in list(runners):
        c = by_name[r.name]
        try:
            before = None if c.moves else [p.detach().clone() for p in r.params]
            t0 = time.perf_counter()
            r.step()
            timing.synchronize(device)
            r.first_step_s = time.perf_counter() - t0
            reference = None
            if c.moves and c.matches_reference:
                if r.param_dtype not in references:
                    references[r.param_dtype] = _guard.reference_step(case, src_p, src_g, r.param_dtype)
                reference = references[r.param_dtype]
            reason = _guard.check_first_step(case, c, r, src_p, reference, before)
            del before
        except _ct.Skip as e:
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - a peer that cannot step is a row, not a crash
            reason = f"step failed: {_ct.short_error(e)}"
        if reason:
            failed[r.name] = reason
            runners.remove(r)
    return failed


def run_case(case: _cases.Case, st: Settings, fusedopt_mod, fusedopt_reason, peers_available,
             bw_gb_s: float, progress, deadline: float | None = None) -> dict:
    """One case. ``deadline`` (perf_counter time): stop timing rounds there, after >= 3."""
    shapes = case.shapes(st.device, st.scale)
    n = _cases.numel(shapes)
    doc = dict(name=case.name, description=case.description, optimizer=case.optimizer,
               param_dtype=_ct.dtype_name(case.param_dtype), hyper=_jsonable(case.hyper),
               fusedopt_kwargs=_jsonable(case.fusedopt_kwargs), n_params=n, n_tensors=len(shapes),
               largest_tensor=list(max(shapes, key=lambda s: _cases.numel([s]))),
               bytes_per_param=case.bytes_per_param, bytes_model=case.bytes_model,
               baseline=case.baseline, status="ok", reason=None, rounds=0, slow={}, results=[])
    t0 = time.perf_counter()
    # fusedopt that does not import: the precision cases (which exist for its keywords) are
    # skipped, the others run without it. fusedopt that lacks the case's class or keywords:
    # the case is skipped unless it has peers worth running without it.
    if fusedopt_reason:
        unsupported, skip_case = fusedopt_reason, case.precision and not case.run_without_fusedopt
    else:
        unsupported = _ct.fusedopt_support(fusedopt_mod, case, st.device)
        skip_case = bool(unsupported) and not case.run_without_fusedopt
    if skip_case:
        doc.update(status="skipped", reason=unsupported)
        progress.note(f"{case.name}: skipped ({unsupported})")
        progress.update(st.repeats)
        return doc
    line_up = _ct.contenders_for(case, None if unsupported else fusedopt_mod, peers_available)
    results = {}
    if unsupported:
        results["fusedopt"] = _skipped("fusedopt", unsupported, "fusedopt")

    progress.phase(case.name, f"building {len(line_up)} contenders ({n / 1e6:.2f}M params, "
                              f"{len(shapes)} tensors)")
    src_p, src_g = _source_tensors(shapes, st.device, st.seed)
    runners, by_name = [], {}
    for c in line_up:
        try:
            r = c.build(src_p, src_g)
            runners.append(r)
            by_name[c.name] = c
        except _ct.Skip as e:
            results[c.name] = _skipped(c, str(e))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for one contender
            results[c.name] = _skipped(c, f"setup failed: {_ct.short_error(e)}")
        if c.name in results:
            _free(st.device)

    progress.phase(case.name, "first step of each contender (compilation included), checked by the guard")
    for name, reason in _guarded_first_steps(case, runners, by_name, src_p, src_g, st.device).items():
        results[name] = _failed(by_name[name], reason)
        _free(st.device)
    del src_p, src_g

    # The guarded first step counts as the first of the warm-up steps.
    progress.phase(case.name, f"warm-up {st.warmup} step(s)")
    watch = _guard.StillMoving(by_name)
    for name, reason in timing.warm_up(runners, max(1, st.warmup - 1), st.device, watch=watch).items():
        results[name] = _failed(by_name[name], reason)
    timing.calibrate(runners, st.min_sample_s, st.max_inner, st.device)
    slow = timing.limit_slow(runners, case.baseline, st.repeats)
    for name, step_s in slow.items():
        progress.note(f"{case.name}: {name} is slow ({step_s:.2f} s/step): timed in at most "
                      f"{max(2, st.repeats // 4)} of {st.repeats} rounds")

    progress.phase(case.name, f"timing {len(runners)} contenders x {st.repeats} rounds")
    done = [0]

    def on_round(i):
        done[0] = i + 1
        progress.update(1)

    probe = timing.BandwidthProbe(st.device, int(st.bandwidth_mib * 2**20), st.min_sample_s, st.max_inner)
    timed = runners + [probe]
    failed = timing.interleaved(timed, st.repeats, st.device, on_round=on_round, deadline=deadline)
    runners = [r for r in timed if r is not probe]
    case_bw = probe.gb_s() or bw_gb_s
    doc["bandwidth_gb_s"] = case_bw
    del probe
    doc["rounds"] = done[0]
    doc["slow"] = {name: dict(step_s=step_s, rounds=len(next(r for r in runners if r.name == name).samples))
                   for name, step_s in slow.items() if any(r.name == name for r in runners)}
    if done[0] < st.repeats:
        progress.update(st.repeats - done[0])
        progress.note(f"{case.name}: time budget reached after {done[0]} of {st.repeats} rounds")
    for name, reason in failed.items():
        results[name] = _failed(by_name[name], reason)

    for r in runners:
        try:
            peak = timing.step_peak_bytes(r, st.device)
        except Exception:  # noqa: BLE001 - memory figures are secondary
            peak = None
        results[r.name] = _result(r, by_name[r.name], case_bw, st.device, peak)

    # Ratios are to the case's baseline (torch's fused step; EMA: torch's foreach lerp).
    base_name = case.baseline if case.baseline in results else "torch-foreach"
    doc["baseline"] = base_name
    base = results.get(base_name)
    if base and base["status"] == "ok":
        for res in results.values():
            if res["status"] == "ok":
                res["vs_torch_fused"] = base["ms_median"] / res["ms_median"]
    over = results.get(case.overhead_of) if case.overhead_of else None
    mine = results.get("fusedopt")
    if over and mine and over["status"] == "ok" and mine["status"] == "ok":
        extra = mine["ms_median"] - case.overhead_steps * over["ms_median"]
        doc["overhead"] = dict(of=case.overhead_of, steps=case.overhead_steps, ms=extra,
                               ratio=extra / over["ms_median"])
    order = ["fusedopt"] + [c.name for c in line_up]
    doc["results"] = [results[k] for k in dict.fromkeys(order) if k in results]
    doc["elapsed_s"] = time.perf_counter() - t0
    del runners
    _free(st.device)
    return doc


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.dtype):
            v = _ct.dtype_name(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def run_suite(st: Settings, progress) -> dict:
    """Bandwidth probe, then every case; returns the JSON document."""
    t0 = time.perf_counter()
    selected = _cases.select(",".join(st.cases))
    fusedopt_mod, fusedopt_reason = _ct.load_fusedopt()
    if fusedopt_reason:
        progress.note(f"fusedopt contender unavailable: {fusedopt_reason}")
    if st.peers:
        peers_available, peers_missing = _ct.detect_peers()
    else:
        peers_available, peers_missing = [], {m: "disabled (--no-peers)"
                                              for m in dict.fromkeys(v.module for v in _ct.PEERS)}
    progress.phase("bandwidth", f"x.mul_(c) on {st.bandwidth_mib:g} MiB fp32")
    bw = timing.measure_bandwidth(st.device, int(st.bandwidth_mib * 2**20), st.bandwidth_repeats,
                                  st.min_sample_s)
    progress.note(f"streaming bandwidth: {bw['gb_s']:.1f} GB/s (x.mul_(c), {st.bandwidth_mib:g} MiB fp32)")
    case_docs = []
    end = t0 + st.time_budget_s if st.time_budget_s else None
    for i, c in enumerate(selected):
        now = time.perf_counter()
        deadline = None if end is None else now + max(0.0, end - now) / (len(selected) - i)
        case_docs.append(run_case(c, st, fusedopt_mod, fusedopt_reason, peers_available, bw["gb_s"],
                                  progress, deadline))
    return dict(
        schema=SCHEMA,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=None,
        settings=asdict(st),
        machine=machine_info(st.device),
        versions=versions(),
        fusedopt=dict(available=fusedopt_mod is not None, reason=fusedopt_reason),
        peers=dict(available=sorted({v.module for v, _ in peers_available}),
                   variants=[v.label for v, _ in peers_available], missing=peers_missing),
        bandwidth=bw,
        baseline=_ct.BASELINE,
        cases=case_docs,
        elapsed_s=time.perf_counter() - t0,
    )
