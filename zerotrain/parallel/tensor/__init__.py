"""Megatron-style tensor parallelism: f/g mappings, parallel layers, parallel loss, a GPT plan."""
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, shard_like,
                     shard_tensor, unshard_tensors, vocab_range)
from .loss import VocabParallelCrossEntropy, vocab_parallel_cross_entropy
from .mappings import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp
from .plan import apply_tensor_parallel, gather_logits

__all__ = [
    "copy_to_tp", "reduce_from_tp", "gather_from_tp", "scatter_to_tp",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy", "VocabParallelCrossEntropy",
    "apply_tensor_parallel", "gather_logits",
    "shard_tensor", "shard_like", "unshard_tensors", "vocab_range",
]
