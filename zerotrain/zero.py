"""``zerotrain.zero``: DeepSpeed's ``deepspeed.zero`` names for building and reading sharded models.

``Init()`` is a context in which a model is constructed without storage (on the meta device);
``initialize()`` / ``shard_model()`` then materialise it unit by unit, each rank keeping only what
its ZeRO stage keeps, so no rank ever holds the whole model. ``GatheredParameters`` gathers the
full values of some parameters of a sharded model for a while (stage 3 holds 1/N of each), and
with ``modifier_rank`` writes that rank's changes back to every rank's shard and master weights.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

__all__ = ["Init", "GatheredParameters"]


class Init(contextlib.ContextDecorator):
    """``with zerotrain.zero.Init(): model = MyModel(...)`` builds ``model`` on the meta device.

    Pass it to ``zerotrain.initialize`` (or ``shard_model``), which materialises each unit on the
    rank's device and initialises it with the model's ``init_weights()`` (the zerotrain GPT: the
    same weights as a dense build with the same seed) or each module's ``reset_parameters()``.
    DeepSpeed arguments that only tune its own partitioner are accepted; ones that would change
    the result and are not implemented are refused."""

    def __init__(self, module=None, data_parallel_group=None, mem_efficient_linear=True, remote_device=None,
                 pin_memory=False, config_dict_or_path=None, config=None, enabled=True, dtype=None,
                 mpu=None, **_tuning):
        if module is not None:
            raise ValueError("zero.Init(module=...): an already built module is sharded by "
                             "zerotrain.initialize(model=...) or shard_model(); use Init() around construction")
        if mpu is not None:
            raise ValueError("zero.Init(mpu=...) is not supported; set tensor_parallel.tp_size in the config")
        if remote_device not in (None, "none", "cpu"):
            raise ValueError(f"zero.Init(remote_device={remote_device!r}) is not supported; parameters live "
                             "on the rank's device (optimizer states can be offloaded to the CPU)")
        self.enabled, self.dtype = enabled, dtype
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        if self.enabled:
            self._stack.enter_context(torch.device("meta"))
            if self.dtype is not None:
                self._stack.enter_context(_default_dtype(self.dtype))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _units_of(params) -> list:
    if isinstance(params, torch.Tensor):
        params = [params]
    units, missing = [], []
    for p in params:
        ref = getattr(p, "_zt_unit", None)
        unit = ref() if ref is not None else None
        if unit is None:
            missing.append(tuple(p.shape))
        elif not any(unit is u for u in units):
            units.append(unit)
    if missing:
        raise ValueError(f"GatheredParameters: parameters of shapes {missing[:3]} do not belong to a model "
                         "sharded by zerotrain (frozen parameters are never sharded: use them directly)")
    return units


def _dp_rank_of(global_rank: int, dp: int) -> int:
    """The data-parallel rank of ``global_rank`` (the mesh puts rank r at dp rank r // tp)."""
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not 0 <= global_rank < world:
        raise ValueError(f"GatheredParameters: modifier_rank={global_rank} is not a rank of this job "
                         f"(world size {world})")
    return global_rank // (world // dp)


class GatheredParameters(contextlib.ContextDecorator):
    """Full values of ``params`` (a parameter or an iterable of them) inside the block, on every rank.

    ``modifier_rank=r``: changes made on global rank ``r`` are kept — broadcast to its data-parallel
    peers and written into every rank's shard and fp32 master — when the block exits. Without it the
    values are read-only (changes are dropped at stage 3). Collective: every rank enters together."""

    def __init__(self, params, modifier_rank: int | None = None, fwd_module: nn.Module | None = None,
                 enabled: bool = True):
        self.units = _units_of(params) if enabled else []
        self.sources = None if modifier_rank is None else [_dp_rank_of(modifier_rank, u.world) for u in self.units]

    def __enter__(self):
        for u in self.units:
            u.unshard()
        return self

    def __exit__(self, exc_type, *exc):
        try:
            if self.sources is not None and exc_type is None:
                for u, src in zip(self.units, self.sources):
                    u.load_full_from(src)
        finally:
            for u in self.units:
                u.reshard()
        return False
