"""The one table where the ZeRO stages differ.

Everything else — the flat buffers, hooks, optimizer — reads these flags; no other module
branches on the stage number.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StagePolicy:
    stage: int
    shard_optimizer: bool      # master weights and optimizer states hold only this rank's 1/N
    shard_grads: bool          # backward reduce-scatters into a 1/N grad shard; full grads freed
    shard_params: bool         # parameters live as a 1/N shard; gathered per unit just in time
    reduce: str                # "all_reduce": every rank keeps the averaged full gradient
                               # "reduce_scatter": every rank keeps the SUM of its slice (÷N at step)

    @property
    def gather_after_step(self) -> bool:
        """Stages 1–2 hold full parameters, so updated shards are all-gathered after the step."""
        return self.shard_optimizer and not self.shard_params


STAGES = {
    0: StagePolicy(0, shard_optimizer=False, shard_grads=False, shard_params=False, reduce="all_reduce"),
    1: StagePolicy(1, shard_optimizer=True, shard_grads=False, shard_params=False, reduce="reduce_scatter"),
    2: StagePolicy(2, shard_optimizer=True, shard_grads=True, shard_params=False, reduce="reduce_scatter"),
    3: StagePolicy(3, shard_optimizer=True, shard_grads=True, shard_params=True, reduce="reduce_scatter"),
}


def policy_for(stage) -> StagePolicy:
    if isinstance(stage, bool) or stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not a ZeRO stage; use one of 0 (plain data parallel), "
                         "1 (optimizer states sharded), 2 (+ gradients), 3 (+ parameters)")
    return STAGES[stage]
