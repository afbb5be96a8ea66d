"""Autoregressive generation: a key/value cache and batched sampling (greedy, top-k, top-p)."""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("zerotrain")


class KVCache:
    """Per-layer key/value tensors of shape (batch, heads, max_len, head_dim).

    Each layer's buffers are allocated in full (batch x max_len) on its first :meth:`update`,
    with the heads, dtype and device of the keys it receives, so a tensor-parallel attention
    that holds only some heads gets a cache of its own width. A model with a copy head also keeps
    its keys and the tokens they point at (:meth:`update_copy`).
    """

    def __init__(self, n_layer: int, batch_size: int, max_len: int):
        self.n_layer = n_layer
        self.batch_size = batch_size
        self.max_len = max_len
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.lengths = [0] * n_layer
        self.copy_keys: torch.Tensor | None = None   # (batch, max_len, copy_dim)
        self.tokens: torch.Tensor | None = None      # (batch, max_len)

    @classmethod
    def for_model(cls, model, batch_size: int) -> "KVCache":
        cfg = model.config
        return cls(cfg.n_layer, batch_size, cfg.block_size)

    @property
    def length(self) -> int:
        """Number of positions every layer holds."""
        return min(self.lengths)

    def reset(self) -> None:
        self.lengths = [0] * self.n_layer

    def reorder(self, rows: torch.Tensor) -> None:
        """Row ``i`` of the cache becomes what row ``rows[i]`` held (beam search keeps the rows of
        the hypotheses it extends)."""
        for layer in range(self.n_layer):
            if self.k[layer] is not None:
                self.k[layer] = self.k[layer].index_select(0, rows)
                self.v[layer] = self.v[layer].index_select(0, rows)
        if self.copy_keys is not None:
            self.copy_keys = self.copy_keys.index_select(0, rows)
            self.tokens = self.tokens.index_select(0, rows)

    def update_copy(self, keys: torch.Tensor, tokens: torch.Tensor, start_pos: int):
        """Write a copy head's keys (B, T, w) and the tokens (B, T) at ``start_pos``; return both
        for positions 0 .. start_pos + T - 1. Called after every layer's :meth:`update`."""
        B, T, w = keys.shape
        if start_pos + T != self.length:
            raise ValueError(f"KVCache holds {self.length} positions; copy keys for {start_pos} .. "
                             f"{start_pos + T - 1} must come after the layers' update")
        if self.copy_keys is None:
            self.copy_keys = torch.empty(B, self.max_len, w, dtype=keys.dtype, device=keys.device)
            self.tokens = torch.empty(B, self.max_len, dtype=tokens.dtype, device=tokens.device)
        self.copy_keys[:, start_pos:start_pos + T] = keys
        self.tokens[:, start_pos:start_pos + T] = tokens
        return self.copy_keys[:, :start_pos + T], self.tokens[:, :start_pos + T]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int):
        """Write k, v (B, H, T, hd) at ``start_pos``; return the cached (B, H, start_pos+T, hd)."""
        B, H, T, hd = k.shape
        end = start_pos + T
        if B != self.batch_size:
            raise ValueError(f"KVCache was built for batch_size={self.batch_size}, got {B}")
        if start_pos > self.lengths[layer]:
            raise ValueError(
                f"KVCache layer {layer} holds {self.lengths[layer]} positions; writing at "
                f"start_pos={start_pos} would leave a gap")
        if end > self.max_len:
            raise ValueError(f"KVCache max_len={self.max_len} exceeded: start_pos {start_pos} "
                             f"+ {T} new positions = {end}")
        if self.k[layer] is None:
            shape = (B, H, self.max_len, hd)
            self.k[layer] = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.empty(shape, dtype=v.dtype, device=v.device)
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        self.lengths[layer] = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def _check_sampling(temperature, top_k, top_p) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _filter_logits(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) sets to -inf. logits (B, V)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first is kept)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _next_token(logits: torch.Tensor, *, temperature, top_k, top_p, greedy, generator):
    """Pick one token per row from the last-position logits (B, V) -> (B,)."""
    if greedy or temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = _filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             eos_id: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend each row of ``idx`` (B, T0) by up to ``max_new_tokens`` tokens -> (B, T0 + new).

    A row that emits ``eos_id`` is padded with ``eos_id`` afterwards; generation stops once every
    row has. The total length never exceeds the model's block_size.
    """
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must have shape (batch, prompt_len >= 1), got {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_sampling(temperature, top_k, top_p)
    block_size = model.config.block_size
    prompt_len = idx.size(1)
    if prompt_len > block_size:
        raise ValueError(
            f"prompt length {prompt_len} exceeds the model context (block_size {block_size}); "
            f"keep at most the last {block_size} tokens of the prompt")
    n_new = min(max_new_tokens, block_size - prompt_len)
    if n_new < max_new_tokens:
        logger.debug("generate: %d new tokens requested, %d fit in block_size %d",
                     max_new_tokens, n_new, block_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _decode(model, idx, n_new, eos_id=eos_id, use_cache=use_cache,
                           sample=dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                       greedy=greedy, generator=generator))
    finally:
        model.train(was_training)


def _decode(model, idx, n_new, *, eos_id, use_cache, sample) -> torch.Tensor:
    out = idx
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    cache = KVCache.for_model(model, idx.size(0)) if use_cache else None
    for _ in range(n_new):
        if cache is not None:
            start = cache.length
            logits = model(out[:, start:], kv_cache=cache, start_pos=start)  # (B, T', V)
        else:
            logits = model(out)  # (B, T, V)
        token = _next_token(logits[:, -1, :], **sample)  # (B,)
        if eos_id is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)
            done = done | (token == eos_id)
        out = torch.cat([out, token.unsqueeze(1).to(out.dtype)], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    return out
