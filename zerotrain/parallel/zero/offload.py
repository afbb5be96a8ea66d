"""ZeRO-Offload: the fp32 master weights and optimizer states in (pinned) host memory, the optimizer
step on the CPU.

An offload policy sits beside ``MixedPrecision``; it is not a stage. With it, each unit keeps its
master slice on the host and a host buffer for its reduced gradient slice. The reduced gradient is
copied device→host as soon as its reduction completes (non-blocking from pinned memory, so the copy
overlaps the rest of the backward); the step runs on the CPU (torch's fused CPU AdamW when the
optimizer has one), and the updated master goes host→device into the parameters, which stages 1–2
then all-gather as usual. The gradient norm and clipping still read the device copy.

On a CPU-only run the host *is* the device: nothing moves and nothing is copied; the master and
optimizer state are only reported as host memory (``memory_report``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OffloadPolicy:
    device: str = "cpu"
    pin_memory: bool = True

    @classmethod
    def coerce(cls, value, *, pin_memory: bool = True) -> "OffloadPolicy | None":
        if value is None or value == "none" or value is False:
            return None
        if isinstance(value, cls):
            return value
        if value == "cpu" or value is True:
            return cls("cpu", pin_memory)
        raise ValueError(f"offload={value!r}: pass None, 'cpu' or zerotrain.OffloadPolicy(...); optimizer "
                         "states can be offloaded to the CPU (NVMe is not supported)")


@dataclass
class HostState:
    """A unit's offloaded part. ``grads`` is None when the unit already lives on the CPU."""
    master: torch.Tensor
    grads: torch.Tensor | None

    @property
    def moves(self) -> bool:
        return self.grads is not None


def moves_to_host(device: torch.device) -> bool:
    """Whether offloading from ``device`` moves anything (not from the CPU itself)."""
    return device.type != "cpu"


def host_buffer(like: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    pin = pin and torch.cuda.is_available()
    return torch.empty(like.shape, dtype=dtype, device="cpu", pin_memory=pin)


def wait_for_host_copies(units) -> None:
    """The CPU is about to read gradients copied device→host without blocking: finish those copies."""
    devices = {u.full.device for u in units if u.host is not None and u.host.moves}
    for d in devices:
        if d.type == "cuda":
            torch.cuda.current_stream(d).synchronize()
