"""A decoder-only transformer in the Turing-NLG / GPT-2 shape, in plain PyTorch.

Pre-LayerNorm blocks, learned absolute positions, tied input/output embeddings, and optionally a
copy head (``GPTConfig.copy_head``, see :class:`CopyHead`). Nothing here knows about parallelism;
tensor parallelism swaps submodules by name (``c_attn``, ``c_proj``, ``c_fc``, ``wte``,
``lm_head``, ``loss_fn``), which is why attention reads its head count from the width of what
``c_attn`` returns instead of from the config.
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

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """logits (B, T, V), targets (B, T) -> scalar, or (B*T,) with ``reduction="none"`` (0 where
        the target is ignored)."""
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=self.ignore_index, reduction=reduction)


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class CopyHead(nn.Module):
    """A pointer head: the next token is drawn from the LM head's distribution or copied from the
    context, p(w) = g * p_vocab(w) + (1 - g) * sum of a(s) over the positions s <= t holding w.

    ``a`` is one causal attention distribution (queries and keys of width ``config.copy_dim`` from
    the final hidden states; its "values" are the tokens themselves) and ``g = sigmoid(gate(h_t))``.
    Copying a rare word from the prompt then needs only the right position, not the word's identity
    carried through the residual stream to the vocabulary: what both fine-tuning tasks ask of a small
    model (an answer restates the question's subject, a summary reuses the document's words).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        d, w = config.n_embd, config.copy_dim
        self.query = nn.Linear(d, w, bias=config.bias)
        self.key = nn.Linear(d, w, bias=config.bias)
        self.gate = nn.Linear(d, 1, bias=config.bias)

    def scores(self, h: torch.Tensor, keys: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log copy weights (B, T, L), visible (T, L)): the queries at ``start_pos`` ..
        ``start_pos + T - 1`` over the ``L`` keys of positions 0 .. L - 1, later positions masked."""
        q = self.query(h)
        q = q.to(_at_least_fp32(q.dtype))                                   # (B, T, w)
        s = q @ keys.to(q.dtype).transpose(1, 2) / math.sqrt(q.size(-1))    # (B, T, L)
        T, L = s.shape[1:]
        visible = torch.ones(T, L, dtype=torch.bool, device=s.device).tril(diagonal=start_pos)
        return torch.log_softmax(s.masked_fill(~visible, float("-inf")), dim=-1), visible

    def log_gates(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log g, log (1 - g)), each (B, T)."""
        z = self.gate(h).squeeze(-1)
        z = z.to(_at_least_fp32(z.dtype))
        return F.logsigmoid(z), F.logsigmoid(-z)


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
        self.copy_head = CopyHead(config) if config.copy_head else None
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
        host sync on a GPU). With a copy head the "logits" are the log-probabilities of the mixture
        (normalised, so softmax, argmax and sampling read them as logits) and the loss is its
        cross-entropy."""
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
        if self.copy_head is not None:
            return self._copy_forward(x, idx, targets, kv_cache, start_pos, labelled_only)
        if targets is not None and labelled_only:
            keep = targets != self.loss_fn.ignore_index  # (B, T)
            x, targets = x[keep].unsqueeze(0), targets[keep].unsqueeze(0)  # (1, N, C), (1, N)
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        return self.loss_fn(logits, targets)

    def _copy_forward(self, x, idx, targets, kv_cache, start_pos: int, labelled_only: bool) -> torch.Tensor:
        head = self.copy_head
        keys, source = head.key(x), idx                                      # (B, T, w), (B, T)
        if kv_cache is not None:
            keys, source = kv_cache.update_copy(keys, idx, start_pos)        # (B, L, w), (B, L)
        log_a, visible = head.scores(x, keys, start_pos)                     # (B, T, L), (T, L)
        log_g, log_not_g = head.log_gates(x)                                 # (B, T) each
        if targets is None:
            logits = self.lm_head(x)
            if logits.size(-1) != self.config.vocab_size:
                raise NotImplementedError(
                    "a copy head's output distribution needs the whole vocabulary on one rank; run "
                    "inference at tp=1 (zerotrain's ask, summarize and eval load runs that way)")
            copied = torch.zeros_like(logits, dtype=log_a.dtype).scatter_add_(
                2, source.unsqueeze(1).expand(-1, x.size(1), -1), log_a.exp())  # (B, T, V)
            log_vocab = torch.log_softmax(logits.to(log_a.dtype), dim=-1)
            return torch.logaddexp(log_g.unsqueeze(-1) + log_vocab,
                                   log_not_g.unsqueeze(-1) + copied.log())
        ignore = self.loss_fn.ignore_index
        keep = targets != ignore                                             # (B, T)
        # log of the copy weight on the positions holding the target; rows with none get -inf
        match = (source.unsqueeze(1) == targets.unsqueeze(2)) & visible      # (B, T, L)
        hit = match.any(dim=-1)
        log_copy = torch.logsumexp(log_a.masked_fill(~match, float("-inf")).masked_fill(~hit.unsqueeze(-1), 0.0),
                                   dim=-1).masked_fill(~hit, float("-inf"))  # (B, T)
        if labelled_only:
            x, targets = x[keep].unsqueeze(0), targets[keep].unsqueeze(0)    # (1, N, C), (1, N)
            log_copy, log_g, log_not_g = log_copy[keep], log_g[keep], log_not_g[keep]
            keep = keep[keep]
        log_vocab = -self.loss_fn(self.lm_head(x), targets, reduction="none").to(log_a.dtype).reshape(keep.shape)
        log_p = torch.logaddexp(log_g + log_vocab, log_not_g + log_copy)
        return -log_p[keep].sum() / keep.sum()
