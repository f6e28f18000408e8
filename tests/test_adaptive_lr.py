"""fusedopt.schedules.LossAdaptiveLR against a reference controller written here (API.md,
"Loss-adaptive learning rate").

The reference keeps its snapshot the slow, obviously right way (``copy.deepcopy`` of the
model's and the optimizer's state dicts, restored with ``load_state_dict``) and runs on a twin
of the task: same init, same optimizer, same stream of fresh samples. Since both restore bit
for bit and draw the same batches, every trial loss, the chosen factor and the params after the
search must be *identical* (``torch.equal``), not just close.
"""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import fusedopt
from fusedopt.schedules import LossAdaptiveLR

# --------------------------------------------------------------------------------------------
# The task: a small MLP with BatchNorm (float and int64 buffers) on a seeded regression stream.
# --------------------------------------------------------------------------------------------

IN, HIDDEN = 4, 8


def make_model(dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    return model.to(dtype)


OPTIMIZERS = {
    # name: (param dtype, factory(params))
    "torch-Adam": (torch.float32, lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False)),
    "fusedopt-AdamW": (torch.float32, lambda ps: fusedopt.AdamW(ps, lr=1e-2)),
    "fusedopt-AdamW-bf16-kahan": (torch.bfloat16, lambda ps: fusedopt.AdamW(ps, lr=1e-2, kahan_summation=True)),
    "fusedopt-SGD-momentum": (torch.float32, lambda ps: fusedopt.SGD(ps, lr=1e-2, momentum=0.9)),
}


class Task:
    """Model + optimizer + a seeded sample stream; ``train_step`` / ``evaluate`` draw fresh
    samples, as the paper's trials do."""

    def __init__(self, opt_name: str, seed: int = 0):
        dtype, factory = OPTIMIZERS[opt_name]
        self.dtype = dtype
        self.model = make_model(dtype, seed)
        self.opt = factory(self.model.parameters())
        self.gen = torch.Generator().manual_seed(1234 + seed)
        self.w_true = torch.randn(IN, 1, generator=self.gen)
        self.train_calls = 0
        self.eval_calls = 0

    def batch(self, n):
        x = torch.randn(n, IN, generator=self.gen)
        y = torch.sin(x @ self.w_true) + 0.05 * torch.randn(n, 1, generator=self.gen)
        return x.to(self.dtype), y.to(self.dtype)

    def train_step(self):
        self.train_calls += 1
        x, y = self.batch(16)
        self.opt.zero_grad()
        loss = (self.model(x) - y).float().pow(2).mean()
        loss.backward()
        self.opt.step()
        return loss.detach()

    def evaluate(self):
        self.eval_calls += 1
        x, y = self.batch(64)
        self.model.eval()
        with torch.no_grad():
            loss = (self.model(x) - y).float().pow(2).mean()
        self.model.train()
        return loss


class RefController:
    """The contract written out plainly: deepcopy snapshots, load_state_dict restores."""

    def __init__(self, opt, model, patience=400, factor=4.0, candidates=5, trial_steps=50):
        self.opt, self.model = opt, model
        self.patience, self.factor, self.candidates, self.trial_steps = patience, factor, candidates, trial_steps
        self.best, self.bad = math.inf, 0
        self.tried = []   # per search: the list of per-group lrs of each candidate
        self.losses = []  # per search: the trial losses

    def search(self, train_step, evaluate):
        model_sd = copy.deepcopy(self.model.state_dict())
        opt_sd = copy.deepcopy(self.opt.state_dict())
        lr0 = [g["lr"] for g in self.opt.param_groups]
        half = self.candidates // 2
        exps = list(range(-half, half + 1))
        tried, losses = [], []
        for e in exps:
            for g, lr in zip(self.opt.param_groups, lr0):
                g["lr"] = lr * self.factor ** e
            tried.append([g["lr"] for g in self.opt.param_groups])
            for _ in range(self.trial_steps):
                train_step()
            losses.append(float(evaluate()))
            self.model.load_state_dict(model_sd)
            self.opt.load_state_dict(copy.deepcopy(opt_sd))
        valid = [i for i, v in enumerate(losses) if not math.isnan(v)]
        best = min(valid, key=lambda i: (losses[i], i)) if valid else None
        f = 1.0 if best is None else self.factor ** exps[best]
        for g, lr in zip(self.opt.param_groups, lr0):
            g["lr"] = lr * f
        self.tried.append(tried)
        self.losses.append(losses)
        self.bad = 0
        return f

    def step(self, loss, train_step, evaluate):
        loss = float(loss)
        if loss < self.best:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
        if self.bad == self.patience:
            return self.search(train_step, evaluate)
        return None


def tensors_of(task: Task) -> dict:
    """Every param, optimizer state tensor and module buffer, cloned, by name."""
    out = {}
    names = {id(p): n for n, p in task.model.named_parameters()}
    for n, p in task.model.named_parameters():
        out[f"param {n}"] = p.detach().clone()
    for p, st in task.opt.state.items():
        for k, v in st.items():
            out[f"state {names[id(p)]}.{k}"] = v.clone() if isinstance(v, torch.Tensor) else v
    for n, b in task.model.named_buffers():
        out[f"buffer {n}"] = b.clone()
    return out


def assert_same(got: dict, expected: dict, when: str):
    assert got.keys() == expected.keys(), f"{when}: {sorted(got.keys() ^ expected.keys())}"
    for k, v in expected.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{when}: {k} differs"
        else:
            assert got[k] == v, f"{when}: {k} differs"


def lrs(opt):
    return [float(g["lr"]) for g in opt.param_groups]


# --------------------------------------------------------------------------------------------
# The search against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_search_matches_reference(opt_name):
    task, twin = Task(opt_name), Task(opt_name)
    for t in (task, twin):
        for _ in range(3):
            t.train_step()  # state (moments, step, kahan_comp, momentum) exists and is non-trivial
    ctl = LossAdaptiveLR(task.opt, candidates=5, trial_steps=3, module=task.model)
    ref = RefController(twin.opt, twin.model, candidates=5, trial_steps=3)
    for search in range(2):
        got = ctl.search(task.train_step, task.evaluate)
        want = ref.search(twin.train_step, twin.evaluate)
        assert got == want, f"search {search}: factor"
        h = ctl.history[-1]
        assert h["losses"] == ref.losses[-1], f"search {search}: trial losses"
        assert [[lr * s for lr in h["lrs_before"]] for s in h["scales"]] == ref.tried[-1]
        assert lrs(task.opt) == lrs(twin.opt)
        assert_same(tensors_of(task), tensors_of(twin), f"after search {search}")
        # Training continues identically from the restored state.
        assert torch.equal(task.train_step(), twin.train_step())
    assert task.train_calls == twin.train_calls and task.eval_calls == twin.eval_calls == 10
    assert ctl.num_trial_steps == 2 * 5 * 3


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_restore_is_exact_after_every_trial(opt_name):
    """Inside the callbacks: each trial starts from the exact snapshot, with its candidate lr;
    after the search everything but the lr is as before, bit for bit."""
    task = Task(opt_name)
    for _ in range(3):
        task.train_step()
    before = tensors_of(task)
    lr0 = task.opt.param_groups[0]["lr"]
    ctl = LossAdaptiveLR(task.opt, factor=2.0, candidates=3, trial_steps=4, module=task.model)
    calls = []

    def train_step():
        i = len(calls)
        if i % 4 == 0:  # first step of a trial: the state is the snapshot
            assert_same(tensors_of(task), before, f"start of trial {i // 4}")
            assert task.opt.param_groups[0]["lr"] == lr0 * 2.0 ** (i // 4 - 1)
        calls.append(i)
        return task.train_step()

    def evaluate():
        moved = tensors_of(task)
        assert not torch.equal(moved["param 0.weight"], before["param 0.weight"]), "the trial did not train"
        assert not torch.equal(moved["buffer 1.running_mean"], before["buffer 1.running_mean"])
        return task.evaluate()

    factor = ctl.search(train_step, evaluate)
    assert len(calls) == 3 * 4
    assert_same(tensors_of(task), before, "after the search")
    assert task.opt.param_groups[0]["lr"] == lr0 * factor


@pytest.mark.parametrize("opt_name", ["torch-Adam", "fusedopt-AdamW", "fusedopt-AdamW-bf16-kahan"])
def test_state_created_by_a_trial_is_removed(opt_name):
    task = Task(opt_name)
    ctl = LossAdaptiveLR(task.opt, candidates=3, trial_steps=2, module=task.model)
    assert len(task.opt.state) == 0
    ctl.search(task.train_step, task.evaluate)
    assert len(task.opt.state) == 0, "a search from no state must leave no state"
    # Partly: only the last layer has state before the search (grads are not part of the
    # snapshot: the trials left theirs, so clear them first).
    last = task.model[3].weight
    task.opt.zero_grad(set_to_none=True)
    last.grad = torch.ones_like(last)
    task.opt.step()
    assert [id(p) for p in task.opt.state] == [id(last)]
    before = tensors_of(task)
    ctl.search(task.train_step, task.evaluate)
    assert [id(p) for p in task.opt.state] == [id(last)]
    assert_same(tensors_of(task), before, "after the search")
    task.train_step()  # and the optimizer still works (fusedopt rebuilds its tables)
    assert len(task.opt.state) == len(list(task.model.parameters()))


@pytest.mark.parametrize("opt_name", ["torch-Adam", "fusedopt-AdamW"])
def test_trial_that_replaces_state_and_group_values_is_undone(opt_name):
    """A trial may replace state tensors (as load_state_dict does), add state keys, and change
    group scalars (a `k` counter, a new key): all of it is undone, the original tensor objects
    are back in place, and the optimizer keeps training them (fusedopt's cached pointer table
    must not point at the trial's tensors)."""
    task = Task(opt_name)
    task.opt.param_groups[0]["k"] = 0
    for _ in range(2):
        task.train_step()
    before = tensors_of(task)
    objects = {id(p): dict(st) for p, st in task.opt.state.items()}
    ctl = LossAdaptiveLR(task.opt, candidates=3, trial_steps=2, module=task.model)

    def train_step():
        loss = task.train_step()
        group = task.opt.param_groups[0]
        group["k"] += 1
        group["added_by_trial"] = True
        for st in task.opt.state.values():
            st["exp_avg"] = st["exp_avg"].clone()
            st["added_by_trial"] = torch.zeros(1)
        return loss

    ctl.search(train_step, task.evaluate)
    assert_same(tensors_of(task), before, "after the search")
    group = task.opt.param_groups[0]
    assert group["k"] == 0 and "added_by_trial" not in group
    for p, st in task.opt.state.items():
        assert all(st[k] is v for k, v in objects[id(p)].items()) and st.keys() == objects[id(p)].keys()
    task.train_step()
    for p, st in task.opt.state.items():
        assert not torch.equal(objects[id(p)]["exp_avg"], before[f"state {_name(task, p)}.exp_avg"]), \
            "the step after the search did not update the restored state tensors"


def _name(task, p):
    return next(n for n, q in task.model.named_parameters() if q is p)


def test_tensor_lr_is_changed_in_place():
    model = make_model()
    lr_a, lr_b = torch.tensor(0.01), torch.tensor(0.003)
    params = list(model.parameters())
    opt = fusedopt.AdamW([{"params": params[:2], "lr": lr_a}, {"params": params[2:], "lr": lr_b}])
    task = Task("fusedopt-AdamW")
    task.model, task.opt = model, opt
    ctl = LossAdaptiveLR(opt, candidates=5, trial_steps=1, module=model)
    seen = []

    def train_step():
        assert opt.param_groups[0]["lr"] is lr_a and opt.param_groups[1]["lr"] is lr_b
        seen.append((lr_a.clone(), lr_b.clone()))
        return task.train_step()

    a0, b0 = lr_a.clone(), lr_b.clone()
    factor = ctl.search(train_step, task.evaluate)
    for (a, b), e in zip(seen, range(-2, 3)):
        assert torch.equal(a, a0 * 4.0 ** e) and torch.equal(b, b0 * 4.0 ** e)  # float32 tensor arithmetic
    assert opt.param_groups[0]["lr"] is lr_a and opt.param_groups[1]["lr"] is lr_b
    assert torch.equal(lr_a, a0 * factor) and torch.equal(lr_b, b0 * factor)


def test_snapshot_buffers_reused_and_copies_batched(monkeypatch):
    task = Task("fusedopt-AdamW")
    for _ in range(2):
        task.train_step()
    ctl = LossAdaptiveLR(task.opt, candidates=3, trial_steps=1, module=task.model)
    ctl.search(task.train_step, task.evaluate)
    buffers = [b.data_ptr() for b in ctl._snapshot._buffers]
    calls = []
    real = fusedopt._multi_tensor.copy_
    monkeypatch.setattr(fusedopt._multi_tensor, "copy_", lambda dst, src: (calls.append(len(dst)), real(dst, src)))
    ctl.search(task.train_step, task.evaluate)
    assert [b.data_ptr() for b in ctl._snapshot._buffers] == buffers, "buffers were reallocated"
    # The moments are saved by the next fused step and restored by the step after a restore
    # (_step_inputs.py): copied only when the new snapshot reads the state the first search's
    # last restore left pending (the first call). The snapshot then copies the params, steps and
    # buffers (running stats, num_batches_tracked) in one call, and so does each of the 3
    # restores.
    n_params = len(list(task.model.parameters()))
    assert calls == [2 * n_params] + [2 * n_params + 3] * 4, calls
    # A new param group changes the set of tensors: the buffers are reallocated, and it works.
    extra = nn.Parameter(torch.ones(3))
    task.opt.add_param_group({"params": [extra]})
    extra.grad = torch.ones(3)
    task.opt.step()
    before = extra.detach().clone(), task.opt.state[extra]["exp_avg"].clone()
    monkeypatch.setattr(fusedopt._multi_tensor, "copy_", real)
    ctl.search(task.train_step, task.evaluate)
    assert len(ctl._snapshot._buffers) == len(buffers) + 4  # param, exp_avg, exp_avg_sq, step
    assert torch.equal(extra, before[0]) and torch.equal(task.opt.state[extra]["exp_avg"], before[1])


# --------------------------------------------------------------------------------------------
# Choosing the candidate
# --------------------------------------------------------------------------------------------


def ref_choice(losses):
    """First minimum over the non-NaN losses; None when all are NaN."""
    finite = [(v, i) for i, v in enumerate(losses) if not math.isnan(v)]
    return min(finite)[1] if finite else None


NAN = float("nan")


@pytest.mark.parametrize("losses", [
    [3.0, 1.0, 1.0, NAN, 2.0],     # tie: the first one (the smaller lr)
    [NAN, 5.0, 4.0, 4.0, 0.5],     # the largest lr
    [NAN, NAN, NAN, NAN, NAN],     # nothing usable: keep the lr
    [2.0, 2.0, 2.0, 2.0, 2.0],     # all equal: the first
    [math.inf, NAN, 7.0, math.inf, 7.0],
    [1.0, NAN, NAN, NAN, NAN],
])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_best_candidate_first_minimum_nan_never_wins(losses, as_tensor):
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.5)
    ctl = LossAdaptiveLR(opt, factor=3.0, candidates=5, trial_steps=1)
    scripted = iter(losses)
    ev = (lambda: torch.tensor(next(scripted))) if as_tensor else (lambda: next(scripted))
    factor = ctl.search(lambda: None, ev)
    i = ref_choice(losses)
    expected = 1.0 if i is None else 3.0 ** (i - 2)
    assert factor == expected
    assert opt.param_groups[0]["lr"] == 0.5 * expected


# --------------------------------------------------------------------------------------------
# The patience trigger
# --------------------------------------------------------------------------------------------


def ref_trigger_steps(losses, patience):
    best, bad, fired = math.inf, 0, []
    for i, loss in enumerate(losses, 1):
        if loss < best:
            best, bad = loss, 0
        else:
            bad += 1
        if bad == patience:
            fired.append(i)
            bad = 0
    return fired


TRIGGER_LOSSES = ([5.0, 4.0, 4.0, 4.5, 4.0, 3.0, NAN, NAN, 3.0, 2.0, 2.5, 2.5, 2.5, 2.5, 2.5, 2.5, 1.0]
                  + [1.5] * 7 + [0.5, 0.5, NAN, 0.4] + [0.9] * 9)


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("patience", [1, 3, 4])
def test_patience_trigger(as_tensor, patience):
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.5)
    ctl = LossAdaptiveLR(opt, patience=patience, candidates=1, trial_steps=2)
    calls = []
    fired = []
    # Tensor losses are float32: the reference sees the same rounded values.
    losses = [float(torch.tensor(x, dtype=torch.float32)) for x in TRIGGER_LOSSES] if as_tensor else TRIGGER_LOSSES
    for i, loss in enumerate(TRIGGER_LOSSES, 1):
        value = torch.tensor(loss, dtype=torch.float32) if as_tensor else loss
        if ctl.step(value, lambda: calls.append(1), lambda: 0.0) is not None:
            fired.append(i)
    assert fired == ref_trigger_steps(losses, patience)
    assert len(calls) == 2 * len(fired)
    assert ctl.best_loss == min(x for x in losses if not math.isnan(x))  # never reset by a search
    assert [h["step"] for h in ctl.history] == fired


def test_manual_search_restarts_the_count():
    p = nn.Parameter(torch.zeros(2))
    ctl = LossAdaptiveLR(torch.optim.SGD([p], lr=0.5), patience=3, candidates=1, trial_steps=1)
    out = [ctl.step(x, lambda: None, lambda: 0.0) for x in (1.0, 2.0, 2.0)]
    assert out == [None, None, None] and ctl.num_bad_steps == 2
    ctl.search(lambda: None, lambda: 0.0)
    assert ctl.num_bad_steps == 0
    out = [ctl.step(x, lambda: None, lambda: 0.0) for x in (2.0, 2.0, 2.0)]
    assert out == [None, None, 1.0]


# --------------------------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------------------------


def test_state_dict_round_trip_weights_only():
    losses = TRIGGER_LOSSES

    def build():
        p = nn.Parameter(torch.zeros(2))
        return LossAdaptiveLR(torch.optim.SGD([p], lr=0.5), patience=3, factor=2.0, candidates=3, trial_steps=1)

    scripted = iter([0.3, 0.1, 0.2] * 20)  # evaluate: the middle candidate (lr kept) each time
    whole = build()
    fired_whole = [i for i, x in enumerate(losses) if whole.step(x, lambda: None, lambda: next(scripted))]
    first = build()
    scripted = iter([0.3, 0.1, 0.2] * 20)
    cut = 20
    fired = [i for i, x in enumerate(losses[:cut]) if first.step(x, lambda: None, lambda: next(scripted))]
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    second = build()
    second.patience = 7  # overwritten by the load
    second.load_state_dict(loaded)
    assert second.state_dict() == first.state_dict()
    assert second.patience == 3 and second.best_loss == first.best_loss
    assert second.num_bad_steps == first.num_bad_steps and second.history == first.history
    fired += [cut + i for i, x in enumerate(losses[cut:]) if second.step(x, lambda: None, lambda: next(scripted))]
    assert fired == fired_whole
    assert second.state_dict()["history"] == whole.state_dict()["history"]


def test_load_state_dict_rejects_bad_input_and_changes_nothing():
    p = nn.Parameter(torch.zeros(2))
    ctl = LossAdaptiveLR(torch.optim.SGD([p], lr=0.5), patience=3, candidates=1, trial_steps=1)
    for x in (2.0, 1.0, 3.0):
        ctl.step(x, lambda: None, lambda: 0.0)
    good = ctl.state_dict()
    for key, value, word in [("patience", 0, "patience"), ("factor", 1.0, "factor"),
                             ("candidates", 2, "candidates"), ("num_bad_steps", -1, "num_bad_steps"),
                             ("history", 5, "history"), ("best_loss", "x", "best_loss"),
                             ("schema", "other", "schema")]:
        bad = dict(good, **{key: value})
        with pytest.raises(ValueError, match=word):
            ctl.load_state_dict(bad)
        assert ctl.state_dict() == good
    with pytest.raises(ValueError, match="trial_steps"):
        ctl.load_state_dict({k: v for k, v in good.items() if k != "trial_steps"})
    assert ctl.state_dict() == good


# --------------------------------------------------------------------------------------------
# Validation and failed calls
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, word", [
    (dict(patience=0), "patience"), (dict(patience=1.5), "patience"), (dict(patience=True), "patience"),
    (dict(factor=1.0), "factor"), (dict(factor=0.5), "factor"), (dict(factor=float("nan")), "factor"),
    (dict(factor=float("inf")), "factor"), (dict(factor="4"), "factor"),
    (dict(candidates=0), "candidates"), (dict(candidates=4), "candidates"), (dict(candidates=3.0), "candidates"),
    (dict(candidates=True), "candidates"), (dict(trial_steps=0), "trial_steps"),
    (dict(module="model"), "module"),
])
def test_constructor_validation(kwargs, word):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match=word):
        LossAdaptiveLR(opt, **kwargs)


def test_call_validation():
    with pytest.raises(ValueError, match="optimizer"):
        LossAdaptiveLR([nn.Parameter(torch.zeros(2))])
    p = nn.Parameter(torch.zeros(2))
    ctl = LossAdaptiveLR(torch.optim.SGD([p], lr=0.1), patience=1, candidates=1, trial_steps=1)
    with pytest.raises(ValueError, match="train_step"):
        ctl.search(None, lambda: 0.0)
    with pytest.raises(ValueError, match="evaluate"):
        ctl.search(lambda: None, 3)
    for loss in (torch.ones(2), "1.0", [1.0], torch.tensor(True), None):
        with pytest.raises(ValueError, match="loss"):
            ctl.step(loss, lambda: None, lambda: 0.0)
    assert ctl.num_steps == 0 and ctl.best_loss == math.inf
    with pytest.raises(ValueError, match="evaluate"):
        ctl.search(lambda: None, lambda: torch.ones(3))  # not a scalar loss
    assert ctl.history == []


@pytest.mark.parametrize("opt_name", ["torch-Adam", "fusedopt-AdamW-bf16-kahan"])
def test_failed_search_changes_nothing(opt_name):
    task = Task(opt_name)
    for _ in range(2):
        task.train_step()
    before, lr0 = tensors_of(task), lrs(task.opt)
    ctl = LossAdaptiveLR(task.opt, patience=1, candidates=3, trial_steps=2, module=task.model)
    ctl.step(0.5, task.train_step, task.evaluate)
    n = [0]

    def failing():
        n[0] += 1
        if n[0] == 4:  # inside the second trial
            raise RuntimeError("boom")
        return task.train_step()

    state_before = ctl.state_dict()
    with pytest.raises(RuntimeError, match="boom"):
        ctl.step(0.7, failing, task.evaluate)  # not a new best: patience 1 runs the search
    assert_same(tensors_of(task), before, "after the failed search")
    assert lrs(task.opt) == lr0
    assert ctl.state_dict() == state_before


# --------------------------------------------------------------------------------------------
# Does it adapt? A seeded least-squares problem
# --------------------------------------------------------------------------------------------


def least_squares_run(lr, steps=300, seed=0, adaptive=True):
    """Minibatch least squares ``min_w E|x.w - y|^2`` with Adam; evaluate on a fixed set.
    ``adaptive=False``: the same run at the constant lr (no controller)."""
    gen = torch.Generator().manual_seed(seed)
    dim = 8
    w_true = torch.randn(dim, generator=gen)
    x_eval = torch.randn(512, dim, generator=gen)
    y_eval = x_eval @ w_true
    w = nn.Parameter(torch.zeros(dim))
    opt = torch.optim.Adam([w], lr=lr, foreach=False)
    ctl = LossAdaptiveLR(opt, patience=10, candidates=5, trial_steps=20)

    def train_step():
        x = torch.randn(32, dim, generator=gen)
        loss = (x @ w - x @ w_true - 0.1 * torch.randn(32, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    def evaluate():
        with torch.no_grad():
            return (x_eval @ w - y_eval).pow(2).mean()

    if adaptive:
        ctl.search(train_step, evaluate)  # as the paper does before training
    for _ in range(steps):
        loss = train_step()
        if adaptive:
            ctl.step(loss, train_step, evaluate)
    return ctl, opt, float(evaluate())


def test_far_too_small_lr_is_raised():
    ctl, opt, loss = least_squares_run(lr=1e-6)
    assert ctl.history[0]["factor"] == 16.0  # 20 steps at 1e-6 barely move: the largest candidate
    assert opt.param_groups[0]["lr"] >= 1e-6 * 4 ** 4, ctl.history
    _, _, loss_const = least_squares_run(lr=1e-6, adaptive=False)
    assert loss < 0.1 * loss_const, (loss, loss_const)


def test_far_too_large_lr_is_lowered():
    ctl, opt, loss = least_squares_run(lr=10.0)
    assert ctl.history[0]["factor"] == 1 / 16  # Adam's steps ~ lr: at 10 it jumps around
    assert opt.param_groups[0]["lr"] <= 10.0 / 4 ** 4, ctl.history
    _, _, loss_const = least_squares_run(lr=10.0, adaptive=False)
    assert loss < 0.1 * loss_const, (loss, loss_const)


# --------------------------------------------------------------------------------------------
# The demo (python -m fusedopt.demo --experiment adaptive-lr), a few hundred steps
# --------------------------------------------------------------------------------------------


def test_demo_counts_trial_steps(tmp_path):
    import json

    from fusedopt.demo.__main__ import main

    argv = ["--experiment", "adaptive-lr", "--steps", "400", "--seeds", "1", "--patience", "20",
            "--trial-steps", "5", "--trial-eval-samples", "256", "--eval-every", "50", "--out", str(tmp_path),
            "--no-plot"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "adaptive_lr.json").read_text())
    runs = {r["name"]: r for r in doc["runs"]}
    assert set(runs) == {"adam", "adam+adaptive", "adam+wsd"}
    for r in runs.values():
        steps = r["curve"]["steps"]
        assert steps[0] == 0 and steps == sorted(steps) and steps[-1] == r["steps_taken"] >= 400
        assert all(math.isfinite(v) for v in r["curve"]["test_loss"])
    ada = runs["adam+adaptive"]
    # Trials are counted on the x axis: 5 candidates x 5 steps per search, plus the main steps.
    assert ada["trial_steps_taken"] == 25 * len(ada["searches"]) and len(ada["searches"]) >= 2
    assert ada["steps_taken"] == 400  # no search is started that would overrun the budget
    assert runs["adam"]["curve"]["lr"] == [1e-3] * len(runs["adam"]["curve"]["lr"])
    assert max(runs["adam+wsd"]["curve"]["lr"]) <= 1e-3 and runs["adam+wsd"]["curve"]["lr"][-1] < 1e-4


# --------------------------------------------------------------------------------------------
# The multi-tensor copy the snapshot uses
# --------------------------------------------------------------------------------------------


def test_multi_tensor_copy_is_bit_exact_on_odd_sizes_offsets_and_layouts():
    """The CPU kernel's copy (streaming stores with an unaligned head and tail) against
    torch's copy_: every byte, for sizes around the 64-byte line and the 2 MiB chunk, views
    starting at odd offsets, channels_last, bf16/int64/float64 and NaN payloads."""
    gen = torch.Generator().manual_seed(0)
    srcs, dsts = [], []
    for n in (0, 1, 15, 16, 17, 63, 64, 65, 1000, (1 << 19) + 3, (1 << 21) + 5):
        base = torch.randn(n + 3, generator=gen)
        srcs.append(base[3:])  # starts 12 bytes into its storage
        dsts.append(torch.empty(n + 1)[1:])
    srcs.append(torch.randn(8, 3, 5, 7, generator=gen).to(memory_format=torch.channels_last))
    dsts.append(torch.empty(8, 3, 5, 7).to(memory_format=torch.channels_last))
    srcs.append(torch.randn(1001, generator=gen).bfloat16())
    dsts.append(torch.empty(1001, dtype=torch.bfloat16))
    srcs.append(torch.arange(777, dtype=torch.int64))
    dsts.append(torch.empty(777, dtype=torch.int64))
    nan = torch.tensor([float("nan")] * 9, dtype=torch.float64)
    nan.view(torch.int64)[::2] |= 0x5
    srcs.append(nan)
    dsts.append(torch.empty(9, dtype=torch.float64))
    fusedopt._multi_tensor.copy_(dsts, srcs)
    for d, s in zip(dsts, srcs):
        assert d.stride() == s.stride()
        assert torch.equal(d.contiguous().view(torch.uint8), s.contiguous().view(torch.uint8))


def test_multi_tensor_copy_refuses_mismatched_pairs():
    with pytest.raises(ValueError, match="same shape, dtype, device and layout"):
        fusedopt._multi_tensor.copy_([torch.empty(3)], [torch.empty(4)])
    with pytest.raises(ValueError, match="dsts has 1 tensors, srcs has 2"):
        fusedopt._multi_tensor.copy_([torch.empty(3)], [torch.empty(3), torch.empty(3)])
