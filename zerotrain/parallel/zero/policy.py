"""The one table where the ZeRO stages differ.

Everything else — the flat buffers, units, hooks, optimizer, engine, checkpoints and the planner —
reads these fields; no other module branches on the stage number (``tests/unit/test_stage_branches.py``
greps for it).

=====  ===============  ===========  ============  ==================  ============  ============
stage  shard_optimizer  shard_grads  shard_params  reduce              gather after  defer reduce
                                                                       step          (accumulate)
=====  ===============  ===========  ============  ==================  ============  ============
0      no               no           no            ALL_REDUCE_AVG      no            yes
1      yes              no           no            REDUCE_SCATTER_SUM  yes           yes
2      yes              yes          no            REDUCE_SCATTER_SUM  yes           no
3      yes              yes          yes           REDUCE_SCATTER_SUM  no            no
=====  ===============  ===========  ============  ==================  ============  ============

The last three columns follow from the first three (``_policy``); they are fields so that readers
ask the table a question instead of re-deriving the answer.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Reduce(enum.Enum):
    """How a unit's gradients are reduced over the data-parallel group."""

    ALL_REDUCE_AVG = "all_reduce"           # every rank keeps the averaged full gradient
    REDUCE_SCATTER_SUM = "reduce_scatter"   # every rank keeps the SUM of its own slice (÷N at step)


@dataclass(frozen=True)
class StagePolicy:
    stage: int
    shard_optimizer: bool      # master weights and optimizer states hold only this rank's 1/N
    shard_grads: bool          # backward reduce-scatters into a 1/N grad shard; full grads freed
    shard_params: bool         # parameters live as a 1/N shard; gathered per unit just in time
    reduce: Reduce
    gather_after_step: bool    # full parameters are kept, so updated shards are all-gathered
                               # right after the step (stages 1-2)
    defer_reduce: bool         # gradient accumulation reduces once per optimizer step: the full
                               # gradient is held anyway, so deferring costs no memory (stages 0-1);
                               # stages 2-3 reduce every micro-batch, since holding full gradients
                               # between micro-batches is what they exist to avoid

    @property
    def grad_factor_dp(self) -> bool:
        """True when the reduced gradient is a SUM over dp that the step divides by N."""
        return self.reduce is Reduce.REDUCE_SCATTER_SUM

    @property
    def gathers_per_step(self) -> int:
        """Parameter all-gathers per step: stage 3 gathers in forward and again in backward."""
        return 2 if self.shard_params else int(self.gather_after_step)

    def owned_region(self, padded: int, world: int, rank: int) -> tuple[int, int]:
        """The [lo, hi) range of a unit's flat buffer whose master weights and optimizer state
        this rank keeps: its own equal chunk when the optimizer is sharded, else all of it. The
        only place the owner rule is written (``FlatLayout`` and the planner ask it)."""
        if not self.shard_optimizer:
            return 0, padded
        return shard_range(padded, world, rank)

    @property
    def whole(self) -> tuple[bool, bool, bool]:
        """Which model states a rank holds whole: (params, grads, master + optimizer states)."""
        return not self.shard_params, not self.shard_grads, not self.shard_optimizer


def _policy(stage: int, *, shard_optimizer: bool, shard_grads: bool, shard_params: bool) -> StagePolicy:
    reduce = Reduce.REDUCE_SCATTER_SUM if shard_optimizer else Reduce.ALL_REDUCE_AVG
    return StagePolicy(stage, shard_optimizer, shard_grads, shard_params, reduce,
                       gather_after_step=shard_optimizer and not shard_params,
                       defer_reduce=not shard_grads)


STAGES = {
    0: _policy(0, shard_optimizer=False, shard_grads=False, shard_params=False),
    1: _policy(1, shard_optimizer=True, shard_grads=False, shard_params=False),
    2: _policy(2, shard_optimizer=True, shard_grads=True, shard_params=False),
    3: _policy(3, shard_optimizer=True, shard_grads=True, shard_params=True),
}


def policy_for(stage) -> StagePolicy:
    if isinstance(stage, bool) or stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not a ZeRO stage; use one of 0 (plain data parallel), "
                         "1 (optimizer states sharded), 2 (+ gradients), 3 (+ parameters)")
    return STAGES[stage]


def shard_range(padded: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s chunk of a buffer of ``padded`` elements split into ``world`` equal,
    contiguous chunks in rank order (``padded`` is a multiple of ``world``)."""
    shard = padded // world
    return rank * shard, (rank + 1) * shard
