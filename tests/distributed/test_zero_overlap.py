"""The overlap machinery under a slow network.

Every send and collective is issued late — from one thread per rank, in issue order, after a
rank-dependent delay — so data arrives well after the call that asked for it. A schedule that
reads a gathered unit before waiting for it, reuses a buffer still being sent, or lets the
post-step gather race the next forward trains different numbers; this one must train bitwise
the same as without the delay, with either collective algorithm. The trace shows reductions
overlapping backward (up to ``MAX_IN_FLIGHT`` outstanding) and never more.
"""
from __future__ import annotations

import queue
import threading
import time

import pytest
import torch
import torch.distributed as dist

from harness import spawn
from zero_cases import STEPS, Case, run_sharded
from zerotrain.distributed import comm
from zerotrain.parallel.zero.hooks import StepSchedule

PATCHED = ("isend", "all_reduce", "all_gather_single", "reduce_scatter_single")


class _Late:
    """A Work whose transfer has not even been issued until the network thread gets to it."""

    def __init__(self):
        self.issued = threading.Event()
        self.work = None

    def wait(self, timeout=None):
        self.issued.wait()
        return self.work.wait()

    def is_completed(self) -> bool:
        return self.issued.is_set() and self.work.is_completed()


class SlowNetwork:
    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.jobs: queue.Queue = queue.Queue()
        self.originals = {name: getattr(dist, name) for name in PATCHED}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            late, fn, args, kwargs = self.jobs.get()
            time.sleep(self.delay_s)
            late.work = fn(*args, **kwargs)
            late.issued.set()

    def _wrap(self, fn):
        def issue(*args, **kwargs):
            if not kwargs.get("async_op", True):
                return fn(*args, **kwargs)
            late = _Late()
            self.jobs.put((late, fn, args, kwargs))
            return late
        return issue

    def __enter__(self):
        for name, fn in self.originals.items():
            setattr(dist, name, self._wrap(fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(dist, name, fn)
        return False


def _snapshot(result):
    return result["losses"], result["norms"], {k: v.clone() for k, v in result["params"].items()}


def overlap_worker(mesh, cases):
    out = {}
    for case in cases:
        for p2p in (True, False):
            comm.set_point_to_point(p2p)
            plain = _snapshot(run_sharded(mesh, case))
            with SlowNetwork(delay_s=0.004 * (mesh.rank + 1)):
                slow = _snapshot(run_sharded(mesh, case))
            out[case.name, p2p] = (plain, slow)
    comm.set_point_to_point(True)
    return out


CASES = [Case("gpt", s, torch.float32) for s in (0, 1, 2, 3)] + [Case("gpt", 3, torch.float32, recompute=True)]


@pytest.mark.parametrize("world", [2, 3])
def test_late_collectives_train_bitwise_the_same(world):
    results = spawn(overlap_worker, world, CASES, timeout=400)
    for rank, res in enumerate(results):
        for key, (plain, slow) in res.items():
            assert plain[0] == slow[0] and plain[1] == slow[1], (rank, key, plain[:2], slow[:2])
            for name, value in plain[2].items():
                assert torch.equal(value, slow[2][name]), (rank, key, name)


def in_flight_worker(mesh, stage):
    import zerotrain
    from models import make_batch, make_model

    torch.manual_seed(0)
    model = make_model("gpt")
    model.blocks.extend(type(model.blocks[0])(8) for _ in range(4))    # 7 units: room to overlap
    zerotrain.shard_model(model, stage=stage, mesh=mesh)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-2)
    counts = []
    with SlowNetwork(delay_s=0.01):
        for step in range(STEPS):
            model.zero_state.schedule.trace = []
            x, y = make_batch("gpt", 8, step)
            model(x[mesh.rank::mesh.dp], y[mesh.rank::mesh.dp]).backward()
            counts += [e.detail for e in model.zero_state.schedule.trace if e.event == "in_flight"]
            opt.step()
            opt.zero_grad()
    return counts


@pytest.mark.parametrize("stage", [2, 3])
def test_reductions_overlap_backward_but_never_more_than_max_in_flight(stage):
    counts = spawn(in_flight_worker, 2, stage, timeout=240)[0]
    assert counts, "every reduction records how many are outstanding"
    assert max(counts) <= StepSchedule.MAX_IN_FLIGHT, counts
    assert max(counts) == StepSchedule.MAX_IN_FLIGHT, f"reductions never overlapped: {counts}"
