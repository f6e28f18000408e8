"""The CUDA backend: parity with torch.optim on CUDA, bit-equality with fusedopt's CPU path,
mixed CPU/CUDA optimizers, tensor lr on the device, no host synchronisation in ``step()``,
CUDA-graph capture and replay, ``torch.amp.GradScaler``, global-norm clipping, track_stats,
EMA, state-dict exchange with torch's fused AdamW, ``torch.compile`` on CUDA, and (opt-in) a
tensor of more than 2**31 elements.

Every test here needs a CUDA device and fusedopt's CUDA module (``fusedopt._C_cuda``); without
either the whole module is skipped with the reason. ``scripts/gpu_test.sh`` builds the module
and runs this file with the rest of the suite.

Tolerances (see conftest.TOLERANCES for the reasons of the per-dtype table):
* fusedopt CUDA vs torch.optim CUDA: the conftest table (fp32: torch.testing defaults; bf16 /
  fp16: 2 ulps against the fp32 for-loop rounded to the dtype after every step).
* fusedopt CPU vs fusedopt CUDA: exact. Both backends run the same element functions from
  csrc/fusedopt/*.h, compiled without FMA contraction (-ffp-contract=off, --fmad=false), with
  IEEE division and square root, no flush-to-zero, and the same per-tensor scalars computed in
  double. The only non-IEEE operation is ``pow`` (double) in the bias corrections (CUDA's is
  within 2 ulps, glibc's correctly rounded); a double ulp changes the float32 scalar only if
  the value lies within ~2**-29 relative of a float rounding boundary, which the fixed
  hyper-parameters here do not hit. Stochastic rounding is keyed by (seed, param index, step,
  element index) on both, so it is exact too.
* CUDA graph replay vs eager: exact (the same kernels with the same arguments).
* Norms (clip, track_stats): rtol 2e-5. The kernels sum squares in float64 over fp32 per-thread
  partials of at most 128 elements (2**-24 * 128 ~ 8e-6 relative), torch's norms in fp32.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import fusedopt
from fusedopt import _backend as B
from conftest import (
    assert_bits_equal,
    assert_close,
    assert_moved,
    assert_optimizers_match,
    assert_state_matches,
    assert_unchanged,
    make_grads,
    make_params,
    rounded_reference,
    run_steps,
    set_grads,
    snapshot,
)


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not B.cuda_built():
        return "fusedopt was built without its CUDA module fusedopt._C_cuda (build with nvcc on PATH)"
    return None


# Inductor warns once per process, at the first CUDA compile on sm_80+, that TF32 is off for
# fp32 matmuls; pyproject turns warnings into errors. The warning is filtered rather than
# TF32 turned on: the compiled tests compare with eager fp32 within fp32 tolerances, which
# TF32 matmuls (10-bit mantissa) would not meet.
TF32_WARNING = "ignore:TensorFloat32 tensor cores for float32 matrix multiplication available but not enabled"

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
              pytest.mark.filterwarnings(TF32_WARNING)]

DEV = torch.device("cuda")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
STEPS = 5
T = torch.tensor

# Odd sizes around the 65536-element chunk of the CUDA step kernels and the 512 x 4 elements
# a block handles per iteration, plus enough further tensors (> 21 per launch) that a step
# takes several launches.
ODD_SHAPES = [(1,), (7,), (4095,), (65537,), (300000,)]
_gen = torch.Generator().manual_seed(7)
MANY_SHAPES = ODD_SHAPES + [(int(n),) for n in torch.randint(1, 5000, (24,), generator=_gen)] + [(37, 29), (3, 5, 7)]
SMALL_SHAPES = [(1,), (7,), (1023,), (4097,), (33, 17)]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def to_dev(params, device=None):
    """Independent copies (never aliases, also when already on ``device``) as Parameters."""
    device = DEV if device is None else device
    return [nn.Parameter(p.detach().to(device, copy=True), requires_grad=p.requires_grad) for p in params]


def grads_to(grads, device=None):
    device = DEV if device is None else device
    return [[None if g is None else g.to(device) for g in row] for row in grads]


def on_device(kwargs, device):
    """kwargs with a tensor lr (and tensor betas) moved to ``device`` (fresh tensors per optimizer)."""
    kw = copy.deepcopy(kwargs)
    if isinstance(kw.get("lr"), torch.Tensor):
        kw["lr"] = kw["lr"].to(device)
    if isinstance(kw.get("betas"), tuple) and isinstance(kw["betas"][0], torch.Tensor):
        kw["betas"] = tuple(b.to(device) for b in kw["betas"])
    return kw


def factory(name, kwargs, device=None):
    cls = getattr(fusedopt, name)
    return lambda ps: cls(ps, **(on_device(kwargs, device) if device is not None else copy.deepcopy(kwargs)))


def with_lr(kwargs, lr):
    kw = copy.deepcopy(kwargs)
    kw["lr"] = torch.tensor(lr) if isinstance(kw.get("lr"), torch.Tensor) else lr
    return kw


def assert_all_bits_equal(got_p, got_opt, ref_p, ref_opt, msg=""):
    """Params and every state tensor bit-identical (compared on the CPU)."""
    for i, (a, b) in enumerate(zip(got_p, ref_p, strict=True)):
        assert_bits_equal(a.detach().cpu(), b.detach().cpu(), msg=f"{msg} param {i}")
        sa, sb = got_opt.state.get(a, {}), ref_opt.state.get(b, {})
        assert set(sa) == set(sb), f"{msg} param {i}: state keys {set(sa)} != {set(sb)}"
        for key, v in sb.items():
            assert_bits_equal(sa[key].cpu(), v.cpu(), msg=f"{msg} param {i} state[{key!r}]")


def assert_graph_equal(got_p, got_opt, ref_p, ref_opt):
    for i, (a, b) in enumerate(zip(got_p, ref_p, strict=True)):
        assert torch.equal(a.detach(), b.detach()), f"param {i} differs"
        for key, v in ref_opt.state[b].items():
            assert torch.equal(got_opt.state[a][key], v), f"param {i} state[{key!r}] differs"


# --------------------------------------------------------------------------------------------
# Parity with torch.optim on CUDA (single-tensor for-loop), fp32 / bf16 / fp16.
# Each row: id, fusedopt class, torch class, kwargs.
# --------------------------------------------------------------------------------------------
PARITY_CASES = [
    ("adamw", "AdamW", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    ("adamw-amsgrad-maximize", "AdamW", torch.optim.AdamW, dict(lr=0.01, amsgrad=True, maximize=True)),
    ("adam-coupled-wd-amsgrad", "Adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.05, amsgrad=True)),
    ("adam-betas-eps", "Adam", torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.95), eps=1e-5)),
    ("sgd", "SGD", torch.optim.SGD, dict(lr=0.1, weight_decay=0.05, maximize=True)),
    ("sgd-momentum-dampening", "SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3)),
    ("sgd-nesterov-wd", "SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_parity_with_torch_on_cuda(case, dtype):
    _, name, ref_cls, kwargs = case
    params = to_dev(make_params(MANY_SHAPES, dtype=dtype))
    grads = grads_to(make_grads(MANY_SHAPES, steps=STEPS, dtype=dtype))
    if dtype == F32:
        got_p, got_opt = run_steps(factory(name, kwargs), params, grads)
        ref_p, ref_opt = run_steps(lambda ps: ref_cls(ps, foreach=False, **copy.deepcopy(kwargs)), params, grads)
        assert_moved(params[3], ref_p[3], dtype)
        assert_optimizers_match(got_p, got_opt, ref_p, ref_opt)
        return
    # lr 0.05: one update is several ulps of a unit-sized bf16/fp16 value (conftest.TOLERANCES).
    kwargs = with_lr(kwargs, 0.05)
    got_p, got_opt = run_steps(factory(name, kwargs), params, grads)
    ref_p, ref_states = rounded_reference(ref_cls, kwargs, params, grads)
    assert_moved(params[3], ref_p[3], dtype)
    for i, (gp, rp, rs) in enumerate(zip(got_p, ref_p, ref_states, strict=True)):
        assert gp.dtype == dtype and gp.device.type == DEV.type
        assert_close(gp, rp, dtype, msg=f"param {i}")
        assert_state_matches(got_opt.state.get(gp, {}), rs, dtype, msg=f"param {i}")


@pytest.mark.parametrize("name,ref_cls,kwargs", [
    ("AdamW", torch.optim.AdamW, dict(lr=0.01)),
    ("SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
], ids=["adamw", "sgd-momentum"])
def test_many_small_tensors_on_cuda(name, ref_cls, kwargs):
    """600 tensors: many launches, and more step counters than one counter launch holds (480)."""
    shapes = [(1 + i % 13,) for i in range(600)]
    params = to_dev(make_params(shapes))
    grads = grads_to(make_grads(shapes, steps=3))
    got_p, got_opt = run_steps(factory(name, kwargs), params, grads)
    ref_p, ref_opt = run_steps(lambda ps: ref_cls(ps, foreach=False, **kwargs), params, grads)
    assert_optimizers_match(got_p, got_opt, ref_p, ref_opt)


@pytest.mark.parametrize("name,ref_cls,kwargs", [
    ("AdamW", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    ("SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
], ids=["adamw", "sgd-momentum"])
def test_non_contiguous_and_strided_view_params_on_cuda(name, ref_cls, kwargs):
    """A transposed param with a contiguous grad, and a strided view (gaps) into a bigger tensor."""
    def build():
        torch.manual_seed(0)
        base = torch.randn(50, 64, device=DEV)
        return [nn.Parameter(torch.randn(30, 40, device=DEV).t()), nn.Parameter(base[:, 3:40:2])], base

    got_p, got_base = build()
    ref_p, ref_base = build()
    got_opt = getattr(fusedopt, name)(got_p, **kwargs)
    ref_opt = ref_cls(ref_p, foreach=False, **kwargs)
    for k in range(STEPS):
        gen = torch.Generator().manual_seed(300 + k)
        grads = [torch.randn(40, 30, generator=gen).to(DEV), torch.randn(50, 19, generator=gen).to(DEV)]
        for ps, opt in ((got_p, got_opt), (ref_p, ref_opt)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    assert_optimizers_match(got_p, got_opt, ref_p, ref_opt)
    assert_close(got_base, ref_base, msg="base of the strided view")


# --------------------------------------------------------------------------------------------
# fusedopt CPU vs fusedopt CUDA: bit for bit. Each row: id, class, kwargs, param dtype.
# --------------------------------------------------------------------------------------------
BIT_CASES = [
    ("adamw-fp32", "AdamW", dict(lr=0.01, weight_decay=0.1), F32),
    ("adamw-fp32-tensor-lr", "AdamW", dict(lr=T(0.01), betas=(0.85, 0.99)), F32),
    ("adam-fp32-amsgrad-maximize-wd", "Adam", dict(lr=0.01, amsgrad=True, maximize=True, weight_decay=0.05), F32),
    ("sgd-fp32", "SGD", dict(lr=0.1, weight_decay=0.01), F32),
    ("sgd-fp32-nesterov", "SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), F32),
    ("sgd-fp32-dampening", "SGD", dict(lr=0.1, momentum=0.9, dampening=0.3), F32),
    ("adamw-bf16", "AdamW", dict(lr=0.05), BF16),
    ("adamw-bf16-sr", "AdamW", dict(lr=0.05, weight_decay=0.1, stochastic_rounding=True, seed=1234), BF16),
    ("adamw-bf16-sr-bf16-moments", "AdamW",
     dict(lr=0.05, stochastic_rounding=True, seed=1234, state_dtype=BF16), BF16),
    ("adam-bf16-sr-amsgrad", "Adam", dict(lr=0.05, amsgrad=True, stochastic_rounding=True, seed=5), BF16),
    ("sgd-bf16-sr-momentum", "SGD", dict(lr=0.05, momentum=0.9, stochastic_rounding=True, seed=99), BF16),
    ("sgd-bf16-sr", "SGD", dict(lr=0.05, stochastic_rounding=True, seed=99), BF16),
    ("adamw-bf16-master", "AdamW", dict(lr=0.05, master_weights=True), BF16),
    ("adamw-bf16-kahan", "AdamW", dict(lr=0.05, kahan_summation=True), BF16),
    ("adam-fp16", "Adam", dict(lr=0.05), F16),
    ("adamw-fp16-master", "AdamW", dict(lr=0.05, master_weights=True), F16),
    # The algorithms, dtypes and 8-bit states added with the generic step machinery.
    ("lion-fp32", "Lion", dict(lr=1e-3, weight_decay=0.1), F32),
    ("lion-bf16-sr", "Lion", dict(lr=1e-3, stochastic_rounding=True, seed=3), BF16),
    ("adamw-fp64", "AdamW", dict(lr=0.01, weight_decay=0.1), torch.float64),
    ("sgd-fp64-nesterov", "SGD", dict(lr=0.1, momentum=0.9, nesterov=True), torch.float64),
    ("adamw-fp32-8bit", "AdamW", dict(lr=0.01, weight_decay=0.1, state_dtype=torch.uint8), F32),
    ("adamw-bf16-sr-8bit", "AdamW", dict(lr=0.05, state_dtype=torch.uint8, stochastic_rounding=True, seed=7), BF16),
    ("sgd-fp32-8bit-momentum", "SGD", dict(lr=0.1, momentum=0.9, state_dtype=torch.uint8), F32),
    ("lion-fp32-8bit", "Lion", dict(lr=1e-3, state_dtype=torch.uint8), F32),
]


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_schedule_free_cpu_and_cuda_give_the_same_bits(name):
    """Schedule-Free steps and its train/eval swap, CPU vs CUDA."""
    params = make_params(MANY_SHAPES)
    grads = make_grads(MANY_SHAPES, steps=STEPS)
    runs = []
    for device in ("cpu", DEV):
        ps = [nn.Parameter(p.detach().clone().to(device)) for p in params]
        opt = getattr(fusedopt, name)(ps, lr=0.01, weight_decay=0.01, warmup_steps=2)
        opt.train()
        for row in grads:
            for p, g in zip(ps, row):
                p.grad = g.to(device)
            opt.step()
        opt.eval()
        runs.append((ps, opt))
    assert_all_bits_equal(runs[1][0], runs[1][1], runs[0][0], runs[0][1], msg=name)


@pytest.mark.parametrize("case", BIT_CASES, ids=[c[0] for c in BIT_CASES])
def test_cpu_and_cuda_give_the_same_bits(case):
    _, name, kwargs, dtype = case
    params = make_params(MANY_SHAPES, dtype=dtype)
    grads = make_grads(MANY_SHAPES, steps=STEPS, dtype=dtype)
    cpu_p, cpu_opt = run_steps(factory(name, kwargs, "cpu"), params, grads)
    dev_p, dev_opt = run_steps(factory(name, kwargs, DEV), to_dev(params), grads_to(grads))
    assert_moved(params[3], cpu_p[3], dtype)
    assert_all_bits_equal(dev_p, dev_opt, cpu_p, cpu_opt, msg="CUDA vs CPU")


def to_dev_misaligned(params):
    """GPU copies that are views one element into a larger storage: no param buffer is 16-byte
    aligned, so the kernels take their one-element path instead of 16-byte tiles."""
    out = []
    for p in params:
        view = torch.empty(p.numel() + 1, dtype=p.dtype, device=DEV)[1:].view(p.shape)
        out.append(nn.Parameter(view.copy_(p.detach()), requires_grad=p.requires_grad))
    return out


@pytest.mark.parametrize("case", BIT_CASES, ids=[c[0] for c in BIT_CASES])
def test_misaligned_params_give_the_same_bits(case):
    """The one-element path writes what the tile path and the CPU write."""
    _, name, kwargs, dtype = case
    params = make_params(MANY_SHAPES, dtype=dtype)
    grads = make_grads(MANY_SHAPES, steps=STEPS, dtype=dtype)
    cpu_p, cpu_opt = run_steps(factory(name, kwargs, "cpu"), params, grads)
    misaligned = to_dev_misaligned(params)
    assert all(p.data_ptr() % 16 != 0 for p in misaligned)
    dev_p, dev_opt = run_steps(factory(name, kwargs, DEV), misaligned, grads_to(grads), clone=False)
    assert_all_bits_equal(dev_p, dev_opt, cpu_p, cpu_opt, msg="misaligned CUDA vs CPU")


# --------------------------------------------------------------------------------------------
# Params on CPU and CUDA in one optimizer
# --------------------------------------------------------------------------------------------
MIXED_CASES = [
    ("adamw", "AdamW", dict(lr=0.01, weight_decay=0.1), F32),
    ("sgd-momentum", "SGD", dict(lr=0.1, momentum=0.9), F32),
    ("adamw-bf16-sr", "AdamW", dict(lr=0.05, stochastic_rounding=True, seed=3), BF16),
    ("adamw-cpu-tensor-lr", "AdamW", dict(lr=T(0.01)), F32),
]


@pytest.mark.parametrize("case", MIXED_CASES, ids=[c[0] for c in MIXED_CASES])
def test_cpu_and_cuda_params_in_one_optimizer(case):
    """Every other param on the GPU: each device's bucket gives the bits an all-CPU run gives
    (stochastic rounding keys by the param's index over all groups, whatever its device)."""
    _, name, kwargs, dtype = case
    params = make_params(MANY_SHAPES, dtype=dtype)
    grads = make_grads(MANY_SHAPES, steps=STEPS, dtype=dtype)
    mixed = [to_dev([p])[0] if i % 2 else to_dev([p], "cpu")[0] for i, p in enumerate(params)]
    mixed_grads = [[g.to(mixed[i].device) for i, g in enumerate(row)] for row in grads]
    got_p, got_opt = run_steps(factory(name, kwargs), mixed, mixed_grads)
    ref_p, ref_opt = run_steps(factory(name, kwargs), params, grads)
    assert [p.device.type for p in got_p[:2]] == ["cpu", DEV.type]
    assert_all_bits_equal(got_p, got_opt, ref_p, ref_opt, msg="mixed vs CPU")


def test_mixed_devices_with_global_clip():
    """max_grad_norm over params on both devices: one global norm (each device sums its part
    in float64, in another order than an all-CPU run: compare with the conftest fp32 table)."""
    params = make_params(SMALL_SHAPES)
    grads = make_grads(SMALL_SHAPES, steps=STEPS, scale=3.0)
    mixed = [to_dev([p])[0] if i % 2 else to_dev([p], "cpu")[0] for i, p in enumerate(params)]
    mixed_grads = [[g.to(mixed[i].device) for i, g in enumerate(row)] for row in grads]
    kwargs = dict(lr=0.05, max_grad_norm=1.0)
    got_p, got_opt = run_steps(factory("SGD", kwargs), mixed, mixed_grads)
    ref_p, ref_opt = run_steps(factory("SGD", kwargs), params, grads)
    for i, (a, b) in enumerate(zip(got_p, ref_p)):
        assert_close(a.detach().cpu(), b.detach(), msg=f"param {i}")
    torch.testing.assert_close(got_opt.last_grad_norm.cpu(), ref_opt.last_grad_norm, rtol=2e-5, atol=0)


def test_cuda_tensor_lr_reaches_cpu_params():
    """A float32 CUDA lr in an optimizer that also holds CPU params: the CPU bucket must use
    its value too (reading it there is a device-to-host copy; the CUDA bucket reads it in the
    kernel)."""
    params = make_params(SMALL_SHAPES)
    grads = make_grads(SMALL_SHAPES, steps=3)
    mixed = [to_dev([p])[0] if i % 2 else to_dev([p], "cpu")[0] for i, p in enumerate(params)]
    mixed_grads = [[g.to(mixed[i].device) for i, g in enumerate(row)] for row in grads]
    got_p, got_opt = run_steps(lambda ps: fusedopt.AdamW(ps, lr=torch.tensor(0.01, device=DEV)), mixed, mixed_grads)
    ref_p, ref_opt = run_steps(lambda ps: fusedopt.AdamW(ps, lr=0.01), params, grads)
    assert_all_bits_equal(got_p, got_opt, ref_p, ref_opt, msg="CUDA lr, mixed devices")


# --------------------------------------------------------------------------------------------
# Params on a GPU that is not the current one: every launch (eager step, sum of squares,
# functional, averaging, compiled op) must run on the params' device. torch's default stream
# is handle 0 on every device, so without the device index the kernels would launch on the
# current device with another device's pointers (an illegal access without peer access).
# --------------------------------------------------------------------------------------------
OTHER = torch.device("cuda", 1)
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA devices")


@pytest.fixture
def current_device_0():
    """Device 0 current during the test (as in a script that never calls set_device), and
    still current afterwards: the launches must restore it."""
    previous = torch.cuda.current_device()
    torch.cuda.set_device(0)
    yield
    torch.cuda.synchronize(OTHER)  # an illegal access on device 1 surfaces here at the latest
    assert torch.cuda.current_device() == 0, "a launch left another device current"
    torch.cuda.set_device(previous)


@needs_two_gpus
@pytest.mark.parametrize("case", [BIT_CASES[1], BIT_CASES[5], BIT_CASES[7]], ids=lambda c: c[0])
def test_eager_step_on_a_gpu_that_is_not_current(case, current_device_0):
    _, name, kwargs, dtype = case
    params = make_params(MANY_SHAPES, dtype=dtype)
    grads = make_grads(MANY_SHAPES, steps=STEPS, dtype=dtype)
    cpu_p, cpu_opt = run_steps(factory(name, kwargs, "cpu"), params, grads)
    dev_p, dev_opt = run_steps(factory(name, kwargs, OTHER), to_dev(params, OTHER), grads_to(grads, OTHER))
    assert dev_p[0].device == OTHER and torch.cuda.current_device() == 0
    assert_all_bits_equal(dev_p, dev_opt, cpu_p, cpu_opt, msg="cuda:1 vs CPU")


@needs_two_gpus
def test_clip_and_stats_on_a_gpu_that_is_not_current(current_device_0):
    """max_grad_norm's sum of squares and track_stats on cuda:1. The CPU sums the squares in
    float64 in another order: the conftest fp32 table for params, rtol 2e-5 for the norm."""
    params = make_params(SMALL_SHAPES)
    grads = make_grads(SMALL_SHAPES, steps=STEPS, scale=3.0)  # norm above 1: clipping is active
    kwargs = dict(lr=0.01, weight_decay=0.1, max_grad_norm=1.0, track_stats=True)
    cpu_p, cpu_opt = run_steps(factory("AdamW", kwargs, "cpu"), params, grads)
    dev_p, dev_opt = run_steps(factory("AdamW", kwargs, OTHER), to_dev(params, OTHER), grads_to(grads, OTHER))
    assert dev_opt.last_grad_norm.device == OTHER
    torch.testing.assert_close(dev_opt.last_grad_norm.cpu(), cpu_opt.last_grad_norm, rtol=2e-5, atol=0)
    torch.testing.assert_close(dev_opt.stats()[0]["grad_norm"].cpu(), cpu_opt.stats()[0]["grad_norm"], rtol=2e-5,
                               atol=0)
    for i, (a, b) in enumerate(zip(dev_p, cpu_p)):
        assert_close(a.detach().cpu(), b.detach(), msg=f"param {i}")


@needs_two_gpus
def test_functional_and_ema_on_a_gpu_that_is_not_current(current_device_0):
    from fusedopt import functional as F

    shapes = SMALL_SHAPES + [(65537,)]
    results = {}
    for device in ("cpu", OTHER):
        ps = [p.detach().to(device, copy=True) for p in make_params(shapes)]
        gs = [g.to(device) for g in make_grads(shapes, steps=1)[0]]
        m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        ema = fusedopt.averaging.EMA(ps, decay=0.9)
        for step in (1, 2):
            F.adamw_(ps, gs, m, v, step=step, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
            ema.update()
        buf = [torch.empty_like(p) for p in ps]
        F.sgd_(ps, gs, buf, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, first_step=True)
        results[str(device)] = (ps, m, v, buf, ema.averages)
    for what, got, ref in zip(("params", "exp_avg", "exp_avg_sq", "momentum", "EMA"), results[str(OTHER)],
                              results["cpu"]):
        for i, (a, b) in enumerate(zip(got, ref, strict=True)):
            assert a.device == OTHER
            assert_bits_equal(a.cpu(), b, msg=f"{what} {i}: cuda:1 vs CPU")


@needs_two_gpus
def test_compiled_step_on_a_gpu_that_is_not_current(current_device_0, fresh_dynamo):
    """The torch.compile ops (step and sum of squares) on cuda:1: the eager CPU step's result
    (clip: the conftest fp32 table and rtol 2e-5 for the norm, as above)."""
    params = make_params(SMALL_SHAPES)
    grads = make_grads(SMALL_SHAPES, steps=3, scale=3.0)
    kwargs = dict(lr=0.01, weight_decay=0.1, max_grad_norm=1.0)
    cpu_p, cpu_opt = run_steps(factory("AdamW", kwargs, "cpu"), params, grads)
    dev_p = to_dev(params, OTHER)
    opt = fusedopt.AdamW(dev_p, **kwargs)

    @torch.compile(backend="aot_eager")  # the custom ops without Inductor's codegen
    def step():
        opt.step()

    for row in grads_to(grads, OTHER):
        set_grads(dev_p, row)
        step()
    assert fresh_dynamo["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    torch.testing.assert_close(opt.last_grad_norm.cpu(), cpu_opt.last_grad_norm, rtol=2e-5, atol=0)
    for i, (a, b) in enumerate(zip(dev_p, cpu_p)):
        assert_close(a.detach().cpu(), b.detach(), msg=f"param {i}")


# --------------------------------------------------------------------------------------------
# Tensor lr on the device, changed in place (as a scheduler does)
# --------------------------------------------------------------------------------------------
LR_SCHEDULE = [0.01, 0.02, 0.005, 0.0, 0.03]


@pytest.mark.parametrize("name,ref_cls,kwargs", [
    ("AdamW", torch.optim.AdamW, dict(weight_decay=0.1)),
    ("Adam", torch.optim.Adam, dict(amsgrad=True)),
    ("SGD", torch.optim.SGD, dict(momentum=0.9, nesterov=True)),
], ids=["adamw", "adam-amsgrad", "sgd-nesterov"])
def test_tensor_lr_on_cuda_changed_in_place(name, ref_cls, kwargs):
    params = to_dev(make_params(SMALL_SHAPES))
    grads = grads_to(make_grads(SMALL_SHAPES, steps=len(LR_SCHEDULE)))
    lr = torch.tensor(LR_SCHEDULE[0], device=DEV)
    got_p, ref_p = to_dev(params), to_dev(params)
    opt = getattr(fusedopt, name)(got_p, lr=lr, **kwargs)
    ref = ref_cls(ref_p, lr=LR_SCHEDULE[0], foreach=False, **kwargs)
    for k, value in enumerate(LR_SCHEDULE):
        lr.fill_(value)
        ref.param_groups[0]["lr"] = value
        set_grads(got_p, grads[k])
        set_grads(ref_p, grads[k])
        opt.step()
        ref.step()
    assert opt.param_groups[0]["lr"] is lr, "the tensor lr must stay the user's tensor"
    assert_optimizers_match(got_p, opt, ref_p, ref)


# --------------------------------------------------------------------------------------------
# No host synchronisation in step()
# --------------------------------------------------------------------------------------------
class sync_is_an_error:
    """torch.cuda.set_sync_debug_mode("error") for the body: any synchronising CUDA call
    (item(), .cpu(), a blocking copy, ...) raises."""

    def __enter__(self):
        torch.cuda.synchronize()
        self.previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.previous)
        torch.cuda.synchronize()
        return False


SYNC_CASES = [
    ("adamw", "AdamW", dict(weight_decay=0.1), F32),
    ("adam-amsgrad-clip-stats", "Adam", dict(amsgrad=True, max_grad_norm=1.0, track_stats=True), F32),
    ("sgd-momentum-clip", "SGD", dict(momentum=0.9, max_grad_norm=1.0), F32),
    ("sgd-plain", "SGD", dict(), F32),
    ("adamw-bf16-sr", "AdamW", dict(stochastic_rounding=True, seed=1), BF16),
    ("sgd-bf16-sr-momentum", "SGD", dict(momentum=0.9, stochastic_rounding=True, seed=1), BF16),
    ("adamw-fp16-master", "AdamW", dict(master_weights=True), F16),
]


@pytest.mark.parametrize("amp", [False, True], ids=["plain", "amp-scalars"])
@pytest.mark.parametrize("case", SYNC_CASES, ids=[c[0] for c in SYNC_CASES])
def test_step_does_not_synchronise(case, amp):
    """After the first step (which builds the plan and creates state), step() with a device
    lr, device AMP scalars, clipping and stats never synchronises, whether grads are updated
    in place or replaced by new tensors (as backward after zero_grad(set_to_none=True) does)."""
    _, name, kwargs, dtype = case
    params = to_dev(make_params(MANY_SHAPES, dtype=dtype))
    grads = grads_to(make_grads(MANY_SHAPES, steps=4, dtype=dtype))
    lr = torch.tensor(0.01, device=DEV)
    opt = getattr(fusedopt, name)(params, lr=lr, **kwargs)
    if amp:
        opt.grad_scale = torch.tensor(2.0, device=DEV)
        opt.found_inf = torch.zeros((), device=DEV)
    set_grads(params, grads[0])
    opt.step()
    with sync_is_an_error():
        for k in (1, 2):
            for p, g in zip(params, grads[k]):
                p.grad.copy_(g)
            opt.step()
            lr.mul_(0.5)
        for p, g in zip(params, grads[3]):
            p.grad = g.clone()
        opt.step()
        if kwargs.get("track_stats"):
            opt.stats()
        if kwargs.get("max_grad_norm"):
            assert opt.last_grad_norm.device.type == DEV.type
    assert all(float(s["step"]) == 4.0 for s in opt.state.values() if "step" in s)


def test_grad_scaler_training_step_does_not_synchronise_in_step():
    """A real AMP loop (GradScaler on CUDA, fp16 autocast): fusedopt's step, called by
    scaler.step, runs with synchronisation made an error (via step pre/post hooks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).to(DEV)
    opt = fusedopt.AdamW(model.parameters(), lr=torch.tensor(1e-3, device=DEV), max_grad_norm=1.0)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)  # no overflow: every step is taken
    armed = {"on": False, "previous": 0}

    def pre(*_):
        if armed["on"]:
            torch.cuda.synchronize()
            armed["previous"] = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")

    def post(*_):
        if armed["on"]:
            torch.cuda.set_sync_debug_mode(armed["previous"])

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    x, y = torch.randn(16, 32, device=DEV), torch.randn(16, 8, device=DEV)
    try:
        for k in range(4):
            armed["on"] = k > 0
            with torch.autocast("cuda", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(float(s["step"]) == 4.0 for s in opt.state.values())


# --------------------------------------------------------------------------------------------
# CUDA graphs: 3 eager steps, capture opt.step(), 2 replays == 5 eager steps
# --------------------------------------------------------------------------------------------
GRAPH_CASES = [
    ("adamw-fp32", "AdamW", dict(lr=0.01, weight_decay=0.1), F32),
    ("adamw-bf16-sr", "AdamW", dict(lr=0.05, stochastic_rounding=True, seed=11), BF16),
    ("adamw-fp32-tensor-lr-clip-stats", "AdamW",
     dict(lr=T(0.01), max_grad_norm=1.0, track_stats=True, amsgrad=True), F32),
    ("sgd-momentum-fp32-tensor-lr", "SGD", dict(lr=T(0.1), momentum=0.9, nesterov=True), F32),
    ("sgd-bf16-sr", "SGD", dict(lr=0.05, stochastic_rounding=True, seed=11), BF16),
    # Issue 13.5: tensor betas on the GPU are read by the kernel, so the step is capturable.
    ("adamw-fp32-device-tensor-betas", "AdamW", dict(lr=0.01, betas=(T(0.85), T(0.95))), F32),
]


def test_device_tensor_betas_match_float_betas_without_a_host_sync():
    """Issue 13.5: float32 CUDA tensor betas give the bits of the same (float32-valued) float
    betas, and no host sync."""
    params0 = make_params(MANY_SHAPES)
    grads = grads_to(make_grads(MANY_SHAPES, steps=3))
    runs = []
    b1, b2 = torch.tensor(0.85), torch.tensor(0.95)
    for betas in ((float(b1), float(b2)), (b1.to(DEV), b2.to(DEV))):
        params = to_dev(params0)
        opt = fusedopt.AdamW(params, lr=0.01, betas=betas)
        for k in range(3):
            for p, g in zip(params, grads[k]):
                p.grad = g.clone()
            if k > 0 and isinstance(betas[0], torch.Tensor):
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        runs.append(params)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_capturing_a_first_step_raises_and_changes_nothing():
    """Issue 13.7: a first step (state to create, SGD's first-step flag) cannot be captured."""
    params = to_dev(make_params(MANY_SHAPES))
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    opt = fusedopt.SGD(params, lr=0.1, momentum=0.9)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            opt.step()
    torch.cuda.synchronize()
    assert not opt.state and all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("case", GRAPH_CASES, ids=[c[0] for c in GRAPH_CASES])
def test_cuda_graph_replay_equals_eager_steps(case):
    _, name, kwargs, dtype = case
    params0 = make_params(MANY_SHAPES, dtype=dtype)
    grads = grads_to(make_grads(MANY_SHAPES, steps=STEPS, dtype=dtype, scale=2.0))
    lr_values = [0.01, 0.02, 0.005, 0.015, 0.03]

    def setup():
        params = to_dev(params0)
        static_grads = [torch.empty_like(p) for p in params]  # stable addresses for the graph
        for p, g in zip(params, static_grads):
            p.grad = g
        opt = getattr(fusedopt, name)(params, **on_device(kwargs, DEV))
        return params, static_grads, opt

    def feed(opt, static_grads, k):
        for sg, g in zip(static_grads, grads[k]):
            sg.copy_(g)
        lr = opt.param_groups[0]["lr"]
        if isinstance(lr, torch.Tensor):
            lr.fill_(lr_values[k])  # in place: the captured kernels read it from the device

    ref_p, ref_g, ref_opt = setup()
    for k in range(STEPS):
        feed(ref_opt, ref_g, k)
        ref_opt.step()

    got_p, got_g, got_opt = setup()
    for k in range(3):
        feed(got_opt, got_g, k)
        got_opt.step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got_opt.step()
    for k in range(3, STEPS):
        feed(got_opt, got_g, k)
        graph.replay()
    torch.cuda.synchronize()

    assert_graph_equal(got_p, got_opt, ref_p, ref_opt)
    for st in got_opt.state.values():
        if "step" in st:
            assert float(st["step"]) == STEPS
    if kwargs.get("max_grad_norm"):
        assert torch.equal(got_opt.last_grad_norm, ref_opt.last_grad_norm)
    if kwargs.get("track_stats"):
        for gs, rs in zip(got_opt.stats(), ref_opt.stats()):
            for key in rs:
                # float64 atomics add the blocks' sums in run-dependent order (telemetry only).
                torch.testing.assert_close(gs[key], rs[key], rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# torch.amp.GradScaler: unscale and the inf skip inside the kernels
# --------------------------------------------------------------------------------------------
def _amp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(DEV)


def _amp_batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=gen).to(DEV), torch.randn(8, 4, generator=gen).to(DEV)) for _ in range(n)]


@pytest.mark.parametrize("name,kwargs", [
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("AdamW", dict(lr=0.01, max_grad_norm=0.5, track_stats=True)),
], ids=["adamw", "sgd-momentum", "adamw-clip-stats"])
def test_grad_scaler_inf_leaves_everything_unchanged(name, kwargs):
    model = _amp_model()
    opt = getattr(fusedopt, name)(model.parameters(), **kwargs)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
    (x, y), (x2, y2) = _amp_batches(2)
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()

    scaler.scale(nn.functional.mse_loss(model(x2), y2)).backward()
    with torch.no_grad():
        next(model.parameters()).grad.view(-1)[3] = float("inf")
    snap = snapshot(opt)
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    torch.cuda.synchronize()
    assert_unchanged(opt, snap)  # params, grads, every state tensor including `step`
    assert scaler.get_scale() < scale_before, "GradScaler must have seen the inf"


@pytest.mark.parametrize("name,ref_cls,kwargs", [
    ("AdamW", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    ("Adam", torch.optim.Adam, dict(lr=0.01, amsgrad=True)),
    ("SGD", torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.2)),
], ids=["adamw", "adam-amsgrad", "sgd-momentum"])
def test_grad_scaler_training_matches_torch(name, ref_cls, kwargs):
    """GradScaler with skipped steps (an inf on the first and the fourth step): fusedopt
    (unscale and skip in the kernel) ends where torch.optim (GradScaler unscales the grads,
    skips step()) ends; a skipped first step leaves SGD's momentum to start on the next."""
    batches = _amp_batches(6)
    results = []
    for make in (lambda ps: getattr(fusedopt, name)(ps, **kwargs),
                 lambda ps: ref_cls(ps, foreach=False, **kwargs)):
        model = _amp_model()
        opt = make(list(model.parameters()))
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
        for k, (x, y) in enumerate(batches):
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            if k in (0, 3):
                with torch.no_grad():
                    next(model.parameters()).grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        results.append((list(model.parameters()), opt))
    (got_p, got_opt), (ref_p, ref_opt) = results
    assert_optimizers_match(got_p, got_opt, ref_p, ref_opt)


# --------------------------------------------------------------------------------------------
# max_grad_norm and track_stats on CUDA
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,ref_cls,kwargs", [
    ("AdamW", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    ("SGD", torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
], ids=["adamw", "sgd-momentum"])
def test_max_grad_norm_matches_clip_grad_norm(name, ref_cls, kwargs):
    params = to_dev(make_params(MANY_SHAPES))
    grads = grads_to(make_grads(MANY_SHAPES, steps=STEPS, scale=3.0))  # norm ~ 1e3: clipping is active
    got_p, ref_p = to_dev(params), to_dev(params)
    opt = getattr(fusedopt, name)(got_p, max_grad_norm=1.0, **kwargs)
    ref = ref_cls(ref_p, foreach=False, **kwargs)
    for k in range(STEPS):
        set_grads(got_p, grads[k])
        set_grads(ref_p, grads[k])
        opt.step()
        total = torch.nn.utils.clip_grad_norm_(ref_p, 1.0, foreach=False)
        ref.step()
        assert opt.last_grad_norm.device == got_p[0].device and opt.last_grad_norm.dtype == F32
        torch.testing.assert_close(opt.last_grad_norm, total.float(), rtol=2e-5, atol=0)
    assert_optimizers_match(got_p, opt, ref_p, ref)


@pytest.mark.parametrize("name,ref_cls,kwargs", [
    ("AdamW", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    ("SGD", torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
], ids=["adamw", "sgd-momentum"])
def test_max_grad_norm_with_a_grad_scale_of_2_70(name, ref_cls, kwargs):
    """A GradScaler whose scale has grown to 2**70 (fp32/bf16 grads never overflow, so it
    keeps doubling): the scaled sum of squares (~2**140 * sum g^2) is past float32's range,
    so the CUDA reduction must stay float64 up to the unscaling, or the norm is inf and the
    clip factor 0. Scaling by a power of two is exact, so fusedopt sees torch's grads times
    2**70: the same tolerances as test_max_grad_norm_matches_clip_grad_norm."""
    scale = 2.0 ** 70
    params = to_dev(make_params(SMALL_SHAPES))
    grads = grads_to(make_grads(SMALL_SHAPES, steps=3, scale=3.0))
    got_p, ref_p = to_dev(params), to_dev(params)
    opt = getattr(fusedopt, name)(got_p, max_grad_norm=1.0, **kwargs)
    opt.grad_scale = torch.tensor(scale, device=DEV)  # what GradScaler hands the step
    ref = ref_cls(ref_p, foreach=False, **kwargs)
    for k in range(3):
        set_grads(got_p, [g * scale for g in grads[k]])
        set_grads(ref_p, grads[k])
        opt.step()
        total = torch.nn.utils.clip_grad_norm_(ref_p, 1.0, foreach=False)
        ref.step()
        assert torch.isfinite(opt.last_grad_norm), f"step {k}: last_grad_norm {opt.last_grad_norm}"
        torch.testing.assert_close(opt.last_grad_norm, total.float(), rtol=2e-5, atol=0)
    assert_optimizers_match(got_p, opt, ref_p, ref)


def test_sum_squares_op_is_float64_on_cuda():
    """fusedopt::sum_squares (the compiled path's reduction) on CUDA: float64, as on the CPU,
    for grads whose squares overflow float32. The reference sums the same float64 squares
    (all positive) in another order: each sum is within n * 2**-53 ~ 4e-11 relative of the
    exact one for these 370k terms, hence rtol 1e-10."""
    gen = torch.Generator().manual_seed(3)
    tensors = [(torch.randn(n, generator=gen) * 2.0 ** 70).to(DEV) for n in (1, 4095, 65537, 300000)]
    out = torch.ops.fusedopt.sum_squares(tensors)
    expected = sum(t.double().pow(2).sum() for t in tensors)
    assert out.dtype == torch.float64 and out.device.type == DEV.type and out.dim() == 0
    assert torch.isfinite(out)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=0)


def test_clipping_optimizers_on_two_streams_do_not_share_a_workspace():
    """Two optimizers with max_grad_norm stepping concurrently on two streams: each must see
    only its own grads' norm. A workspace shared per device let one call's finishing kernel
    add the other's partial sums. Both streams wait on one event behind a sleeping kernel,
    so both steps are queued before either runs and their reductions overlap on the device.
    torch's norms (float64 here, other order) are the reference: rtol 1e-6 covers the
    float32 rounding of last_grad_norm."""
    shapes = [(1 << 22,), (1 << 21,), (12345,)]
    sets = []
    for seed, scale in ((1, 1.0), (2, 100.0)):
        params = to_dev(make_params(shapes, seed=seed))
        grads = grads_to(make_grads(shapes, steps=1, seed=seed + 10, scale=scale))[0]
        set_grads(params, grads)
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).float()
        sets.append((fusedopt.SGD(params, lr=0.0, max_grad_norm=1.0), norm))
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    gate = torch.cuda.Stream()
    torch.cuda.synchronize()
    for _ in range(10):
        with torch.cuda.stream(gate):
            torch.cuda._sleep(20_000_000)  # ~10 ms: time to queue both steps behind it
            opened = torch.cuda.Event()
            opened.record(gate)
        for (opt, _), stream in zip(sets, streams):
            stream.wait_event(opened)
            with torch.cuda.stream(stream):
                opt.step()
        for (opt, norm), stream in zip(sets, streams):
            stream.synchronize()
            torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-6, atol=0)


@pytest.mark.parametrize("grad_scale", [None, 8.0], ids=["plain", "grad-scale"])
def test_track_stats_on_cuda_equals_torch_norms(grad_scale):
    params = to_dev(make_params(MANY_SHAPES))
    grads = grads_to(make_grads(MANY_SHAPES, steps=3))
    split = 6
    opt = fusedopt.AdamW([{"params": params[:split]}, {"params": params[split:], "lr": 0.003}], lr=0.01,
                         track_stats=True)
    for k in range(3):
        set_grads(params, grads[k])
        if grad_scale is not None:
            opt.grad_scale = torch.tensor(grad_scale, device=DEV)
            for p in params:
                p.grad.mul_(grad_scale)
        before = [p.detach().double().clone() for p in params]
        opt.step()
    after = [p.detach().double() for p in params]

    def norm(ts):
        return torch.sqrt(sum(t.pow(2).sum() for t in ts))

    for gi, idx in enumerate((range(0, split), range(split, len(params)))):
        stats = opt.stats()[gi]
        g = [grads[2][i].double() for i in idx]
        expected = {
            "grad_norm": norm(g),
            "param_norm": norm([after[i] for i in idx]),
            "update_ratio": norm([after[i] - before[i] for i in idx]) / norm([before[i] for i in idx]),
        }
        for key, ref in expected.items():
            got = stats[key]
            assert got.device.type == DEV.type and got.dtype == F32 and got.dim() == 0, key
            torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=0, msg=lambda m: f"group {gi} {key}: {m}")


# --------------------------------------------------------------------------------------------
# EMA on CUDA (fusedopt.averaging.EMA)
# --------------------------------------------------------------------------------------------
def test_ema_on_cuda():
    averaging = pytest.importorskip("fusedopt.averaging")
    EMA = getattr(averaging, "EMA", None)
    if EMA is None:
        pytest.skip("fusedopt.averaging.EMA is not available")
    shapes = SMALL_SHAPES + [(65537,)]
    dtypes = [F32, BF16, F16, F32, BF16, F32]
    cpu_params = [nn.Parameter(p.detach().to(dt)) for p, dt in zip(make_params(shapes), dtypes)]
    dev_params = to_dev(cpu_params)
    ema_cpu, ema_dev = EMA(cpu_params, decay=0.9), EMA(dev_params, decay=0.9)
    ref = [p.detach().float().clone() for p in cpu_params]
    for k in range(4):
        gen = torch.Generator().manual_seed(50 + k)
        with torch.no_grad():
            for pc, pd in zip(cpu_params, dev_params):
                step = torch.randn(pc.shape, generator=gen).mul_(0.3).to(pc.dtype)
                pc.add_(step)
                pd.add_(step.to(DEV))
        ema_cpu.update()
        ema_dev.update()
        for r, p in zip(ref, cpu_params):
            r.add_(0.1 * (p.detach().float() - r))
    for i, (a_dev, a_cpu, r) in enumerate(zip(ema_dev.averages, ema_cpu.averages, ref)):
        assert a_dev.device.type == DEV.type and a_dev.dtype == F32
        assert_bits_equal(a_dev.cpu(), a_cpu, msg=f"EMA average {i}: CUDA vs CPU")
        # The fp32 torch reference may use FMA: a few ulps per update.
        torch.testing.assert_close(a_dev.cpu(), r, rtol=1e-5, atol=1e-6)
    live = [p.detach().clone() for p in dev_params]
    with ema_dev.average_parameters():
        for p, a in zip(dev_params, ema_dev.averages):
            assert torch.equal(p.detach(), a.to(p.dtype))
    for p, b in zip(dev_params, live):
        assert_bits_equal(p.detach(), b, msg="live params restored")


# --------------------------------------------------------------------------------------------
# State dicts: torch's fused CUDA AdamW <-> fusedopt
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["torch-to-fusedopt", "fusedopt-to-torch"])
def test_state_dict_cross_load_with_torch_fused_adamw(direction):
    kwargs = dict(lr=0.01, weight_decay=0.1)
    params = to_dev(make_params(SMALL_SHAPES))
    grads = grads_to(make_grads(SMALL_SHAPES, steps=6))
    first, second = ((lambda ps: torch.optim.AdamW(ps, fused=True, **kwargs)),
                     (lambda ps: fusedopt.AdamW(ps, **kwargs)))
    if direction == "fusedopt-to-torch":
        first, second = second, first

    ps = to_dev(params)
    opt = first(ps)
    for k in range(3):
        set_grads(ps, grads[k])
        opt.step()
    sd = copy.deepcopy(opt.state_dict())  # torch's loader would otherwise share the tensors
    opt2 = second(ps)
    opt2.load_state_dict(sd)
    for st in opt2.state.values():
        assert st["step"].dtype == F32 and float(st["step"]) == 3.0
    for k in range(3, 6):
        set_grads(ps, grads[k])
        opt2.step()

    ref_p, ref_opt = run_steps(lambda p: torch.optim.AdamW(p, fused=True, **kwargs), params, grads)
    assert_optimizers_match(ps, opt2, ref_p, ref_opt)


# --------------------------------------------------------------------------------------------
# torch.compile on CUDA (the custom-op path of fusedopt/_compile.py)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_compiled_train_step_on_cuda(fresh_dynamo):
    """Inductor on CUDA: matches eager within fp32 tolerance (the compiled forward/backward
    differs by a few ulps), no graph break from fusedopt, no recompile when a CUDA tensor lr
    is changed in place."""
    counters = fresh_dynamo

    def run(compiled):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4)).to(DEV)
        opt = fusedopt.AdamW(model.parameters(), lr=torch.tensor(0.01, device=DEV), weight_decay=0.1)

        def train_step(x, y):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        fn = torch.compile(train_step) if compiled else train_step
        graphs = []
        for k, (x, y) in enumerate(_amp_batches(4)):
            fn(x, y)
            opt.param_groups[0]["lr"].mul_(0.7)
            graphs.append(counters["stats"]["unique_graphs"])
        return model, opt, graphs

    got, got_opt, graphs = run(True)
    ref, ref_opt, _ = run(False)
    for i, (a, b) in enumerate(zip(got.parameters(), ref.parameters())):
        assert_close(a, b, msg=f"param {i}")
    assert graphs[0] == graphs[-1], f"recompiled: unique graphs per call {graphs}"
    ours = [r for r in counters["graph_break"] if any(m in r for m in ("fusedopt", "_eager_step"))]
    assert ours == [], ours


@pytest.mark.parametrize("case", GRAPH_CASES[:2], ids=[c[0] for c in GRAPH_CASES[:2]])
def test_compiled_step_reduce_overhead_equals_eager(case, fresh_dynamo):
    """torch.compile(mode="reduce-overhead") (CUDA graphs through Inductor) of a function
    that calls opt.step(): the same kernels, so the same bits as eager."""
    _, name, kwargs, dtype = case
    params0 = make_params(MANY_SHAPES, dtype=dtype)
    grads = grads_to(make_grads(MANY_SHAPES, steps=STEPS, dtype=dtype))

    def run(compiled):
        params = to_dev(params0)
        static = [torch.empty_like(p) for p in params]
        for p, g in zip(params, static):
            p.grad = g
        opt = getattr(fusedopt, name)(params, **on_device(kwargs, DEV))

        def step():
            opt.step()

        fn = torch.compile(step, mode="reduce-overhead") if compiled else step
        for k in range(STEPS):
            for sg, g in zip(static, grads[k]):
                sg.copy_(g)
            fn()
        torch.cuda.synchronize()
        return params, opt

    got_p, got_opt = run(True)
    ref_p, ref_opt = run(False)
    assert_graph_equal(got_p, got_opt, ref_p, ref_opt)


# --------------------------------------------------------------------------------------------
# A tensor of more than 2**31 elements (opt-in: 4 GiB per bf16 tensor)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FUSEDOPT_TEST_HUGE") != "1",
                    reason="set FUSEDOPT_TEST_HUGE=1 to run (about 11 GiB of GPU memory)")
def test_sgd_on_a_tensor_of_more_than_2_31_elements():
    n = 2 ** 31 + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 11 * 2 ** 30:
        pytest.skip(f"needs about 11 GiB of free GPU memory, {free / 2 ** 30:.1f} GiB free")
    # Values exact in bf16: 1 - 0.25 * g for g in {0.5, -2, 1, 2, 4, 8}.
    p = nn.Parameter(torch.ones(n, dtype=BF16, device=DEV))
    g = torch.full((n,), 0.5, dtype=BF16, device=DEV)
    special = {0: -2.0, 2 ** 31 - 1: 1.0, 2 ** 31: 2.0, n - 2: 4.0, n - 1: 8.0}
    for i, v in special.items():
        g[i] = v
    p.grad = g
    fusedopt.SGD([p], lr=0.25).step()
    torch.cuda.synchronize()
    for i, v in special.items():
        assert float(p[i]) == 1.0 - 0.25 * v, f"element {i}: {float(p[i])}"
    del g
    p.grad = None
    moved = int((p.detach() == 0.875).sum())
    assert moved == n - len(special), f"{n - len(special) - moved} elements not updated exactly once"
