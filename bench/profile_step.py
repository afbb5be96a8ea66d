"""Where a system's step time goes: per-phase times on every rank, and rank 0 under torch.profiler.

    .venv/bin/python bench/profile_step.py zt-s2 fsdp2-s2 [--bf16] [--steps 3] [--top 25]

Phases are timed separately (forward, backward, optimizer.step, zero_grad); the profiler table is
sorted by self CPU time, so time spent inside collectives' waits and copies shows by name.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import BenchConfig, rank_batches, spawn
from systems import SYSTEMS, build

PHASES = ("forward", "backward", "optimizer.step", "zero_grad")
# zerotrain internals timed (inclusive, per step) with --internals; patched in this process only
INTERNALS = [("zerotrain.parallel.zero.hooks", "StepSchedule", "end_backward"),
             ("zerotrain.parallel.zero.hooks", "StepSchedule", "finish"),
             ("zerotrain.parallel.zero.unit", "ShardedUnit", "reduce_grads"),
             ("zerotrain.parallel.zero.unit", "ShardedUnit", "_pack"),
             ("zerotrain.parallel.zero.unit", "ShardedUnit", "unshard"),
             ("zerotrain.parallel.zero.unit", "ShardedUnit", "params_from_master"),
             ("zerotrain.parallel.zero.optimizer", "ShardedOptimizer", "_run_inner"),
             ("zerotrain.parallel.clip", None, "global_grad_norm"),
             ("zerotrain.distributed.comm", "Handle", "wait")]


def _instrument(totals: dict) -> None:
    import functools
    import importlib

    for module, cls, attr in INTERNALS:
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a, _fn=fn, _key=f"{cls or module.rsplit('.', 1)[1]}.{attr}", **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                totals[_key] = totals.get(_key, 0.0) + time.perf_counter() - t0
        setattr(owner, attr, timed)


def _step(runner, x, y) -> list[float]:
    marks = [time.perf_counter()]
    with runner._context():
        loss = runner.forward_model(x, y)
    marks.append(time.perf_counter())
    loss.backward()
    marks.append(time.perf_counter())
    runner.optimizer.step()
    marks.append(time.perf_counter())
    runner.optimizer.zero_grad()
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])]


def profile(rank, world, name, cfg, bf16, top, internals):
    totals: dict[str, float] = {}
    if internals:
        _instrument(totals)
    runner = build(SYSTEMS[name], cfg, bf16=bf16)
    batches = rank_batches(cfg, rank)
    for x, y in batches[:cfg.warmup]:
        _step(runner, x, y)
    totals.clear()
    phases = [_step(runner, x, y) for x, y in batches[cfg.warmup:cfg.warmup + cfg.steps]]
    inner = {k: v / cfg.steps for k, v in totals.items()}
    table = None
    if top:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for x, y in batches[cfg.warmup:cfg.warmup + 2]:
                _step(runner, x, y)
        table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top) if rank == 0 else None
    else:
        torch.distributed.barrier()
    return {"phases": [statistics.median(col) for col in zip(*phases)], "table": table, "internals": inner}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("systems", nargs="+", choices=list(SYSTEMS))
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=0, help="rows of the profiler table (0: no profiler)")
    ap.add_argument("--internals", action="store_true", help="time zerotrain's step phases (inclusive)")
    args = ap.parse_args()
    cfg = BenchConfig(steps=args.steps)
    for name in args.systems:
        res = spawn(profile, cfg.world, name, cfg, args.bf16, args.top, args.internals)
        for rank, r in enumerate(res):
            print(f"{name} rank {rank}: " + ", ".join(f"{p} {t * 1e3:.0f} ms" for p, t in zip(PHASES, r["phases"])))
            if r["internals"]:
                print("    per step, inclusive: " + ", ".join(f"{k} {v * 1e3:.0f} ms"
                                                           for k, v in r["internals"].items()))
        if res[0]["table"]:
            print(res[0]["table"])


if __name__ == "__main__":
    main()
