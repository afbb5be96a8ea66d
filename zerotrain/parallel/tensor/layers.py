"""Tensor-parallel layers: column- and row-parallel linear, vocabulary-parallel embedding.

Each layer does its own region mapping, so a model swaps layers without changing its code:
``ColumnParallelLinear`` applies ``copy_to_tp`` ("f") to its input, ``RowParallelLinear`` applies
``reduce_from_tp`` ("g") to its output, ``VocabParallelEmbedding`` all-reduces its masked lookup.

Every split parameter carries where it came from, so clipping, checkpoints and tests can relate a
shard to the full tensor without collectives:

* ``_zt_tp_dim``  split dimension in the full tensor (0 or 1),
* ``_zt_tp_size`` / ``_zt_tp_rank``  the tp degree and this rank,
* ``_zt_tp_full``  length of that dimension in the full (unpadded) tensor,
* ``_zt_tp_chunks``  number of equal blocks split separately (3 for a fused [q|k|v]; else 1).

Replicated parameters (row-parallel bias, norms, position embeddings) carry none of them.

Uneven sizes: a column-parallel output dimension (and the vocabulary) that does not divide by tp
is *padded* to the next multiple of tp with zero rows; padded outputs are cut off by
``gather_output`` and are never the target of a lookup or of the vocabulary-parallel loss, which
leaves them out of its softmax. Row-parallel inputs and fused blocks must divide exactly.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from zerotrain.distributed import comm

from .mappings import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_range",
           "shard_tensor", "unshard_tensors", "shard_like"]


def _per_rank(n: int, tp: int) -> int:
    return -(-n // tp)


def vocab_range(vocab_size: int, group) -> tuple[int, int, int]:
    """``(start, end, rows_per_rank)``: the real vocabulary ids ``[start, end)`` this rank owns."""
    tp, rank = comm.group_size(group), comm.group_rank(group)
    rows = _per_rank(vocab_size, tp)
    start = min(rank * rows, vocab_size)
    return start, min(start + rows, vocab_size), rows


def shard_tensor(full: torch.Tensor, *, dim: int, size: int, rank: int, chunks: int = 1) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full`` along ``dim`` (zero-padded to a multiple of ``size``).

    With ``chunks > 1`` the dimension is ``chunks`` equal blocks, each split across ranks, and the
    shard is the concatenation of this rank's piece of every block ([q_r | k_r | v_r]).
    """
    n = full.shape[dim]
    if chunks > 1:
        if n % (chunks * size):
            raise ValueError(f"shard_tensor: dimension {n} is not {chunks} blocks divisible by tp={size}")
        blocks = full.chunk(chunks, dim=dim)
        return torch.cat([shard_tensor(b, dim=dim, size=size, rank=rank) for b in blocks], dim=dim)
    rows = _per_rank(n, size)
    if rows * size != n:
        pad = [0, 0] * (full.dim() - 1 - dim % full.dim()) + [0, rows * size - n]
        full = F.pad(full, pad)
    return full.narrow(dim, rank * rows, rows).clone()


def unshard_tensors(shards: list, *, dim: int, full: int, chunks: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: rebuild the full tensor from every rank's shard, in order."""
    if chunks > 1:
        pieces = [s.chunk(chunks, dim=dim) for s in shards]
        return torch.cat([torch.cat([p[c] for p in pieces], dim=dim) for c in range(chunks)], dim=dim)
    return torch.cat(list(shards), dim=dim).narrow(dim, 0, full)


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The slice of ``full`` that corresponds to tp-split ``param`` (``full`` itself if replicated)."""
    if not hasattr(param, "_zt_tp_dim"):
        return full
    return shard_tensor(full, dim=param._zt_tp_dim, size=param._zt_tp_size, rank=param._zt_tp_rank,
                        chunks=param._zt_tp_chunks)


class _GroupRef:
    """Holds a process group: a deepcopy of the module shares it (groups cannot be copied)."""

    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


class _TPModule(nn.Module):
    """Holds the tp group, and keeps the ``_zt_tp_*`` marks on its split parameters through
    deepcopy, ``.to()`` and ``to_empty()`` (each may create new Parameter objects, which carry no
    Python attributes)."""

    @property
    def group(self):
        return self._group_ref.group

    @group.setter
    def group(self, group) -> None:
        self._group_ref = _GroupRef(group)

    def _mark(self, name: str, *, dim: int, group, full: int, chunks: int = 1) -> None:
        marks = self.__dict__.setdefault("_zt_marks", {})
        marks[name] = dict(dim=dim, full=full, chunks=chunks,
                           size=comm.group_size(group), rank=comm.group_rank(group))
        self._restore_marks()

    def _restore_marks(self) -> None:
        for name, spec in self.__dict__.get("_zt_marks", {}).items():
            param = getattr(self, name, None)
            if param is not None:
                for key, value in spec.items():
                    setattr(param, f"_zt_tp_{key}", value)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._restore_marks()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._restore_marks()
        return out


def _copy_in(param: nn.Parameter, full: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(shard_like(full.detach(), param))


def _uniform_(param: nn.Parameter, bound: float) -> None:
    with torch.no_grad():
        nn.init.uniform_(param, -bound, bound)


class ColumnParallelLinear(_TPModule):
    """``y = x Aᵀ + b`` with A's output rows split over tp: weight shard ``[ceil(out/tp), in]``.

    ``out_features`` is the width this module returns (the full ``out`` with ``gather_output``,
    this rank's share otherwise); ``full_out_features`` is always ``out``. ``chunks=3`` splits a
    fused [q|k|v] projection block by block, so each rank holds whole heads.
    """

    def __init__(self, in_features: int, out_features: int, *, group, bias: bool = True,
                 gather_output: bool = False, chunks: int = 1, device=None, dtype=None):
        super().__init__()
        tp = comm.group_size(group)
        if chunks > 1 and out_features % (chunks * tp):
            raise ValueError(f"ColumnParallelLinear: out_features={out_features} must divide into "
                             f"chunks={chunks} blocks each divisible by tp={tp}")
        if chunks > 1 and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output=True needs chunks=1 "
                             "(a gathered fused output would not be in dense order)")
        self.group, self.gather_output, self.chunks = group, gather_output, chunks
        self.in_features, self.full_out_features = in_features, out_features
        self.out_per_rank = out_features // tp if chunks > 1 else _per_rank(out_features, tp)
        self.out_features = out_features if gather_output else self.out_per_rank
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(self.out_per_rank, **kw)) if bias else None
        for name in ("weight", "bias"):
            self._mark(name, dim=0, group=group, full=out_features, chunks=chunks)
        self._init_shards()

    def _init_shards(self) -> None:
        """nn.Linear's ranges; padded rows zero. Use from_dense for weights equal to a dense model."""
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        start, end, _ = vocab_range(self.full_out_features, self.group)
        for p in (self.weight, self.bias):
            if p is not None:
                _uniform_(p, bound)
                if self.chunks == 1:
                    with torch.no_grad():
                        p[end - start:].zero_()

    @classmethod
    def from_dense(cls, dense: nn.Linear, *, group, gather_output: bool = False,
                   chunks: int = 1) -> "ColumnParallelLinear":
        """This rank's shard of ``dense`` (its full-size weights are sliced, not re-initialised)."""
        w = dense.weight
        layer = cls(dense.in_features, dense.out_features, group=group, bias=dense.bias is not None,
                    gather_output=gather_output, chunks=chunks, device=w.device, dtype=w.dtype)
        _copy_in(layer.weight, w)
        if dense.bias is not None:
            _copy_in(layer.bias, dense.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)   # (..., out_per_rank)
        if self.gather_output:
            y = gather_from_tp(y, self.group)[..., :self.full_out_features]
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.full_out_features} "
                f"({self.out_per_rank} per rank, chunks={self.chunks}), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(_TPModule):
    """``y = x Aᵀ + b`` with A's input columns split over tp: weight shard ``[out, in/tp]``.

    The partial products are all-reduced ("g"); the bias is replicated and added once, after the
    reduce. ``in_features`` is the width this module accepts (this rank's share when
    ``input_is_parallel``); ``full_in_features`` is always ``in``.
    """

    def __init__(self, in_features: int, out_features: int, *, group, bias: bool = True,
                 input_is_parallel: bool = True, device=None, dtype=None):
        super().__init__()
        tp = comm.group_size(group)
        if in_features % tp:
            raise ValueError(f"RowParallelLinear: in_features={in_features} is not divisible by "
                             f"tp={tp}; choose a tp degree that divides it")
        self.group, self.input_is_parallel = group, input_is_parallel
        self.full_in_features, self.out_features = in_features, out_features
        self.in_per_rank = in_features // tp
        self.in_features = self.in_per_rank if input_is_parallel else in_features
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank, **kw))
        self._mark("weight", dim=1, group=group, full=in_features)
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
        for p in (self.weight, self.bias):
            if p is not None:
                _uniform_(p, bound)

    @classmethod
    def from_dense(cls, dense: nn.Linear, *, group, input_is_parallel: bool = True) -> "RowParallelLinear":
        """This rank's shard of ``dense`` (its full-size weights are sliced, not re-initialised)."""
        w = dense.weight
        layer = cls(dense.in_features, dense.out_features, group=group, bias=dense.bias is not None,
                    input_is_parallel=input_is_parallel, device=w.device, dtype=w.dtype)
        _copy_in(layer.weight, w)
        if dense.bias is not None:
            _copy_in(layer.bias, dense.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        y = reduce_from_tp(F.linear(x, self.weight), self.group)          # (..., out), summed over tp
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.full_in_features} ({self.in_per_rank} per rank), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(_TPModule):
    """Embedding with the vocabulary rows split in contiguous ranges over tp.

    The table is padded to ``ceil(vocab/tp) * tp`` rows with zero rows at the end; rank r owns
    rows ``[r*rows, (r+1)*rows)``. A lookup embeds the ids this rank owns, writes zeros for the
    others, and all-reduces, so every rank gets the full embedding.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group, device=None, dtype=None):
        super().__init__()
        self.group = group
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start, self.vocab_end, self.rows_per_rank = vocab_range(num_embeddings, group)
        self.padded_num_embeddings = self.rows_per_rank * comm.group_size(group)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim,
                                               device=device, dtype=dtype))
        self._mark("weight", dim=0, group=group, full=num_embeddings)
        with torch.no_grad():
            nn.init.normal_(self.weight)
            self.weight[self.vocab_end - self.vocab_start:].zero_()

    @classmethod
    def from_dense(cls, dense: nn.Embedding, *, group) -> "VocabParallelEmbedding":
        """This rank's rows of ``dense`` (its full-size table is sliced, not re-initialised)."""
        w = dense.weight
        layer = cls(dense.num_embeddings, dense.embedding_dim, group=group, device=w.device, dtype=w.dtype)
        _copy_in(layer.weight, w)
        return layer

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if comm.group_size(self.group) == 1:
            return F.embedding(idx, self.weight)
        outside = (idx < self.vocab_start) | (idx >= self.vocab_start + self.rows_per_rank)
        local = (idx - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)                              # (..., dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, "
                f"{self.vocab_end}) of {self.padded_num_embeddings} padded")
