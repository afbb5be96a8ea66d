"""Reduction scratch buffers handed from one unit's finished reduce-scatter to the next."""
from __future__ import annotations

import torch


class ScratchPool:
    """Buffers for the reductions of one backward, handed from a finished unit to the next.

    Stages 2–3 pack each unit's gradients into a full-size buffer for the reduce-scatter and
    free it once the collective is done; at most ``MAX_IN_FLIGHT + 1`` are alive at once (the
    schedule bounds reductions in flight). Reusing a finished buffer for the next unit saves
    the allocation and its first touch (on CPU a large allocation is a fresh mmap, page-faulted
    on use). A request is served by the smallest free buffer that is large enough (as a prefix
    view). The schedule empties the pool when backward ends, so nothing is held between steps.
    Stage 1 gets a pool with ``keep=0`` (every buffer freed when given back): pooling its
    reduce-scatter scratch, or keeping buffers across steps, left idle buffers on top of the
    peak and cost the largest stage-1 model at 16 GB a 4% search step, for ~1% of step time.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self._free: list[torch.Tensor] = []

    def take(self, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        device = torch.device(device)
        fits = [b for b in self._free if b.numel() >= numel and b.dtype == dtype and b.device == device]
        if not fits:
            return torch.empty(numel, dtype=dtype, device=device)
        buf = min(fits, key=torch.Tensor.numel)
        self._free = [b for b in self._free if b is not buf]
        return buf[:numel]

    def give(self, buf: torch.Tensor) -> None:
        base = buf if buf._base is None else buf._base
        if len(self._free) < self.keep:
            self._free.append(base)

    def trim(self, keep: int = 0) -> None:
        """Keep the ``keep`` largest free buffers, free the others."""
        self._free = sorted(self._free, key=torch.Tensor.numel, reverse=True)[:keep]

    @property
    def buffers(self) -> list[torch.Tensor]:
        return list(self._free)
