"""Which stage / dp / tp / micro-batch fits in a memory budget.

The rule for "cheapest", in order: the lowest ZeRO stage (least communication: stage 3 moves 1.5×
the bytes of stages 0-2 and gathers in the critical path), then the fewest devices (dp × tp),
then the smaller tp (tensor-parallel all-reduces sit on every layer's critical path), then the
largest micro-batch (best device utilisation).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable

from zerotrain.parallel.zero.policy import STAGES
from zerotrain.planner.memory import Plan, plan
from zerotrain.planner.spec import ModelSpec

log = logging.getLogger("zerotrain")
MEASURES = ("model_states", "total", "peak_rss")


def measured(p: Plan, measure: str = "total") -> int:
    """The bytes a budget is compared with: model states only, everything on the device
    (model states + transient buffers + activations), or a CPU run's peak RSS."""
    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r} is unknown: use one of {', '.join(MEASURES)}")
    return getattr(p, f"{measure}_bytes")


def fits(p: Plan, memory_bytes: float, *, measure: str = "total") -> bool:
    """Whether a plan's bytes per rank fit in ``memory_bytes``."""
    return measured(p, measure) <= memory_bytes


def cost_key(p: Plan) -> tuple:
    """Sort key implementing the module's "cheapest" rule."""
    return (p.stage, p.devices, p.tp, -p.micro_batch)


def candidates(spec: ModelSpec, *, dp_options: Iterable[int], tp_options: Iterable[int] = (1,),
               stages: Iterable[int] = tuple(STAGES), micro_batches: Iterable[int] = (1,),
               **plan_kwargs) -> list[Plan]:
    """Every plan of the grid, unsorted."""
    grid = itertools.product(stages, dp_options, tp_options, micro_batches)
    return [plan(spec, stage=st, dp=dp, tp=tp, micro_batch=mb, **plan_kwargs)
            for st, dp, tp, mb in grid]


def recommend(spec: ModelSpec, *, memory_bytes: float, dp_options: Iterable[int],
              tp_options: Iterable[int] = (1,), stages: Iterable[int] = tuple(STAGES),
              micro_batches: Iterable[int] = (1,), measure: str = "total",
              **plan_kwargs) -> list[Plan]:
    """The plans of the grid that fit in ``memory_bytes`` per rank, cheapest first (see the
    module docstring); an empty list when none does. ``plan_kwargs`` go to :func:`plan`
    (param_dtype is required there)."""
    if memory_bytes <= 0:
        raise ValueError(f"memory_bytes={memory_bytes!r}: must be positive")
    grid = candidates(spec, dp_options=dp_options, tp_options=tp_options, stages=stages,
                      micro_batches=micro_batches, **plan_kwargs)
    if not grid:
        raise ValueError("recommend: the grid is empty; give at least one dp, tp, stage and "
                         "micro-batch option")
    fitting = sorted((p for p in grid if fits(p, memory_bytes, measure=measure)), key=cost_key)
    if not fitting:
        log.info("%s", no_fit_message(grid, memory_bytes, measure=measure))
    return fitting


def no_fit_message(grid: list[Plan], memory_bytes: float, *, measure: str = "total") -> str:
    """Why nothing fits: the smallest configuration tried and what it needs."""
    best = min(grid, key=lambda p: (measured(p, measure), cost_key(p)))
    return (f"no configuration fits in {memory_bytes / 1e9:.3g} GB per rank ({measure}): the "
            f"smallest tried, stage {best.stage} dp={best.dp} tp={best.tp} "
            f"micro_batch={best.micro_batch}, needs {measured(best, measure) / 1e9:.3g} GB; "
            "allow more devices (dp, tp), a higher stage, a smaller micro-batch or "
            "activation checkpointing")
