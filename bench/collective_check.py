"""What the collective-order checker (debug mode) costs: step time with it off and on, side by side.

    .venv/bin/python bench/collective_check.py [--preset tiny] [--stages 0 3] [--rounds 5] [--steps 4]

Two ranks (gloo, one thread each) train the same GPT (the main job's: ``tiny`` preset, micro-batch
16 x 128 tokens per rank) at each ZeRO stage. Each round runs ``--steps`` timed steps with the
checker off, then the same with it on (A B A B ...; the machines are shared and noisy); the table
gives the median step time of each, the ratio, the collectives per step and the time the checker
adds per collective. A second table times one collective alone (an all-gather of a 64 KiB shard,
the size of a tiny-preset block's), off and on, interleaved, median of ``--calls``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import exit_on_sigterm, spawn


def run(rank, world, preset, stages, rounds, steps, n_calls):
    import zerotrain
    from zerotrain.distributed import Mesh, calls, comm
    from zerotrain.model import GPT, get_config
    mesh = Mesh.default()
    cfg = get_config(preset, vocab_size=8192)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randint(0, cfg.vocab_size, (16, cfg.block_size), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (16, cfg.block_size), generator=gen)
    table = {}
    for stage in stages:
        torch.manual_seed(0)
        model = zerotrain.shard_model(GPT(cfg), stage=stage, mesh=mesh)
        opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, None, lr=1e-3)

        def step():
            model(x, y).backward()
            opt.step()
            opt.zero_grad()
        step()                                           # warm-up
        times = {False: [], True: []}
        per_step = {}
        for _ in range(rounds):
            for debug in (False, True):
                calls.set_debug(debug)
                for _ in range(steps):
                    before = calls.issued()
                    comm.all_reduce(torch.zeros(1), mesh.world_group)    # line the ranks up
                    t0 = time.perf_counter()
                    step()
                    times[debug].append(time.perf_counter() - t0)
                    per_step[debug] = calls.issued() - before - 1
        calls.set_debug(False)
        table[stage] = {d: statistics.median(t) for d, t in times.items()}
        table[stage]["calls"] = per_step[True]
        table[stage]["spread"] = {d: (min(t), max(t)) for d, t in times.items()}
    table["alone"] = _one_collective(mesh, calls, comm, n_calls)
    return table


def _one_collective(mesh, calls, comm, n_calls: int) -> dict:
    shard, out = torch.randn(16384), torch.empty(16384 * mesh.world_size)
    times = {False: [], True: []}
    for i in range(2 * n_calls):
        debug = bool(i % 2)
        calls.set_debug(debug)
        comm.all_reduce(torch.zeros(1), mesh.world_group)
        t0 = time.perf_counter()
        comm.all_gather(out, shard, mesh.world_group, label="blocks.0")
        times[debug].append(time.perf_counter() - t0)
    calls.set_debug(False)
    return {d: statistics.median(t) for d, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    exit_on_sigterm()
    table = spawn(run, 2, args.preset, args.stages, args.rounds, args.steps, args.calls)[0]
    alone = table.pop("alone")
    print(f"{args.preset}, 2 ranks, micro-batch 16, {args.rounds} interleaved rounds x {args.steps} steps each")
    print("| stage | collectives / step | step, checker off | step, checker on | on / off | added per collective |")
    print("|---|---|---|---|---|---|")
    for stage, row in table.items():
        off, on, n = row[False], row[True], row["calls"]
        print(f"| {stage} | {n} | {off * 1e3:.1f} ms ({row['spread'][False][0] * 1e3:.0f}-"
              f"{row['spread'][False][1] * 1e3:.0f}) | {on * 1e3:.1f} ms ({row['spread'][True][0] * 1e3:.0f}-"
              f"{row['spread'][True][1] * 1e3:.0f}) | {on / off:.3f} | {(on - off) / n * 1e6:.0f} us |")
    print(f"\none all-gather of a 64 KiB shard, median of {args.calls} each, interleaved: checker off "
          f"{alone[False] * 1e6:.0f} us, on {alone[True] * 1e6:.0f} us ({alone[True] / alone[False]:.2f}x, "
          f"+{(alone[True] - alone[False]) * 1e6:.0f} us per collective)")


if __name__ == "__main__":
    main()
