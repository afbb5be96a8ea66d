"""A decoder-only transformer in the Turing-NLG / GPT-2 shape, in plain PyTorch.

Pre-LayerNorm blocks, learned absolute positions, tied input/output embeddings. Nothing here knows
about parallelism; tensor parallelism swaps submodules by name (``c_attn``, ``c_proj``, ``c_fc``,
``wte``, ``lm_head``, ``loss_fn``), which is why attention reads its head count from the width of
what ``c_attn`` returns instead of from the config.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from zerotrain.model.config import GPTConfig, get_config


class LanguageModelLoss(nn.Module):
    """Mean token cross-entropy, ``ignore_index=-100``; low-precision logits are upcast to fp32."""

    ignore_index = -100

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        # logits (B, T, V), targets (B, T) -> scalar
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=self.ignore_index)


def _attention_mask(q_len: int, kv_len: int, device) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for queries that are the last ``q_len`` of ``kv_len`` positions."""
    if q_len == kv_len:
        return None, True
    if q_len == 1:
        return None, False  # the newest token sees every cached position
    offset = kv_len - q_len
    # query i sits at absolute position offset + i and may see keys 0 .. offset + i
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=offset)
    return mask, False


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        d = config.n_embd
        self.head_dim = config.head_dim
        self.layer_idx = layer_idx
        self.dropout = config.dropout
        self.c_attn = nn.Linear(d, 3 * d, bias=config.bias)  # [q | k | v]
        self.c_proj = nn.Linear(d, d, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache=None, start_pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.c_attn(x)  # (B, T, 3 * H * hd), H = heads held by this module
        if qkv.size(-1) % (3 * self.head_dim) != 0:
            raise ValueError(
                f"c_attn of layer {self.layer_idx} returns {qkv.size(-1)} features, not a "
                f"multiple of 3 * head_dim = {3 * self.head_dim}; split c_attn by whole heads")
        n_local_heads = qkv.size(-1) // (3 * self.head_dim)
        local_width = n_local_heads * self.head_dim
        q, k, v = qkv.split(local_width, dim=2)  # each (B, T, H * hd)
        q = q.view(B, T, n_local_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, n_local_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        v = v.view(B, T, n_local_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, start_pos)  # (B, H, start_pos + T, hd)
        mask, causal = _attention_mask(T, k.size(2), x.device)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, local_width)  # (B, T, H * hd)
        return self.resid_drop(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        d = config.n_embd
        self.c_fc = nn.Linear(d, 4 * d, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * d, d, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache=None, start_pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, start_pos)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    """Token + position embedding, ``n_layer`` pre-LN blocks, final LayerNorm, tied LM head.

    Construction draws one init seed from the global CPU generator, then :meth:`init_weights`
    fills every parameter from a generator seeded by (that seed, parameter name). So
    ``torch.manual_seed(s); GPT(cfg)`` and ``torch.manual_seed(s)`` + meta construction +
    ``to_empty`` + ``init_weights()`` give the same weights, and any subset of parameters can be
    materialised on its own.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        # explicit device: stays on CPU even inside `with torch.device("meta")`
        self._init_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one Parameter, two uses
        self.loss_fn = LanguageModelLoss()
        self.init_weights()

    @classmethod
    def from_preset(cls, name: str, device=None, **overrides) -> "GPT":
        config = get_config(name, **overrides)
        if device is None:
            return cls(config)
        with torch.device(device):
            return cls(config)

    def _apply(self, fn, recurse=True):
        # to_empty() from meta makes a new Parameter per use of a shared one; keep the tie
        tied = self.lm_head.weight is self.wte.weight
        result = super()._apply(fn, recurse)
        if tied and self.lm_head.weight is not self.wte.weight:
            self.lm_head.weight = self.wte.weight
        return result

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise all parameters; meta parameters are skipped.

        Linear/Embedding weights ~ N(0, init_std), residual projections (``c_proj``) scaled by
        1/sqrt(2 * n_layer); biases zero; LayerNorm weight one, bias zero.
        """
        base_seed = self._init_seed if seed is None else int(seed)
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if param.is_meta:
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = self.get_submodule(owner_name)
            if isinstance(owner, nn.LayerNorm):
                param.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                param.zero_()
            else:
                gen = torch.Generator(device=param.device)
                gen.manual_seed((base_seed + 1_000_003 * zlib.crc32(name.encode())) % 2**63)
                param.normal_(0.0, resid_std if owner_name.endswith("c_proj") else std,
                              generator=gen)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights once; optionally without token/position embeddings."""
        total = sum(p.numel() for p in self.parameters())  # parameters() deduplicates
        if exclude_embeddings:
            total -= self.wte.weight.numel() + self.wpe.weight.numel()
        return total

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache=None, start_pos: int = 0, labelled_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V), or with ``targets`` the mean cross-entropy over targets that are not
        ``-100``. ``labelled_only=True`` runs the LM head on those positions alone (same loss, less
        work when most positions are ignored, as in answer-only fine-tuning; the selection costs a
        host sync on a GPU)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, seq_len), got {tuple(idx.shape)}")
        B, T = idx.shape
        if start_pos < 0 or T + start_pos > self.config.block_size:
            raise ValueError(
                f"sequence length {T} at start_pos {start_pos} needs {T + start_pos} positions, "
                f"but block_size is {self.config.block_size}; truncate the input to at most "
                f"{self.config.block_size - max(start_pos, 0)} tokens")
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x, kv_cache, start_pos)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        if targets is not None and labelled_only:
            keep = targets != self.loss_fn.ignore_index  # (B, T)
            x, targets = x[keep].unsqueeze(0), targets[keep].unsqueeze(0)  # (1, N, C), (1, N)
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        return self.loss_fn(logits, targets)
