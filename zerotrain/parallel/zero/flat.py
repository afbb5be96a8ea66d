"""Flat, padded 1-D storage for a group of parameters, and the per-parameter views into it.

A unit's parameters are laid end to end in registration order, then padded with zeros to a
multiple of the data-parallel size N, so every rank owns an equal contiguous shard of
``shard_numel = padded // N`` elements. Padding is never read by the model and never updated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives in the flat buffer."""
    name: str
    shape: torch.Size
    offset: int
    numel: int

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class FlatLayout:
    slots: tuple[Slot, ...]
    numel: int          # sum of parameter sizes
    padded: int         # numel rounded up to a multiple of world
    world: int

    @classmethod
    def build(cls, named_shapes, world: int) -> "FlatLayout":
        slots, offset = [], 0
        for name, shape in named_shapes:
            shape = torch.Size(shape)
            slots.append(Slot(name, shape, offset, shape.numel()))
            offset += shape.numel()
        padded = -(-offset // world) * world if offset else world
        return cls(tuple(slots), offset, padded, world)

    @property
    def shard_numel(self) -> int:
        return self.padded // self.world

    @property
    def padding(self) -> int:
        return self.padded - self.numel

    def shard_range(self, rank: int) -> tuple[int, int]:
        start = rank * self.shard_numel
        return start, start + self.shard_numel

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` (a full padded buffer) shaped like each parameter."""
        return [flat[s.offset:s.end].view(s.shape) for s in self.slots]

    def pieces_in(self, lo: int, hi: int):
        """Yield (slot index, start, end) in flat coordinates for each slot overlapping [lo, hi)."""
        for i, s in enumerate(self.slots):
            start, end = max(s.offset, lo), min(s.end, hi)
            if start < end:
                yield i, start, end


def flatten_into(flat: torch.Tensor, tensors, layout: FlatLayout) -> torch.Tensor:
    """Copy ``tensors`` (one per slot, any dtype) into ``flat`` and zero its padding."""
    for view, t in zip(layout.views(flat), tensors):
        view.copy_(t)
    flat[layout.numel:].zero_()
    return flat
