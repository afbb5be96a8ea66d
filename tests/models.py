"""Small models for the parity tests: a GPT-like stack with tied embeddings, and a model with
uneven parameter sizes (shards of different fill, ranks owning padding only, a parameter that
skips the forward)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.Linear(d, 3 * d, bias=False)  # a key bias has an exactly-zero gradient: Adam would amplify noise
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.ln(x)
        q, k, v = self.attn(h).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), is_causal=True)
        x = x + self.proj(a.squeeze(1))
        return x + self.out(F.gelu(self.fc(h)))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 23, d: int = 8, n_layer: int = 2, ctx: int = 8):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.recompute = False      # activation checkpointing per block (non-reentrant)

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=False) if self.recompute else b(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class Odd(nn.Module):
    def __init__(self, n_in: int, n_out: int, extra: int):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out, bias=False)
        self.unused = nn.Parameter(torch.randn(extra))      # never used in forward

    def forward(self, x):
        return torch.tanh(self.lin(x))


class UnevenModel(nn.Module):
    """Units of 3, 7 and 5 (+ unused) elements: at N=4 some ranks own only padding."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 1)                           # root: 4 elements
        self.layers = nn.ModuleList([Odd(1, 3, 1), Odd(3, 1, 2), Odd(1, 1, 1)])
        self.head = nn.Linear(1, 2)

    def forward(self, x, y=None):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        out = self.head(h)
        return out if y is None else ((out - y) ** 2).mean()


def make_batch(kind: str, n: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if kind == "gpt":
        x = torch.randint(0, 23, (n, 8), generator=g)
        return x, torch.roll(x, -1, dims=1)
    return torch.randn(n, 3, generator=g, dtype=dtype), torch.randn(n, 2, generator=g, dtype=dtype)


def make_model(kind: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    m = TinyGPT() if kind == "gpt" else UnevenModel()
    return m.to(dtype)
