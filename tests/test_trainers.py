"""fusedopt inside training loops people use: the Hugging Face ``Trainer`` (a test extra:
``pip install transformers accelerate``; skipped without them) and a nanoGPT-style loop
around ``torch.compile(model)`` with the optimizer stepping outside the compiled model.

The models are built from configs in the test (nothing is downloaded).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedopt
from conftest import assert_bits_equal

# --------------------------------------------------------------------------------------------
# Hugging Face Trainer
# --------------------------------------------------------------------------------------------

HF_STEPS, HF_SAVE_AT, HF_LR = 8, 4, 1e-2


class TokenData(torch.utils.data.Dataset):
    """Learnable sequences (counting up from a seeded random start, mod the vocabulary);
    labels = inputs (the model shifts them)."""

    def __init__(self, n=48, length=16, vocab=64):
        start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _hf_run(out_dir, optimizer_cls, *, resume_from=None, **opt_kwargs):
    """Trains the tiny GPT-2 with Trainer; returns (per-step losses, trainer)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class RecordingTrainer(transformers.Trainer):
        losses: list = []

        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            self.losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    model = _tiny_gpt2()
    opt = optimizer_cls(model.parameters(), lr=HF_LR, weight_decay=0.01, **opt_kwargs)
    sched = fusedopt.schedules.WSD(opt, warmup_steps=2, total_steps=HF_STEPS, cooldown_fraction=0.5)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=HF_STEPS, logging_steps=1,
        save_strategy="steps", save_steps=HF_SAVE_AT, report_to="none", use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=TokenData(), optimizers=(opt, sched))
    trainer.losses = []
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer.losses, trainer


def test_hf_trainer_trains_saves_and_resumes(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    losses, trainer = _hf_run(tmp_path / "fused", fusedopt.AdamW)
    assert isinstance(trainer.optimizer.optimizer, fusedopt.AdamW)  # (accelerate wraps it)
    assert len(losses) == HF_STEPS and losses[-1] < losses[0], losses
    ref_losses, ref = _hf_run(tmp_path / "torch", torch.optim.AdamW, foreach=False)
    # Same model, data order, clipping and schedule: only the optimizer's op order differs, by
    # an ulp per step. Through 8 steps of training those ulps feed back into the grads, and
    # Adam's normalized update turns an ulp of a near-zero grad into a visible step: allow
    # 1% of one full update (lr) on the params, while the losses agree to 1e-5.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for (name, p), q in zip(trainer.model.named_parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=HF_LR / 100, msg=lambda m: f"{name}: {m}")
    # The checkpoint Trainer wrote (optimizer, scheduler, RNG, data position) resumes exactly.
    checkpoint = tmp_path / "fused" / f"checkpoint-{HF_SAVE_AT}"
    resumed_losses, resumed = _hf_run(tmp_path / "fused", fusedopt.AdamW, resume_from=str(checkpoint))
    assert resumed_losses == losses[HF_SAVE_AT:]
    for (name, p), q in zip(resumed.model.named_parameters(), trainer.model.parameters()):
        assert_bits_equal(p.detach(), q.detach(), msg=name)
    assert resumed.optimizer.optimizer.param_groups[0]["lr"] == trainer.optimizer.optimizer.param_groups[0]["lr"]


# --------------------------------------------------------------------------------------------
# nanoGPT-style loop with torch.compile(model)
# --------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=64, block=16, d=32, heads=2, layers=2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # weight tying, as nanoGPT

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def _nanogpt_loop(model, steps=8):
    """nanoGPT's train.py in miniature: decay/no-decay groups, betas (0.9, 0.95), grad clip
    1.0 (here inside the fused step), warmup + cooldown schedule, zero_grad(set_to_none)."""
    opt = fusedopt.AdamW(fusedopt.param_groups(model, weight_decay=0.1), lr=1e-2, betas=(0.9, 0.95),
                         max_grad_norm=1.0)
    sched = fusedopt.schedules.WSD(opt, warmup_steps=2, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 64, (4096,), generator=gen)
    losses = []
    for _ in range(steps):
        ix = torch.randint(len(data) - 17, (8,), generator=gen)
        x = torch.stack([data[i:i + 16] for i in ix])
        y = torch.stack([data[i + 1:i + 17] for i in ix])
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_nanogpt_loop_with_compiled_model():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    eager = GPT()
    compiled_model = GPT()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model)
    losses = _nanogpt_loop(compiled)
    ref = _nanogpt_loop(eager)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # one graph, no recompile
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    # Inductor fuses and reorders the model's float ops, so the runs drift apart by rounding.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-4, atol=0)
