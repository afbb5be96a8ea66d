"""The device mesh: world = dp × tp, tensor-parallel ranks adjacent (same node).

A :class:`Mesh` holds the process groups; every parallel transform takes one as an argument.
Rank ``r`` sits at ``(dp_rank, tp_rank) = divmod(r, tp)``: the tp ranks of one replica are
consecutive global ranks, so with ``torchrun --nproc-per-node`` a multiple of tp they share a node.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def _backend_device() -> torch.device:
    """Where this rank's tensors live: its GPU under NCCL, the CPU otherwise."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class Mesh:
    dp_group: object | None     # None: a group of one (no process group needed)
    tp_group: object | None
    world_group: object | None
    rank: int = 0
    world_size: int = 1
    dp: int = 1
    tp: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @classmethod
    def single(cls, device=None) -> "Mesh":
        """One process, no process group; tensors on ``device`` (default: the CPU)."""
        return cls(dp_group=None, tp_group=None, world_group=None,
                   device=torch.device(device) if device is not None else torch.device("cpu"))

    @classmethod
    def default(cls) -> "Mesh":
        """The whole world as one data-parallel group (tp = 1), without creating new groups."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return cls.single(_backend_device())
        world = dist.get_world_size()
        return cls(dp_group=dist.group.WORLD, tp_group=None, world_group=dist.group.WORLD,
                   rank=dist.get_rank(), world_size=world, dp=world, tp=1, device=_backend_device())

    @classmethod
    def build(cls, tp: int = 1) -> "Mesh":
        """Build dp and tp groups over the initialised default group (collective: call on all ranks)."""
        if not dist.is_initialized():
            if tp != 1:
                raise ValueError(f"tp={tp} needs an initialised process group of at least {tp} ranks")
            return cls.single()
        if tp == 1:
            return cls.default()
        world, rank = dist.get_world_size(), dist.get_rank()
        if tp < 1 or world % tp:
            raise ValueError(f"tp={tp} must divide the world size {world}; choose tp in "
                             f"{[d for d in range(1, world + 1) if world % d == 0]}")
        dp = world // tp
        # new_group is collective over the world: every rank creates every group, in the same order.
        tp_groups = [dist.new_group(list(range(d * tp, (d + 1) * tp))) for d in range(dp)]
        dp_groups = [dist.new_group(list(range(t, world, tp))) for t in range(tp)]
        return cls(
            dp_group=dp_groups[rank % tp] if dp > 1 else None,
            tp_group=tp_groups[rank // tp] if tp > 1 else None,
            world_group=dist.group.WORLD if world > 1 else None,
            rank=rank, world_size=world, dp=dp, tp=tp, device=_backend_device(),
        )

    def __repr__(self) -> str:
        return f"Mesh(rank={self.rank}, world={self.world_size}, dp={self.dp}, tp={self.tp}, device={self.device})"
