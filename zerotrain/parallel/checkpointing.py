"""Activation checkpointing: keep a unit's inputs, recompute its activations during backward.

``shard_model(..., activation_checkpointing=True)`` applies it per unit (each transformer block)
before the sharding hooks are installed, as torchtitan orders it: the unit's ``forward`` runs
under torch's non-reentrant ``checkpoint``, while the unit's hooks stay outside it. So a forward
gathers a stage-3 unit once; in backward the unit is gathered for its own backward anyway (the
pre-backward hook) and the recompute runs inside that window — no extra all-gather, which
``comm_report()`` shows. A model that calls ``checkpoint`` around a unit itself (the unit's
hooks then run again inside backward) works too: the schedule's phase tells a recompute from a
forward.

For DeepSpeed scripts, :func:`checkpoint` and :func:`configure` stand in for
``deepspeed.checkpointing.checkpoint`` / ``configure`` (``import zerotrain as deepspeed``); the
recompute is torch's non-reentrant one, which preserves the RNG state (dropout) by default.
"""
from __future__ import annotations

import functools
import logging

import torch.nn as nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

log = logging.getLogger("zerotrain")

def checkpoint(function, *args, **kwargs):
    """Run ``function(*args, **kwargs)`` keeping only its inputs; recompute it in backward."""
    return _torch_checkpoint(function, *args, use_reentrant=False, **kwargs)


def configure(mpu_=None, deepspeed_config=None, partition_activations=None, contiguous_checkpointing=None,
              num_checkpoints=None, checkpoint_in_cpu=None, synchronize=None, profile=None) -> None:
    """``deepspeed.checkpointing.configure``: accepted for compatibility. Activation partitioning
    across tensor-parallel ranks and CPU checkpointing are not implemented: asking for them is an
    error rather than a silent no-op."""
    if mpu_ is not None:
        raise ValueError("checkpointing.configure: mpu_ is not supported; zerotrain takes the tensor-"
                         "parallel group from its Mesh")
    for name, value in (("partition_activations", partition_activations), ("checkpoint_in_cpu", checkpoint_in_cpu)):
        if value:
            raise ValueError(f"checkpointing.configure: {name}=True is not supported by zerotrain; "
                             "leave it unset (activations are recomputed per unit on the device)")


def _checkpointed_forward(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return _torch_checkpoint(forward, *args, use_reentrant=False, **kwargs)
    run._zt_checkpointed = True
    return run


def apply_activation_checkpointing(modules: list[nn.Module], policy=True) -> list[nn.Module]:
    """Make each module in ``modules`` for which ``policy`` holds (True, or a callable
    ``module -> bool``) recompute its forward in backward. Idempotent. Returns the modules changed."""
    if not (isinstance(policy, bool) or callable(policy)):
        raise ValueError(f"activation_checkpointing={policy!r}: pass True/False or a callable "
                         "module -> bool choosing the units to recompute")
    chosen = []
    for m in modules:
        wanted = policy if isinstance(policy, bool) else bool(policy(m))
        if not wanted or getattr(m.forward, "_zt_checkpointed", False):
            continue
        m.forward = _checkpointed_forward(m.forward)      # an instance attribute: hooks stay outside
        chosen.append(m)
    log.info("activation checkpointing: %d of %d units recompute their forward in backward",
             len(chosen), len(modules))
    return chosen
