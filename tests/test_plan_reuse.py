"""The cached pointer table (_plan.py) is reused only while it is valid: after each way a
training script can change what a step must touch (a param's storage, its grad, the state, the
groups), the next steps equal torch.optim.AdamW(foreach=False) given the same change. A
table reused past such a change updates the old tensors, or skips the new ones, and fails.

Each case takes two cached steps first (the table is built, then reused), makes its change on
both sides alike, and takes three more steps."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fusedopt

from conftest import assert_close

SHAPES = [(8, 5), (7,), (3, 4), (64, 33)]
HYPER = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)


def _tensor(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _grad(step: int, i: int, shape) -> torch.Tensor:
    return _tensor(1000 * step + i, shape)


def _set_grads(params, step: int, skip=()):
    for i, p in enumerate(params):
        if i not in skip:
            p.grad = _grad(step, i, p.shape)


# ---- the changes: each is applied to (params, optimizer) of both sides -------------------
def param_data_replaced(params, opt):
    params[0].data = params[0].data + 0.5  # new storage: the old address is stale


def param_storage_freed_and_reallocated(params, opt):
    # What FSDP does between steps: the storage is resized to nothing and back.
    saved = params[3].detach().clone()
    storage = params[3].untyped_storage()
    nbytes = storage.nbytes()
    storage.resize_(0)
    storage.resize_(nbytes)
    with torch.no_grad():
        params[3].copy_(saved)


def grad_reused_in_place(params, opt):
    # The grads stay the same objects from now on (zero_grad(set_to_none=False) + backward).
    for p in params:
        p.grad = p.grad.clone()
    params[:] = [_Fixed(p) for p in params]


def grad_data_made_non_contiguous(params, opt):
    g = params[3].grad
    params[3].grad.data = g.t().contiguous().t()  # same shape and values, other strides


def grad_removed(params, opt):
    params[1].grad = None  # (the steps below keep it None: see _run)


def state_tensor_replaced(params, opt):
    state = opt.state[params[3]]
    state["exp_avg"] = state["exp_avg"] * 0.5


def state_loaded(params, opt):
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def param_group_added(params, opt):
    extra = nn.Parameter(_tensor(7, (6, 2)))
    opt.add_param_group({"params": [extra], "lr": 0.02})
    params.append(extra)


def param_appended_to_a_group(params, opt):
    extra = nn.Parameter(_tensor(8, (5,)))
    opt.param_groups[0]["params"].append(extra)
    params.append(extra)


def param_replaced_in_a_group(params, opt):
    # The same list object, the same length: only an item changed.
    fresh = nn.Parameter(_tensor(9, params[2].shape))
    opt.param_groups[0]["params"][2] = fresh
    params[2] = fresh


def group_params_list_replaced(params, opt):
    opt.param_groups[0]["params"] = list(reversed(opt.param_groups[0]["params"]))


def param_moved_to_shared_memory(params, opt):
    params[2].share_memory_()  # the same object and layout, a new storage (no version bump)


def param_swapped(params, opt):
    # The param object takes another tensor's whole TensorImpl (torch.utils.swap_tensors, what
    # nn.Module._apply does under torch.__future__.set_swap_module_params_on_conversion).
    torch.utils.swap_tensors(params[1], nn.Parameter(params[1].detach().clone()))


def grad_kept_but_storage_replaced(params, opt):
    # The same grad object each step; between steps its storage is moved without any
    # version bump (share_memory_), then refilled in place.
    for p in params:
        p.grad = p.grad.clone()
    params[:] = [_Fixed(p) for p in params]
    params[3].p.grad.share_memory_()


def grad_kept_but_data_reassigned(params, opt):
    # `.data =` on the same grad object: a new storage, no version bump.
    for p in params:
        p.grad = p.grad.clone()
    params[:] = [_Fixed(p) for p in params]
    params[0].p.grad.data = params[0].p.grad.data.clone()


def group_lr_changed(params, opt):
    opt.param_groups[0]["lr"] = 0.05  # a scalar: read every step, never cached


class _Fixed:
    """Marks a param whose grad is refilled in place (the same grad object every step)."""

    def __init__(self, p):
        self.p = p


CHANGES = [param_data_replaced, param_storage_freed_and_reallocated, grad_reused_in_place,
           grad_data_made_non_contiguous, grad_removed, state_tensor_replaced, state_loaded, param_group_added,
           param_appended_to_a_group, param_replaced_in_a_group, group_params_list_replaced, group_lr_changed,
           param_moved_to_shared_memory, param_swapped, grad_kept_but_storage_replaced,
           grad_kept_but_data_reassigned]


def _run(make_opt, change) -> list[torch.Tensor]:
    params = [nn.Parameter(_tensor(i, s)) for i, s in enumerate(SHAPES)]
    opt = make_opt(params)
    for step in range(2):
        _set_grads(params, step)
        opt.step()
    _set_grads(params, 2)
    change(params, opt)
    skip = (1,) if change is grad_removed else ()
    for step in range(3, 6):
        if params and isinstance(params[0], _Fixed):
            for i, f in enumerate(params):
                f.p.grad.copy_(_grad(step, i, f.p.shape))
        elif step > 3 or change is not grad_data_made_non_contiguous:
            _set_grads(params, step, skip)
        opt.step()
    return [(f.p if isinstance(f, _Fixed) else f).detach() for f in params]


@pytest.mark.parametrize("change", CHANGES, ids=[c.__name__ for c in CHANGES])
def test_a_cached_table_is_not_reused_past_a_change(change):
    got = _run(lambda ps: fusedopt.AdamW(ps, **HYPER), change)
    expected = _run(lambda ps: torch.optim.AdamW(ps, foreach=False, **HYPER), change)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, msg=f"param {i} after {change.__name__}")


# ---- changes the kernels must never see: the same grad object whose data became something
# else between steps, with no version bump. A reused table would read it as the grad it was.
def _reshaped_in_place(g):
    g.data = g.data[: g.shape[0] // 2]  # same address, half the rows


def _reinterpreted(g):
    g.data = g.data.view(torch.int32)  # same address, bytes and layout; another dtype


def _transposed_view(g):
    g.data = g.data.t()  # same address and size, not contiguous


def _shrunk(g):
    g.resize_(g.numel() // 2)


@pytest.mark.parametrize("change", [_reshaped_in_place, _reinterpreted, _transposed_view, _shrunk],
                         ids=lambda c: c.__name__.strip("_"))
def test_a_grad_changed_behind_the_table_is_refused(change):
    params = [nn.Parameter(_tensor(i, s)) for i, s in enumerate(SHAPES)]
    opt = fusedopt.AdamW(params, **HYPER)
    for step in range(2):
        _set_grads(params, step)
        opt.step()
    before = [p.detach().clone() for p in params]
    change(params[3].grad)  # (64, 33): a 2-d grad, so the transposed view keeps its size
    with pytest.raises(ValueError, match="grad"):
        opt.step()
    for p, b in zip(params, before):  # refused before any param moved
        assert torch.equal(p.detach(), b)


def test_step_hooks_and_profiler_label_as_torch():
    """fusedopt's step keeps torch's step wrapper: torch's hook order and argument rewriting,
    and torch's profiler label."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    p = nn.Parameter(_tensor(0, (8,)))
    p.grad = _tensor(1, (8,))
    opt = fusedopt.AdamW([p], **HYPER)
    calls = []

    def pre(o, args, kwargs):
        calls.append(("pre", args[1:], dict(kwargs)))
        return args, {"closure": lambda: calls.append("closure") or 1.0}

    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
               opt.register_step_pre_hook(pre),
               opt.register_step_post_hook(lambda o, a, k: calls.append(("post", dict(k)["closure"] is not None)))]
    try:
        assert opt.step() == 1.0  # the pre hook's closure ran
    finally:
        for h in handles:
            h.remove()
    assert calls == ["global pre", ("pre", (), {}), "closure", ("post", True), "global post"]
    bad = opt.register_step_pre_hook(lambda o, a, k: "not a tuple")
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        opt.step()
    bad.remove()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert "Optimizer.step#AdamW.step" in [e.name for e in prof.events()]
    assert type(opt).step.hooked
