"""Cross-entropy over vocabulary-sharded logits, without materialising the full logits.

Each rank holds the logits of the vocabulary ids ``[vocab_start, vocab_end)`` in the first
``vocab_end - vocab_start`` columns of its shard; any further columns are padding (the vocabulary
was padded to a multiple of tp) and are left out of the softmax. Forward costs two all-reduces of
``N`` and ``2N`` elements (N = number of targets): the row max (op="max"), then the sum of
exponentials and the target logit together (one sum). Backward needs no communication: each rank's
gradient is ``softmax - onehot`` restricted to its own columns.
"""
from __future__ import annotations

import torch

from zerotrain.distributed import comm

from .layers import _TPModule, vocab_range

__all__ = ["vocab_parallel_cross_entropy", "VocabParallelCrossEntropy"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)     # bf16/fp16 → fp32, fp64 stays


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start, vocab_end, ignore_index, per_target=False):
        shape, width = logits.shape, logits.shape[-1]
        x = logits.reshape(-1, width).to(_compute_dtype(logits.dtype), copy=True)   # (N, width)
        t = targets.reshape(-1)
        x[:, vocab_end - vocab_start:] = float("-inf")                  # padding columns
        row_max = x.max(dim=-1).values
        comm.all_reduce(row_max, group, op="max")
        x.sub_(row_max.unsqueeze(1))                                    # shifted logits, ≤ 0
        owned = (t >= vocab_start) & (t < vocab_end) & (t != ignore_index)
        local_t = (t - vocab_start).masked_fill(~owned, 0)
        target_logit = torch.where(owned, x.gather(1, local_t.unsqueeze(1)).squeeze(1), 0.0)
        x.exp_()                                                        # x now holds exp(shifted)
        sums = torch.stack([x.sum(dim=-1), target_logit])               # (2, N): one all-reduce
        comm.all_reduce(sums, group)
        sum_exp, target_logit = sums[0], sums[1]
        valid = t != ignore_index
        count = valid.sum()
        per_target_loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)
        x.div_(sum_exp.unsqueeze(1))                                    # x now holds softmax
        ctx.save_for_backward(x, local_t, owned, valid, count)
        ctx.shape, ctx.dtype, ctx.per_target = shape, logits.dtype, per_target
        if per_target:
            return per_target_loss.to(logits.dtype)
        return (per_target_loss.sum() / count).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, owned, valid, count = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= owned.to(grad.dtype)
        scale = grad_loss.reshape(-1).to(grad.dtype) if ctx.per_target else grad_loss / count
        grad.mul_((valid.to(grad.dtype) * scale).unsqueeze(1))
        return grad.to(ctx.dtype).view(ctx.shape), None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, targets: torch.Tensor, group, *,
                                 vocab_start: int, vocab_end: int,
                                 ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Mean cross-entropy over the targets that are not ``ignore_index``, or with
    ``reduction="none"`` each target's, flattened (0 where ignored).

    ``logits_shard``: ``(..., width)`` with this rank's ids ``[vocab_start, vocab_end)`` in its first
    columns (``width >= vocab_end - vocab_start``; extra columns are padding and ignored).
    ``targets``: ``(...)`` global ids, identical on every rank of ``group``. With no valid target
    the result is nan, as with ``torch.nn.functional.cross_entropy``.
    """
    if logits_shard.shape[:-1] != targets.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits {tuple(logits_shard.shape)} and "
                         f"targets {tuple(targets.shape)} disagree on the leading dimensions")
    if not 0 <= vocab_end - vocab_start <= logits_shard.shape[-1]:
        raise ValueError(f"vocab_parallel_cross_entropy: range [{vocab_start}, {vocab_end}) does not "
                         f"fit a shard of width {logits_shard.shape[-1]}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"vocab_parallel_cross_entropy: reduction must be 'mean' or 'none', got {reduction!r}")
    return _VocabParallelCE.apply(logits_shard, targets, group, vocab_start, vocab_end, ignore_index,
                                  reduction == "none")


class VocabParallelCrossEntropy(_TPModule):
    """Drop-in for a model's ``loss_fn(logits, targets)`` when its logits are vocabulary-sharded."""

    def __init__(self, vocab_size: int, *, group, ignore_index: int = -100):
        super().__init__()
        self.group, self.vocab_size, self.ignore_index = group, vocab_size, ignore_index
        self.vocab_start, self.vocab_end, self.rows_per_rank = vocab_range(vocab_size, group)

    def forward(self, logits_shard: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits_shard, targets, self.group,
                                            vocab_start=self.vocab_start, vocab_end=self.vocab_end,
                                            ignore_index=self.ignore_index, reduction=reduction)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, ids [{self.vocab_start}, {self.vocab_end}), "
                f"ignore_index={self.ignore_index}")
