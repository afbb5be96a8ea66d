"""Where ``zerotrain train`` and the commands around it run: the GPUs when CUDA is present.

``parallel.device`` is ``auto`` (CUDA if present, else the CPU), ``cuda`` or ``cpu``. On CUDA, unless
set explicitly, ``parallel.nproc`` defaults to the number of visible GPUs (one rank per GPU, NCCL)
and ``parallel.precision`` to bf16; on the CPU they stay 2 ranks (gloo) and fp32. Batches are built
on the host and moved to the rank's device from pinned memory without blocking.
"""
from __future__ import annotations

import torch

from .options import Options, UsageError


def run_device(opts: Options) -> str:
    """"cuda" or "cpu" for ``opts`` (``auto`` resolved); a CUDA run on a machine without one is an error."""
    wanted = opts.parallel.device
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UsageError("parallel.device=cuda: this machine has no CUDA device torch can see; use --device cpu "
                         "(or auto)")
    return wanted


def apply_device_defaults(opts: Options, *, explicit: set[str]) -> None:
    """One rank per GPU and bf16 on CUDA, for whichever of nproc / precision the user left unset
    (``explicit``: the dotted options given on the command line or in a config)."""
    if run_device(opts) != "cuda":
        return
    if "parallel.nproc" not in explicit:
        opts.parallel.nproc = max(1, torch.cuda.device_count())
    if "parallel.precision" not in explicit:
        opts.parallel.precision = "bf16"


def backend_for(opts: Options) -> str:
    return "nccl" if run_device(opts) == "cuda" else "gloo"


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (built on the host) on ``device``: pinned and copied without blocking on a GPU."""
    if device.type == "cpu" or t.device == device:
        return t
    return t.pin_memory().to(device, non_blocking=True)
