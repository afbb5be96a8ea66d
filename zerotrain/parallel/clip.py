"""Global gradient norm and clipping over shards and meshes, with ``clip_grad_norm_`` semantics.

Every rank holds some gradient elements: a dp shard (stages 1–3) or all of them (stage 0), and,
with tensor parallelism, a tp slice of the split parameters plus a full copy of the replicated
ones. The norm counts each element of the full model exactly once: tp-split elements are summed
over tp, replicated elements are counted on one tp rank only (as 1/tp of each copy).
"""
from __future__ import annotations

import math

import torch

from ..distributed import comm


def _tp_split(param) -> bool:
    return getattr(param, "_zt_tp_dim", None) is not None


def local_norm_terms(units, norm_type: float, tp: int) -> torch.Tensor:
    """This rank's contribution: sum of |g|^p (or max |g| for inf), in the master dtype."""
    dtype = units[0].dtypes.master
    acc = torch.zeros((), dtype=dtype, device=units[0].grad_region().device)
    for u in units:
        split = [_tp_split(p) for p in u.params]
        if tp == 1 or all(split) or not any(split):     # one weight for the whole unit
            weight = 1.0 if tp == 1 or split[0] else 1.0 / tp
            acc = _accumulate(acc, u.grad_region(), norm_type, weight, dtype)
            continue
        for s in u.owned_slices():
            weight = 1.0 if split[s.index] else 1.0 / tp
            acc = _accumulate(acc, s.grad, norm_type, weight, dtype)
    return acc


def _accumulate(acc, g, norm_type, weight, dtype):
    if g.numel() == 0:
        return acc
    # vector_norm reads g once and accumulates in ``dtype`` without materialising |g| or |g|^p
    # (abs().pow().sum() builds two full-size temporaries: ~30x slower on a CPU step).
    norm = torch.linalg.vector_norm(g.detach(), ord=norm_type, dtype=dtype)
    if math.isinf(norm_type):
        return torch.maximum(acc, norm)
    return acc + weight * norm.pow(norm_type)


def global_grad_norm(units, *, norm_type: float = 2.0, group, tp: int = 1) -> torch.Tensor:
    """The norm of the full model's gradient; ``group`` spans every rank holding distinct elements."""
    acc = local_norm_terms(units, norm_type, tp)
    if math.isinf(norm_type):
        comm.all_reduce(acc, group, op="max")
        return acc
    comm.all_reduce(acc, group, op="sum")
    return acc.pow(1.0 / norm_type)


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> float:
    """``clip_grad_norm_``'s factor: max_norm / (norm + 1e-6), capped at 1."""
    return min(1.0, float(max_norm) / (float(total_norm) + 1e-6))


def clip_coefficient_tensor(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The same factor as a tensor on the norm's device (no host sync)."""
    return (float(max_norm) / (total_norm + 1e-6)).clamp(max=1.0)
