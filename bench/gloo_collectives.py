"""What each collective costs on gloo here, at the sizes a ZeRO unit has (2 ranks, one thread each).

    .venv/bin/python bench/gloo_collectives.py [--mib 4 16 64] [--repeat 9]

For a full buffer of B bytes: all_reduce(B); reduce_scatter_single(B -> B/2) and the same result
from all_reduce + copy of the own half, or from send/recv of the peer's half + add (a 2-rank ring,
what ``zerotrain.distributed.comm`` does on gloo); all_gather_single(B/2 -> B) and the same result
from send/recv into place (comm's way) or from one broadcast per rank. Median wall time over
repeats, each after a barrier.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from common import exit_on_sigterm, spawn


def _cases(rank: int, n: int) -> dict:
    full, half, out = torch.randn(n), torch.randn(n // 2), torch.empty(n // 2)
    gathered = torch.empty(n)

    def rs_by_all_reduce():
        dist.all_reduce(full)
        out.copy_(full[rank * (n // 2):(rank + 1) * (n // 2)])

    def rs_by_send_recv():               # the 2-rank ring: send the peer's half, add the received one
        half_n, peer = n // 2, 1 - rank
        recv = torch.empty(half_n)
        works = [dist.isend(full[peer * half_n:(peer + 1) * half_n], peer), dist.irecv(recv, peer)]
        for w in works:
            w.wait()
        torch.add(full[rank * half_n:(rank + 1) * half_n], recv, out=out)

    def ag_by_send_recv():               # what comm.all_gather does on gloo: receive straight into place
        chunks, peer = gathered.chunk(2), 1 - rank
        chunks[rank].copy_(half)
        works = [dist.isend(chunks[rank], peer), dist.irecv(chunks[peer], peer)]
        for w in works:
            w.wait()

    def ag_by_broadcasts():
        chunks = gathered.chunk(2)
        chunks[rank].copy_(half)
        for w in [dist.broadcast(chunks[r], group_src=r, async_op=True) for r in range(2)]:
            w.wait()

    return {"all_reduce": lambda: dist.all_reduce(full),
            "reduce_scatter_single": lambda: dist.reduce_scatter_single(out, full),
            "reduce_scatter as all_reduce + copy": rs_by_all_reduce,
            "reduce_scatter as send/recv + add": rs_by_send_recv,
            "all_gather_single": lambda: dist.all_gather_single(gathered, half),
            "all_gather as send/recv": ag_by_send_recv,
            "all_gather as 2 broadcasts": ag_by_broadcasts}


def run(rank, world, sizes_mib, repeat):
    table = {}
    for mib in sizes_mib:
        for name, fn in _cases(rank, mib * 2 ** 18).items():
            times = []
            for _ in range(repeat):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            table[(mib, name)] = statistics.median(times)
    return table


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[4, 16, 64], help="full buffer sizes (fp32 MiB)")
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    exit_on_sigterm()
    table = spawn(run, 2, args.mib, args.repeat)[0]
    print("| full buffer | " + " | ".join(dict.fromkeys(n for _, n in table)) + " |")
    print("|---|" + "---|" * len(dict.fromkeys(n for _, n in table)))
    for mib in args.mib:
        print(f"| {mib} MiB | " + " | ".join(f"{v * 1e3:.1f} ms" for (m, _), v in table.items() if m == mib) + " |")


if __name__ == "__main__":
    main()
