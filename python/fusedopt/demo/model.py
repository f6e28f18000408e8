"""A small GPT-style character model in plain torch: token + position embeddings, pre-LN
blocks (causal self-attention through ``scaled_dot_product_attention``, GELU MLP), a final
LayerNorm and an lm head tied to the token embedding. No dropout, so a run is a pure function
of the init, the data order and the optimizer."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 128
    ctx: int = 64
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    mlp_ratio: int = 4
    batch_size: int = 16   # training sequences per step (not part of the model, but sized with it)

    def as_dict(self) -> dict:
        return asdict(self)


# Width/depth presets. ``tiny`` is for tests (a step takes milliseconds); the default ``small``
# (160k params) runs ten runs of 300 steps in 1.5-3 minutes on one core of a busy machine; ``medium`` (826k
# params) takes about 0.13 s a step there, some 20 minutes for ten runs of 1000 steps.
SIZES = {
    "tiny": GPTConfig(ctx=32, d_model=32, n_layer=1, n_head=2, batch_size=8),
    "small": GPTConfig(ctx=64, d_model=64, n_layer=3, n_head=4, batch_size=16),
    "medium": GPTConfig(ctx=128, d_model=128, n_layer=4, n_head=4, batch_size=16),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model={cfg.d_model} is not a multiple of n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.ctx, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer), zero biases.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, time, vocab), in the params' dtype."""
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.t()  # tied lm head

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-character cross-entropy, computed in fp32 from the logits."""
        logits = self(idx)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build(cfg: GPTConfig, seed: int) -> dict[str, torch.Tensor]:
    """The fp32 initial weights for ``seed``; every run starts from (a cast of) these."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(cfg)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def instantiate(cfg: GPTConfig, init: dict[str, torch.Tensor], dtype: torch.dtype) -> GPT:
    model = GPT(cfg)  # its own random init is overwritten right away
    model.load_state_dict(init)
    return model.to(dtype)
