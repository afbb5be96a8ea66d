"""Communication per step per rank, read off the stage table and the model's shape.

Over dp, in elements of the communicated dtype (Ψ = the padded model per tp rank): a stage whose
``reduce`` is ``ALL_REDUCE_AVG`` all-reduces the gradients, 2Ψ in the reduce dtype (reduce-scatter
+ all-gather); a ``REDUCE_SCATTER_SUM`` stage reduce-scatters Ψ in the reduce dtype and all-gathers
``gathers_per_step`` × Ψ parameters in the compute dtype (stages 1-2 once after the step, stage 3
in forward and again in backward). A ring moves (N−1)/N of it. Activation checkpointing adds no
dp traffic: a unit is recomputed during backward while it is gathered for its backward anyway.

Over tp (Megatron-LM): each block all-reduces an activation of b·s·h elements twice in forward
(after attention, after MLP) and twice in backward (the gradients entering them), plus twice more
when checkpointing recomputes the forward; the vocab-parallel embedding all-reduces its output in
forward and the lm_head its input gradient in backward. An all-reduce counts 2× its size. The
cross-entropy's b·s-sized reductions are left out.
"""
from __future__ import annotations

from dataclasses import dataclass

from zerotrain.parallel.zero.policy import Reduce, StagePolicy
from zerotrain.planner.spec import ModelSpec


@dataclass(frozen=True)
class CommVolume:
    """Per step per rank. elements: of the communicated dtype; wire: what a ring moves."""

    dp_elements: int
    dp_bytes: int
    dp_wire_bytes: int
    tp_elements: int
    tp_bytes: int
    tp_wire_bytes: int


def dp_volume(policy: StagePolicy, *, full: int, p: int, r: int) -> tuple[int, int]:
    """(elements, bytes) one rank sends per step over dp (before the ring's (N−1)/N)."""
    if policy.reduce is Reduce.ALL_REDUCE_AVG:
        return 2 * full, 2 * full * r
    gathers = policy.gathers_per_step
    return (1 + gathers) * full, full * r + gathers * full * p


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


def comm_volume(spec: ModelSpec, policy: StagePolicy, *, dp: int, tp: int, full: int, p: int,
                r: int, micro_batch: int, seq_len: int | None,
                checkpointing: bool) -> tuple[CommVolume, list[str]]:
    elems, nbytes = dp_volume(policy, full=full, p=p, r=r)
    tp_elems, notes = tp_comm_elements(spec, tp=tp, micro_batch=micro_batch, seq_len=seq_len,
                                       checkpointing=checkpointing)
    return CommVolume(
        dp_elements=elems, dp_bytes=nbytes, dp_wire_bytes=nbytes * (dp - 1) // dp,
        tp_elements=tp_elems, tp_bytes=tp_elems * p, tp_wire_bytes=tp_elems * p * (tp - 1) // tp,
    ), notes
