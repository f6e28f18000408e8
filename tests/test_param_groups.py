"""fusedopt.param_groups on a GPT-like model (tied embedding / lm_head, LayerNorm, biases, a
frozen param), and with fusedopt.AdamW and torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fusedopt
from conftest import assert_bits_equal


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d, bias=False))


class TinyGPT(nn.Module):
    def __init__(self, vocab=50, d=8, n_layer=2, ctx=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.adapter = nn.Linear(d, d)  # frozen below
        self.adapter.weight.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(()))  # 0-dim trainable param

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.h:
            x = x + b.proj(b.attn(b.ln_1(x))[..., : x.shape[-1]])
            x = x + b.mlp(b.ln_2(x))
        return self.lm_head(self.ln_f(self.adapter(x))) * self.scale


def names_of(model, params):
    """Names (first name of each tensor) of `params`, for readable assertions."""
    by_id = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), n)
    return [by_id[id(p)] for p in params]


MATRICES = ["h.0.attn.weight", "h.0.proj.weight", "h.0.mlp.0.weight", "h.0.mlp.2.weight",
            "h.1.attn.weight", "h.1.proj.weight", "h.1.mlp.0.weight", "h.1.mlp.2.weight"]
VECTORS = ["h.0.ln_1.weight", "h.0.ln_1.bias", "h.0.attn.bias", "h.0.proj.bias", "h.0.ln_2.weight",
           "h.0.ln_2.bias", "h.0.mlp.0.bias",
           "h.1.ln_1.weight", "h.1.ln_1.bias", "h.1.attn.bias", "h.1.proj.bias", "h.1.ln_2.weight",
           "h.1.ln_2.bias", "h.1.mlp.0.bias",
           "ln_f.weight", "ln_f.bias", "adapter.bias", "scale"]


@pytest.mark.parametrize("no_decay", [(nn.Embedding,), nn.Embedding, [nn.Embedding, nn.Dropout]],
                         ids=["tuple", "class", "list"])
def test_gpt_groups_with_embedding_in_no_decay(no_decay):
    model = TinyGPT()
    groups = fusedopt.param_groups(model, 0.1, no_decay=no_decay)
    assert isinstance(groups, list) and len(groups) == 2
    assert [set(g) for g in groups] == [{"params", "weight_decay"}] * 2
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    decay, plain = groups[0]["params"], groups[1]["params"]
    assert sorted(names_of(model, decay)) == sorted(MATRICES)
    # wte.weight is also lm_head.weight: an Embedding param, so no decay; listed once
    assert sorted(names_of(model, plain)) == sorted(VECTORS + ["wte.weight", "wpe.weight"])


def test_gpt_groups_without_no_decay_classes():
    model = TinyGPT()
    decay, plain = (g["params"] for g in fusedopt.param_groups(model, 0.05))
    assert sorted(names_of(model, decay)) == sorted(MATRICES + ["wte.weight", "wpe.weight"])
    assert sorted(names_of(model, plain)) == sorted(VECTORS)


def test_every_trainable_param_exactly_once():
    model = TinyGPT()
    groups = fusedopt.param_groups(model, 0.1, no_decay=(nn.Embedding,))
    listed = [p for g in groups for p in g["params"]]
    ids = [id(p) for p in listed]
    assert len(ids) == len(set(ids)), "a param is listed twice"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable
    assert id(model.adapter.weight) not in ids  # frozen
    assert ids.count(id(model.lm_head.weight)) == 1
    assert all(isinstance(p, nn.Parameter) for p in listed)
    # module.parameters() order within each group
    order = {id(p): i for i, p in enumerate(model.parameters())}
    for g in groups:
        pos = [order[id(p)] for p in g["params"]]
        assert pos == sorted(pos)


def test_tie_found_from_either_side():
    """The Embedding is registered after the Linear it is tied to: still no decay."""
    m = nn.Module()
    m.head = nn.Linear(4, 10, bias=False)
    m.emb = nn.Embedding(10, 4)
    m.emb.weight = m.head.weight
    decay, plain = (g["params"] for g in fusedopt.param_groups(m, 0.1, no_decay=(nn.Embedding,)))
    assert decay == [] and len(plain) == 1 and plain[0] is m.head.weight


@pytest.mark.parametrize("make_opt", [
    lambda groups: fusedopt.AdamW(groups, lr=0.1),
    lambda groups: torch.optim.AdamW(groups, lr=0.1, foreach=False),
], ids=["fusedopt.AdamW", "torch.AdamW"])
def test_works_with_adamw_and_decays_only_the_decay_group(make_opt):
    """With zero grads AdamW's update is only the decoupled decay: p *= 1 - lr * wd in the
    decay group; the no-decay group is left bit-identical."""
    model = TinyGPT()
    groups = fusedopt.param_groups(model, 0.5, no_decay=(nn.Embedding,))
    opt = make_opt(groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    for p in groups[0]["params"]:
        torch.testing.assert_close(p.detach(), before[id(p)] * (1 - 0.1 * 0.5), rtol=1.3e-6, atol=0)
        assert (p.detach() - before[id(p)]).abs().max() > 1e-3
    for p in groups[1]["params"]:
        assert_bits_equal(p.detach(), before[id(p)])
    assert_bits_equal(model.adapter.weight.detach(), before[id(model.adapter.weight)])


def test_fusedopt_and_torch_adamw_agree_on_a_training_step():
    torch.manual_seed(0)
    model = TinyGPT()
    twin = TinyGPT()
    twin.load_state_dict(model.state_dict())
    idx = torch.randint(0, 50, (2, 5))
    opts = [fusedopt.AdamW(fusedopt.param_groups(model, 0.1, (nn.Embedding,)), lr=0.05),
            torch.optim.AdamW(fusedopt.param_groups(twin, 0.1, (nn.Embedding,)), lr=0.05, foreach=False)]
    for _ in range(3):
        for m, o in zip((model, twin), opts):
            o.zero_grad()
            m(idx).square().mean().backward()
            o.step()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, msg=lambda msg: f"{n}: {msg}")
    assert (model.wte.weight - TinyGPT().wte.weight).abs().max() > 0  # trained (sanity)


def test_empty_group_is_fine_for_both_optimizers():
    m = nn.Linear(4, 4, bias=False)
    groups = fusedopt.param_groups(m, 0.1)
    assert groups[1]["params"] == []
    for opt in (fusedopt.AdamW(groups, lr=0.1), torch.optim.AdamW(groups, lr=0.1)):
        m.weight.grad = torch.ones(4, 4)
        w = m.weight.detach().clone()
        opt.step()
        assert not torch.equal(m.weight.detach(), w)


@pytest.mark.parametrize("args,err,word", [
    ((nn.Linear(2, 2).parameters(), 0.1), TypeError, "nn.Module"),
    ((nn.Linear(2, 2), -0.1), ValueError, "weight_decay"),
    ((nn.Linear(2, 2), float("nan")), ValueError, "weight_decay"),
    ((nn.Linear(2, 2), 0.1, ("Embedding",)), TypeError, "no_decay"),
])
def test_errors(args, err, word):
    with pytest.raises(err, match=word):
        fusedopt.param_groups(*args)
