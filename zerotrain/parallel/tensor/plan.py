"""Convert a zerotrain GPT into its tensor-parallel form, in place, by swapping layers by name.

================  ==========================================================================
module            becomes
================  ==========================================================================
``wte``           :class:`VocabParallelEmbedding` (vocabulary rows split, padded to tp)
``attn.c_attn``   :class:`ColumnParallelLinear` split by heads (``chunks=3``: rank r holds the
                  q, k and v rows of heads ``[r·h/tp, (r+1)·h/tp)``, laid out [q_r | k_r | v_r])
``attn.c_proj``   :class:`RowParallelLinear`
``mlp.c_fc``      :class:`ColumnParallelLinear`
``mlp.c_proj``    :class:`RowParallelLinear`
``lm_head``       :class:`ColumnParallelLinear` over the vocabulary, sharing ``wte``'s weight
``loss_fn``       :class:`VocabParallelCrossEntropy`
================  ==========================================================================

Norms, ``wpe`` and row-parallel biases stay replicated. The layers do their own f/g mappings, so
the model code is unchanged: per block, forward all-reduces twice (after each row-parallel layer)
and backward twice (before each column-parallel layer).

Weights are *sliced* from the dense model, never re-drawn: build the dense model identically on
every tp rank (same seed), then call :func:`apply_tensor_parallel`, and the tp model computes the
same function as the dense one. Dropout in replicated regions needs the same RNG state on every tp
rank. With ``targets=None`` the model returns this rank's vocabulary shard of the logits (padding
columns included); :func:`gather_logits` assembles the full logits for generation.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from zerotrain.distributed import comm

from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from .loss import VocabParallelCrossEntropy
from .mappings import gather_last_dim

__all__ = ["apply_tensor_parallel", "gather_logits"]

log = logging.getLogger("zerotrain")


def _check(model: nn.Module, tp: int) -> None:
    """Raise before touching anything (identically on every rank: no collective involved)."""
    if isinstance(model.wte, VocabParallelEmbedding):
        raise ValueError("apply_tensor_parallel: the model is already tensor-parallel; "
                         "apply it once, to the dense model")
    n_head = model.config.n_head
    if n_head % tp:
        choices = [d for d in range(1, n_head + 1) if n_head % d == 0]
        raise ValueError(f"apply_tensor_parallel: n_head={n_head} is not divisible by tp={tp}; "
                         f"attention is split by whole heads, choose tp in {choices}")


def _parallel_block(block: nn.Module, group) -> None:
    attn, mlp = block.attn, block.mlp
    attn.c_attn = ColumnParallelLinear.from_dense(attn.c_attn, group=group, chunks=3)
    attn.c_proj = RowParallelLinear.from_dense(attn.c_proj, group=group)
    mlp.c_fc = ColumnParallelLinear.from_dense(mlp.c_fc, group=group)
    mlp.c_proj = RowParallelLinear.from_dense(mlp.c_proj, group=group)


def apply_tensor_parallel(model: nn.Module, group) -> nn.Module:
    """Split ``model`` (a dense zerotrain GPT) over the tp ``group`` in place; returns it.

    ``group=None`` (tp=1) still swaps the layers, which then behave exactly like the dense ones.
    """
    tp = comm.group_size(group)
    _check(model, tp)
    tied = model.lm_head.weight is model.wte.weight
    ignore_index = getattr(model.loss_fn, "ignore_index", -100)
    with torch.no_grad():
        for block in model.blocks:
            _parallel_block(block, group)
        model.wte = VocabParallelEmbedding.from_dense(model.wte, group=group)
        model.lm_head = ColumnParallelLinear.from_dense(model.lm_head, group=group)
    if tied:
        model.lm_head.weight = model.wte.weight      # one Parameter, two uses, as in the dense model
    model.loss_fn = VocabParallelCrossEntropy(model.config.vocab_size, group=group,
                                              ignore_index=ignore_index)
    log.info("tensor parallel: tp=%d rank=%d, vocabulary rows [%d, %d) of %d (padded to %d)", tp,
             comm.group_rank(group), model.wte.vocab_start, model.wte.vocab_end,
             model.config.vocab_size, model.wte.padded_num_embeddings)
    return model


def gather_logits(logits_shard: torch.Tensor, group, *, vocab_size: int | None = None) -> torch.Tensor:
    """Full logits ``(..., vocab_size)`` from every rank's vocabulary shard (no autograd).

    Pass ``vocab_size`` when the vocabulary does not divide by tp: the padding columns (zeros) are
    cut off, so that argmax or sampling can never pick a padding id.
    """
    full = gather_last_dim(logits_shard.detach(), group)
    return full if vocab_size is None else full[..., :vocab_size]
