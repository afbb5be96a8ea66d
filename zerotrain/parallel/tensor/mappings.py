"""The four tensor-parallel region mappings, as small autograd functions taking the tp group.

Megatron-style tensor parallelism needs only these conjugate pairs:

=================  =======================  ==========================
function           forward                  backward
=================  =======================  ==========================
``copy_to_tp``     identity        ("f")    all-reduce (sum)
``reduce_from_tp`` all-reduce (sum) ("g")   identity
``gather_from_tp`` all-gather last dim      keep own slice of last dim
``scatter_to_tp``  keep own slice of last   all-gather last dim
=================  =======================  ==========================

``group=None`` (or a group of one) makes every mapping the identity. Collectives go through
:mod:`zerotrain.distributed.comm` only; they never modify the caller's tensors in place.
"""
from __future__ import annotations

import torch

from zerotrain.distributed import comm

__all__ = ["copy_to_tp", "reduce_from_tp", "gather_from_tp", "scatter_to_tp",
           "split_last_dim", "gather_last_dim"]


def _all_reduce_copy(x: torch.Tensor, group) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    comm.all_reduce(out, group)
    return out


def split_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's contiguous slice of the last dimension (which must divide by the group size)."""
    n = comm.group_size(group)
    if n == 1:
        return x
    if x.shape[-1] % n:
        raise ValueError(f"split_last_dim: last dimension {x.shape[-1]} is not divisible by tp={n}")
    width = x.shape[-1] // n
    start = comm.group_rank(group) * width
    return x[..., start:start + width].contiguous()


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dimension (rank order)."""
    n = comm.group_size(group)
    if n == 1:
        return x
    shard = x.contiguous().view(-1)
    flat = torch.empty(n * shard.numel(), dtype=x.dtype, device=x.device)
    comm.all_gather(flat, shard, group)
    # flat is [n, *x.shape]; move the rank axis next to the last one and merge the two.
    full = flat.view(n, *x.shape).movedim(0, -2)
    return full.reshape(*x.shape[:-1], n * x.shape[-1])


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce_copy(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce_copy(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return split_last_dim(grad, ctx.group), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_last_dim(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a parallel region: identity forward, all-reduce of the gradient backward ("f")."""
    return x if comm.group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a parallel region: all-reduce forward, identity backward ("g")."""
    return x if comm.group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the last dimension forward; keep this rank's slice of the gradient."""
    return x if comm.group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the last dimension forward; all-gather the gradient backward."""
    return x if comm.group_size(group) == 1 else _ScatterToTP.apply(x, group)
