"""Activation memory and tensor-parallel traffic of a GPT, per rank and per micro-batch.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", no sequence parallelism). With s = sequence length, b = micro-batch, h = hidden,
a = heads, L = layers, V = vocabulary, t = tp, the bytes one transformer layer keeps for
backward in 16-bit are

    s·b·h·(10 + 24/t + 5·a·s/(h·t))        (= s·b·h·(34 + 5·a·s/h) at t = 1)

(LayerNorm inputs and the dropout masks are replicated over tp; the rest is split). With full
activation checkpointing a layer keeps only its 16-bit input, 2·s·b·h bytes, and the layer being
recomputed holds its full activations once:

    L·2·s·b·h + s·b·h·(10 + 24/t + 5·a·s/(h·t))

The loss adds the logits and their gradient, 2·s·b·(V/t) elements. Everything is in the compute
dtype: fp32 doubles the 16-bit numbers (fp64 quadruples them).

Tensor-parallel traffic (Megatron-LM): each block all-reduces an activation of b·s·h elements
twice in forward (after attention, after MLP) and twice in backward (the gradients entering
them), plus twice more when checkpointing recomputes the forward; the vocab-parallel embedding
all-reduces its output in forward and the lm_head its input gradient in backward. An all-reduce
counts 2× its size. The cross-entropy's b·s-sized reductions are left out.
"""
from __future__ import annotations

from fractions import Fraction

from zerotrain.planner.spec import ModelSpec


def activation_bytes(spec: ModelSpec, *, tp: int, micro_batch: int, seq_len: int | None,
                     elem: int, checkpointing: bool) -> tuple[int, list[str]]:
    """Activation bytes per rank for one micro-batch, and notes on what was left out."""
    if not spec.has_shape:
        return 0, ["activations not estimated: the model's n_layer, n_embd and n_head are unknown"]
    if seq_len is None:
        return 0, ["activations not estimated: give seq_len (the model has no block_size)"]
    s, b, h, a, t = seq_len, micro_batch, spec.n_embd, spec.n_head, tp
    layer16 = s * b * h * (10 + Fraction(24, t)) + Fraction(5 * a * s * s * b, t)
    if checkpointing:
        layers16 = spec.n_layer * 2 * s * b * h + layer16
    else:
        layers16 = spec.n_layer * layer16
    notes = []
    if spec.vocab_size is None:
        logits_elems = 0
        notes.append("logits not estimated: the vocabulary size is unknown")
    else:
        logits_elems = 2 * s * b * -(-spec.vocab_size // t)
    return round(layers16 * Fraction(elem, 2) + logits_elems * elem), notes


def tp_comm_elements(spec: ModelSpec, *, tp: int, micro_batch: int, seq_len: int | None,
                     checkpointing: bool) -> tuple[int, list[str]]:
    """Elements each rank all-reduces over tp per micro-batch (0 when tp = 1)."""
    if tp == 1:
        return 0, []
    if not spec.has_shape or seq_len is None:
        return 0, ["tensor-parallel traffic not estimated: the model's shape or seq_len is unknown"]
    per_block = 4 + (2 if checkpointing else 0)
    all_reduces = spec.n_layer * per_block + 2
    return all_reduces * 2 * micro_batch * seq_len * spec.n_embd, []
