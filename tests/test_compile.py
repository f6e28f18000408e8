"""torch.compile of a step that calls fusedopt (CPU; the CUDA twins are in test_cuda.py).

Under Dynamo, ``step()`` takes the custom-op path of fusedopt/_compile.py: the whole step is
one graph (no graph break per tensor, none at all in steady state), a tensor lr changed in
place between calls does not recompile, and the ops call the eager path's kernels.

Tolerances: where only ``opt.step()`` is compiled, compiled and eager steps run the same
kernels on the same tables, so they must agree bit for bit (the clip factor is the same
float64 arithmetic, run by the same aten ops under ``aot_eager``). Where the whole training
step is compiled, the model's forward/backward is compiled too, so grads differ from eager
by the usual few fp32 ulps: compared with the suite's fp32 table (torch.testing defaults).

Most checks use ``backend="aot_eager"`` (Dynamo + AOTAutograd functionalization of the
mutating ops, no code generation: seconds on a 2-core machine); one check runs Inductor.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import fusedopt
from conftest import assert_bits_equal, assert_close

pytestmark = [
    pytest.mark.skipif(not hasattr(torch, "compile") or not hasattr(torch.library, "custom_op"),
                       reason="needs torch.compile and torch.library.custom_op (torch >= 2.4)"),
    # Dynamo itself probes `.grad` of the non-leaf loss when it resumes after its graph break
    # on backward(); the suite turns warnings into errors, so silence that one (not ours).
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf"),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


class Recorder:
    """A Dynamo backend that records every graph it is given, then runs ``inner``."""

    def __init__(self, inner="aot_eager"):
        self.graphs = []
        self.inner = inner

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        if self.inner is None:
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend(self.inner)(gm, example_inputs)

    def op_names(self):
        return [str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function"]


def graph_breaks() -> dict:
    return dict(counters["graph_break"])


def fusedopt_breaks() -> list[str]:
    """Graph-break reasons that point into fusedopt's own code."""
    return [r for r in graph_breaks() if any(m in r for m in ("fusedopt", "_eager_step", "_publish"))]


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def batches(n, dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(6, 8, generator=gen).to(dtype), torch.randn(6, 4, generator=gen).to(dtype))
            for _ in range(n)]


def make_params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def set_grads(params, k, seed=100):
    gen = torch.Generator().manual_seed(seed + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


SHAPES = [(1,), (7,), (33, 5), (1000,), (4095,), (3, 4, 5)]


# --------------------------------------------------------------------------------------------
# opt.step() alone: one graph, no break, bit-equal to eager.
# Each row: id, class, kwargs, param dtype.
# --------------------------------------------------------------------------------------------
T = torch.tensor
STEP_CASES = [
    ("adamw", "AdamW", dict(lr=0.01, weight_decay=0.1), torch.float32),
    ("adamw-tensor-lr", "AdamW", dict(lr=T(0.01)), torch.float32),
    ("adam-amsgrad-maximize", "Adam", dict(lr=0.01, amsgrad=True, maximize=True, weight_decay=0.05), torch.float32),
    ("sgd", "SGD", dict(lr=0.05), torch.float32),
    ("sgd-momentum-nesterov-wd", "SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
     torch.float32),
    ("sgd-momentum-tensor-lr", "SGD", dict(lr=T(0.05), momentum=0.8), torch.float32),
    ("adamw-clip-stats", "AdamW", dict(lr=0.01, max_grad_norm=0.5, track_stats=True), torch.float32),
    ("sgd-clip", "SGD", dict(lr=0.05, momentum=0.9, max_grad_norm=0.5), torch.float32),
    ("adamw-bf16", "AdamW", dict(lr=0.05), torch.bfloat16),
    ("adamw-bf16-master", "AdamW", dict(lr=0.05, master_weights=True), torch.bfloat16),
    ("adamw-bf16-sr", "AdamW", dict(lr=0.05, stochastic_rounding=True, seed=7), torch.bfloat16),
    ("adamw-bf16-sr-bf16-state", "AdamW",
     dict(lr=0.05, stochastic_rounding=True, seed=7, state_dtype=torch.bfloat16), torch.bfloat16),
    ("adamw-bf16-kahan", "AdamW", dict(lr=0.05, kahan_summation=True), torch.bfloat16),
    ("sgd-bf16-sr", "SGD", dict(lr=0.05, momentum=0.9, stochastic_rounding=True, seed=3), torch.bfloat16),
    ("adam-fp16", "Adam", dict(lr=0.05), torch.float16),
]


def _run_step_only(cls_name, kwargs, dtype, compiled, steps=3, backend=None):
    params = make_params(SHAPES, dtype)
    opt = getattr(fusedopt, cls_name)(params, **copy.deepcopy(kwargs))

    def step():
        opt.step()

    fn = torch.compile(step, backend=backend) if compiled else step
    for k in range(steps):
        set_grads(params, k)
        fn()
    return params, opt


@pytest.mark.parametrize("case", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_compiled_step_is_one_graph_and_bit_equal(case):
    _, cls_name, kwargs, dtype = case
    rec = Recorder()
    got_p, got_opt = _run_step_only(cls_name, kwargs, dtype, compiled=True, backend=rec)
    ref_p, ref_opt = _run_step_only(cls_name, kwargs, dtype, compiled=False)

    # Publishing last_grad_norm / stats() is an attribute store, done after the graph.
    publishes = bool(kwargs.get("max_grad_norm") or kwargs.get("track_stats"))
    breaks = graph_breaks()
    if publishes:
        assert breaks and all("_publish" in r for r in breaks), list(breaks)
    else:
        assert breaks == {}, f"graph breaks: {list(breaks)}"
    assert len(rec.graphs) == 1, f"{len(rec.graphs)} graphs compiled (recompiles?)"
    kernel_ops = [n for n in rec.op_names() if n == "fusedopt.step_"]
    assert len(kernel_ops) == 1, f"expected one fused step op, got {rec.op_names()}"
    for i, (a, b) in enumerate(zip(got_p, ref_p)):
        assert_bits_equal(a.detach(), b.detach(), msg=f"param {i}")
        sa, sb = got_opt.state[a], ref_opt.state[b]
        assert set(sa) == set(sb), f"param {i}: state keys {set(sa)} != {set(sb)}"
        for key in sb:
            assert_bits_equal(sa[key], sb[key], msg=f"param {i} state[{key!r}]")
    if kwargs.get("max_grad_norm"):
        assert_bits_equal(got_opt.last_grad_norm, ref_opt.last_grad_norm, msg="last_grad_norm")
    if kwargs.get("track_stats"):
        for gs, rs in zip(got_opt.stats(), ref_opt.stats()):
            for key in rs:
                assert_bits_equal(gs[key], rs[key], msg=f"stats {key}")


def test_two_groups_and_params_without_grad():
    """Per-group hyper-parameters, a param that never gets a grad, one whose grad appears late."""
    def run(compiled):
        params = make_params(SHAPES, seed=3)
        opt = fusedopt.AdamW([{"params": params[:3], "lr": T(0.02)},
                              {"params": params[3:], "lr": 0.005, "weight_decay": 0.0, "betas": (0.8, 0.9)}])
        fn = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for k in range(3):
            set_grads(params, k)
            params[1].grad = None          # never has a grad
            if k == 0:
                params[4].grad = None      # gets one from step 2 on
            fn()
        return params, opt

    got, got_opt = run(True)
    ref, ref_opt = run(False)
    assert fusedopt_breaks() == []
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_bits_equal(a.detach(), b.detach(), msg=f"param {i}")
    assert got[1] not in got_opt.state or not got_opt.state[got[1]]
    assert float(got_opt.state[got[4]]["step"]) == 2.0
    assert got_opt.state_dict()["param_groups"] == ref_opt.state_dict()["param_groups"]


# --------------------------------------------------------------------------------------------
# A whole training step: forward, backward, opt.step(), zero_grad.
# --------------------------------------------------------------------------------------------
def _train(compiled, opt_factory, n_steps=3, backend="aot_eager", lr_schedule=None):
    model = tiny_model()
    opt = opt_factory(model.parameters())

    def train_step(x, y):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    fn = torch.compile(train_step, backend=backend) if compiled else train_step
    losses = []
    for k, (x, y) in enumerate(batches(n_steps)):
        losses.append(fn(x, y).detach())
        if lr_schedule is not None:
            lr_schedule(opt, k)
    return model, opt, losses


def _assert_models_close(got, ref, got_opt, ref_opt):
    for i, (a, b) in enumerate(zip(got.parameters(), ref.parameters())):
        assert_close(a, b, msg=f"param {i}")
        for key, v in ref_opt.state[b].items():
            if key == "step":
                assert float(got_opt.state[a][key]) == float(v)
            else:
                assert_close(got_opt.state[a][key], v, msg=f"param {i} state[{key!r}]")


def test_compiled_train_step_matches_eager():
    factory = lambda ps: fusedopt.AdamW(ps, lr=0.01, weight_decay=0.1)  # noqa: E731
    got, got_opt, got_losses = _train(True, factory)
    ref, ref_opt, ref_losses = _train(False, factory)
    _assert_models_close(got, ref, got_opt, ref_opt)
    torch.testing.assert_close(torch.stack(got_losses), torch.stack(ref_losses))
    assert fusedopt_breaks() == [], fusedopt_breaks()


def test_train_step_graph_breaks_are_torchs_not_fusedopts():
    """Dynamo breaks on Tensor.backward() (unless trace_autograd_ops) and on torch's
    Optimizer.zero_grad; fusedopt's step must add none: the same number of breaks as the
    same training step without ``opt.step()``."""
    _train(True, lambda ps: fusedopt.AdamW(ps, lr=0.01))
    with_step = sum(graph_breaks().values())
    assert fusedopt_breaks() == [], fusedopt_breaks()

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    opt = fusedopt.AdamW(model.parameters(), lr=0.01)

    @torch.compile(backend="aot_eager")
    def no_step(x, y):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.zero_grad()
        return loss

    for x, y in batches(3):
        no_step(x, y)
    assert with_step == sum(graph_breaks().values()), graph_breaks()


def test_tensor_lr_changed_in_place_does_not_recompile():
    """A scheduler that writes a tensor lr in place: no recompile, and the new lr is used."""
    lrs = [0.01, 0.03, 0.002, 0.02, 0.005]

    def schedule(opt, k):
        for g in opt.param_groups:
            g["lr"].fill_(lrs[k + 1])

    def factory(ps):
        return fusedopt.AdamW(ps, lr=torch.tensor(lrs[0]), weight_decay=0.1)

    rec = Recorder()
    got, got_opt, _ = _train(True, factory, n_steps=4, backend=rec, lr_schedule=schedule)
    frames = counters["stats"]["unique_graphs"]
    graphs_after_warmup = len(rec.graphs)
    ref, ref_opt, _ = _train(False, factory, n_steps=4, lr_schedule=schedule)
    _assert_models_close(got, ref, got_opt, ref_opt)
    # The graphs of the first call (split by torch's own breaks) are all there is.
    torch._dynamo.reset()
    counters.clear()
    rec2 = Recorder()
    _train(True, factory, n_steps=1, backend=rec2)
    assert len(rec.graphs) == graphs_after_warmup == len(rec2.graphs), (len(rec.graphs), len(rec2.graphs))
    assert frames == len(rec2.graphs)


def test_wsd_scheduler_does_not_recompile():
    """fusedopt.schedules.WSD updates a tensor lr in place: the compiled step never recompiles.
    (An LRScheduler wraps ``opt.step`` in a function of torch's lr_scheduler.py, which Dynamo
    skips: that costs torch's own optimizers the same graph break.)"""
    params = make_params(SHAPES)
    opt = fusedopt.AdamW(params, lr=torch.tensor(0.01))
    sched = fusedopt.schedules.WSD(opt, warmup_steps=3, total_steps=8, cooldown_fraction=0.5)
    rec = Recorder()

    @torch.compile(backend=rec)
    def step():
        opt.step()

    seen = []
    for k in range(8):
        set_grads(params, k)
        step()
        sched.step()
        seen.append(float(opt.param_groups[0]["lr"]))
    assert len(set(seen)) >= 5, seen  # the lr really changed
    assert len(rec.graphs) == 1, f"{len(rec.graphs)} graphs: recompiled on an lr change"
    assert any("fusedopt.step_" in n for n in rec.op_names())
    assert all("lr_scheduler" in r for r in graph_breaks()), list(graph_breaks())


def test_float_lr_change_recompiles_and_stays_correct():
    """A float lr is a constant of the graph (as for torch's optimizers): changing it
    recompiles, and the result is still the eager one."""
    def run(compiled):
        params = make_params(SHAPES)
        opt = fusedopt.SGD(params, lr=0.1, momentum=0.9)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for k in range(3):
            set_grads(params, k)
            step()
            opt.param_groups[0]["lr"] = 0.1 / (k + 2)
        return params

    for a, b in zip(run(True), run(False)):
        assert_bits_equal(a.detach(), b.detach())


def test_sgd_dampening_first_step_falls_back_once():
    """SGD's momentum buffer starts as the grad; with dampening the op path cannot express
    that, so the first step runs eagerly (one graph break), then the op path takes over."""
    kwargs = dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)
    rec = Recorder()
    got = make_params(SHAPES)
    opt = fusedopt.SGD(got, **kwargs)
    step = torch.compile(opt.step, backend=rec)
    set_grads(got, 0)
    step()
    breaks = graph_breaks()
    assert breaks and all("_eager_step" in r for r in breaks), list(breaks)
    for k in range(1, 4):
        set_grads(got, k)
        step()
    assert graph_breaks() == breaks, "graph breaks after the first step"
    assert any("fusedopt.step_" in n for n in rec.op_names())
    ref, _ = _run_step_only("SGD", kwargs, torch.float32, compiled=False, steps=4)
    for a, b in zip(got, ref):
        assert_bits_equal(a.detach(), b.detach())


def test_amp_scalars_in_compiled_step():
    """GradScaler hands grad_scale / found_inf as tensors: unscale inside the op, and a set
    found_inf leaves params, state and step unchanged."""
    def run(compiled, found):
        params = make_params(SHAPES)
        opt = fusedopt.AdamW(params, lr=0.01)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        set_grads(params, 0)
        step()
        set_grads(params, 1)
        for p in params:
            p.grad.mul_(1024.0)
        opt.grad_scale = torch.tensor(1024.0)
        opt.found_inf = torch.tensor(found)
        before = [p.detach().clone() for p in params], [opt.state[p]["exp_avg"].clone() for p in params]
        step()
        del opt.grad_scale, opt.found_inf
        return params, opt, before

    got, got_opt, (p0, m0) = run(True, 1.0)
    for p, b, st, m in zip(got, p0, [got_opt.state[p] for p in got], m0):
        assert_bits_equal(p.detach(), b)
        assert_bits_equal(st["exp_avg"], m)
        assert float(st["step"]) == 1.0
    got, _, _ = run(True, 0.0)
    ref, _, _ = run(False, 0.0)
    for a, b in zip(got, ref):
        assert_bits_equal(a.detach(), b.detach())


def test_invalid_input_raises_the_eager_error():
    params = make_params(SHAPES)
    params[2] = nn.Parameter(params[2].detach().to(torch.complex64))
    opt = fusedopt.AdamW(params, lr=0.01)
    step = torch.compile(opt.step, backend="aot_eager")
    set_grads(params, 0)
    with pytest.raises(ValueError, match="complex params are not supported"):
        step()
    assert not any(opt.state[p] for p in params), "state was created by a failed step"


def test_state_dict_after_compiled_steps_loads_into_torch():
    params = make_params(SHAPES)
    opt = fusedopt.AdamW(params, lr=0.01)
    step = torch.compile(opt.step, backend="aot_eager")
    for k in range(2):
        set_grads(params, k)
        step()
    sd = copy.deepcopy(opt.state_dict())  # torch's loader would share the tensors
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.AdamW(ref_params, lr=0.01, foreach=False)
    ref.load_state_dict(sd)
    for k in (2, 3):
        set_grads(params, k)
        set_grads(ref_params, k)
        step()
        ref.step()
    for a, b in zip(params, ref_params):
        assert_close(a, b)


def test_inductor_train_step():
    """One Inductor run: the ops survive functionalization and re-inplacing, lr changes do
    not recompile, and the result matches eager within fp32 tolerance."""
    def schedule(opt, k):
        opt.param_groups[0]["lr"].mul_(0.5)

    def factory(ps):
        return fusedopt.AdamW(ps, lr=torch.tensor(0.01), weight_decay=0.1)

    got, got_opt, _ = _train(True, factory, n_steps=3, backend="inductor", lr_schedule=schedule)
    graphs = counters["stats"]["unique_graphs"]
    ref, ref_opt, _ = _train(False, factory, n_steps=3, lr_schedule=schedule)
    _assert_models_close(got, ref, got_opt, ref_opt)
    assert fusedopt_breaks() == []
    # One graph per torch graph break region, compiled once: no recompiles across 3 steps.
    assert graphs <= 1 + sum(graph_breaks().values()), (graphs, graph_breaks())


def test_load_state_dict_between_compiled_steps():
    """Replacing the state (load_state_dict) between compiled calls retraces on the new state:
    the result equals the same sequence run eagerly."""
    def run(compiled):
        params = make_params(SHAPES)
        opt = fusedopt.AdamW(params, lr=0.01, amsgrad=True)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for k in range(2):
            set_grads(params, k)
            step()
        saved = copy.deepcopy(opt.state_dict())
        for k in range(2, 4):
            set_grads(params, k)
            step()
        opt.load_state_dict(saved)  # rewind to step 2
        for k in range(4, 6):
            set_grads(params, k)
            step()
        return params, opt

    got, got_opt = run(True)
    ref, ref_opt = run(False)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_bits_equal(a.detach(), b.detach(), msg=f"param {i}")
        for key, v in ref_opt.state[b].items():
            assert_bits_equal(got_opt.state[a][key], v, msg=f"param {i} state[{key!r}]")
    assert float(got_opt.state[got[0]]["step"]) == 4.0


def test_closure_and_strided_view_params_take_the_eager_path():
    """What the op path does not handle (a closure; a param with gaps in memory) runs the
    eager step from inside the compiled function: the same bits, the closure's loss returned."""
    def run(compiled, use_closure):
        torch.manual_seed(0)
        base = torch.randn(20, 16)
        params = [nn.Parameter(base[:, ::2]), nn.Parameter(torch.randn(7))]  # params[0]: gaps in memory
        assert not params[0].is_contiguous()
        opt = fusedopt.SGD(params, lr=0.1, momentum=0.9)

        def closure():
            opt.zero_grad()
            loss = (params[0].sum(1) ** 2).sum() + params[1].pow(2).sum()
            loss.backward()
            return loss

        def step():
            if use_closure:
                return opt.step(closure)
            closure()
            return opt.step()

        fn = torch.compile(step, backend="aot_eager") if compiled else step
        return params, [fn() for _ in range(3)]

    for use_closure in (True, False):
        torch._dynamo.reset()
        got, got_losses = run(True, use_closure)
        ref, ref_losses = run(False, use_closure)
        if use_closure:
            assert all(isinstance(v, torch.Tensor) for v in got_losses)
            torch.testing.assert_close(torch.stack(got_losses), torch.stack(ref_losses), rtol=0, atol=0)
        for a, b in zip(got, ref):
            assert_bits_equal(a.detach(), b.detach())
