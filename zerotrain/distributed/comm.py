"""The only module that issues collectives.

Every collective in zerotrain goes through these functions so that

* averaging is done the same way everywhere (SUM, then divide: gloo has no AVG),
* bytes and calls are counted per collective (``comm_report()``),
* a group of size one costs nothing and needs no initialised process group.

Byte accounting. ``bytes`` is the *logical volume* in the sense of the ZeRO paper: an all-gather
or a reduce-scatter of a buffer of Ψ elements moves Ψ elements, an all-reduce moves 2Ψ (it is a
reduce-scatter followed by an all-gather). ``wire_bytes`` is what one rank sends on a ring:
``bytes * (N - 1) / N``. Both are counted in the dtype actually communicated.

Groups are always arguments. ``None`` here means "a group of one" (no process group), never the
default world group: callers hold their groups in a :class:`~zerotrain.distributed.mesh.Mesh`.

Algorithms. On gloo with CPU tensors, reduce-scatter and all-gather are built from point-to-point
messages (:mod:`~zerotrain.distributed.p2p`); other backends (NCCL) use their native collectives.
``set_point_to_point(False)`` forces the native ones everywhere (the tests run both).

Order and failures. Every collective is numbered and may carry a ``label`` (the sharded unit's
module name); ``set_step`` tags them with the training step (:mod:`~zerotrain.distributed.calls`,
which also holds the debug-mode cross-check). A collective that fails because a peer failed raises
:class:`~zerotrain.distributed.errors.PeerFailure` naming the rank that failed first and its
error, as the :mod:`~zerotrain.distributed.watchdog` learned it, instead of the transport's
"connection closed".
"""
from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import calls, p2p
from .calls import set_step
from .errors import DistributedError

__all__ = [
    "group_size", "group_rank", "all_reduce", "all_gather", "reduce_scatter", "broadcast",
    "all_gather_object", "Handle", "comm_report", "reset_comm_report", "set_trace", "get_trace",
    "reduce_scatter_scratch_numel", "set_point_to_point", "forget_groups", "set_step",
]


@dataclass
class _CollectiveCount:
    calls: int = 0
    bytes: int = 0
    wire_bytes: float = 0.0


@dataclass
class _Stats:
    counters: dict = field(default_factory=lambda: defaultdict(_CollectiveCount))
    trace: list | None = None          # when set, every collective is appended (debug mode)
    lock: threading.Lock = field(default_factory=threading.Lock)


_STATS = _Stats()


def set_point_to_point(enabled: bool) -> None:
    """Use point-to-point reduce-scatter / all-gather on gloo CPU groups (the default) or not."""
    p2p.set_enabled(enabled)


def forget_groups() -> None:
    """Drop per-group state (backend, message tags, sequence numbers); called when the process
    groups are destroyed, since a later group may reuse a destroyed one's id."""
    p2p.forget_groups()
    calls.forget()


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


class Handle:
    """What an async collective returns: ``wait()`` it, then read the result.

    ``is_completed()`` asks the backend whether the transfers have finished (without waiting);
    ``waited`` is True once ``wait()`` has run, including the bookkeeping attached with ``then``
    (summing received chunks, returning scratch), which only ``wait()`` performs."""

    def __init__(self, work=None, then=None, call: calls.Call | None = None):
        self._work = [] if work is None else (list(work) if isinstance(work, (list, tuple)) else [work])
        self._then = then
        self._call = call

    def wait(self):
        with calls.waiting(self._call):
            while self._work:
                try:
                    self._work[0].wait()
                except DistributedError:
                    raise
                except RuntimeError as exc:     # the transport's view of a peer's failure
                    raise _explain(exc, self._call) from exc
                self._work.pop(0)
        if self._then is not None:
            then, self._then = self._then, None
            then()

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._work)

    @property
    def waited(self) -> bool:
        return not self._work and self._then is None


def _explain(exc: Exception, call) -> Exception:
    from .watchdog import explain
    return explain(exc, call)


def _record(name: str, tensor: torch.Tensor, group, volume_factor: int, label: str | None) -> calls.Call:
    n = group_size(group)
    nbytes = tensor.numel() * tensor.element_size() * volume_factor
    with _STATS.lock:
        c = _STATS.counters[name]
        c.calls += 1
        c.bytes += nbytes
        c.wire_bytes += nbytes * (n - 1) / n
        if _STATS.trace is not None:
            _STATS.trace.append((name, str(tensor.dtype), tuple(tensor.shape), n))
    return calls.begin(name, tensor, group, label)


def _finish(work, then, async_op, call):
    handle = Handle(work, then, call)
    if not async_op:
        handle.wait()
    return handle


def all_reduce(tensor: torch.Tensor, group, *, op: str = "sum", async_op: bool = False,
               label: str | None = None) -> Handle:
    """In-place all-reduce; ``op`` is "sum", "avg" (sum then divide) or "max"."""
    if op not in ("sum", "avg", "max"):
        raise ValueError(f"all_reduce op must be 'sum', 'avg' or 'max', got {op!r}")
    n = group_size(group)
    if n == 1:
        return Handle()
    call = _record("all_reduce", tensor, group, 2, label)
    red = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
    work = dist.all_reduce(tensor, op=red, group=group, async_op=True)
    then = (lambda: tensor.div_(n)) if op == "avg" else None
    return _finish(work, then, async_op, call)


def all_gather(output: torch.Tensor, shard: torch.Tensor, group, *, async_op: bool = False,
               label: str | None = None) -> Handle:
    """Gather equal 1-D shards into ``output`` (``output.numel() == N * shard.numel()``)."""
    n = group_size(group)
    if output.numel() != n * shard.numel():
        raise ValueError(f"all_gather: output has {output.numel()} elements, expected {n} x {shard.numel()}")
    if n == 1:
        if output.data_ptr() != shard.data_ptr():
            output.copy_(shard.view_as(output))
        return Handle()
    call = _record("all_gather", output, group, 1, label)
    if p2p.use_p2p(group, output):
        return _finish(p2p.all_gather(output, shard, group, n, group_rank(group)), None, async_op, call)
    work = dist.all_gather_single(output, shard, group=group, async_op=True)
    return _finish(work, None, async_op, call)


def reduce_scatter(output: torch.Tensor, full: torch.Tensor, group, *, async_op: bool = False,
                   scratch: torch.Tensor | None = None, label: str | None = None) -> Handle:
    """SUM-reduce ``full`` over the group and leave this rank's 1/N slice in ``output``.

    ``output`` may be this rank's own chunk of ``full`` (an in-place reduce-scatter); the other
    chunks of ``full`` are then left as they were. ``scratch``: an optional 1-D buffer of
    ``full``'s dtype with at least ``reduce_scatter_scratch_numel(...)`` elements, used instead of
    allocating one (it must stay untouched until the handle is waited on).
    """
    n = group_size(group)
    if full.numel() != n * output.numel():
        raise ValueError(f"reduce_scatter: input has {full.numel()} elements, expected {n} x {output.numel()}")
    if _overlaps(output, full) and output.data_ptr() != full.data_ptr() + group_rank(group) * output.nbytes:
        raise ValueError("reduce_scatter: an output inside the input must be this rank's own chunk "
                         "(full.view(N, -1)[rank]); pass a separate output tensor otherwise")
    need = reduce_scatter_scratch_numel(output, full, group)
    if not need:
        scratch = None                    # this algorithm receives straight into ``output``
    elif scratch is None:
        scratch = torch.empty(need, dtype=full.dtype, device=full.device)
    elif scratch.numel() < need or scratch.dtype != full.dtype or scratch.device != full.device:
        raise ValueError(f"reduce_scatter: scratch must hold {need} {full.dtype} elements on {full.device}, "
                         f"got {scratch.numel()} {scratch.dtype} on {scratch.device}")
    if n == 1:
        if output.data_ptr() != full.data_ptr():
            output.copy_(full.view_as(output))
        return Handle()
    call = _record("reduce_scatter", full, group, 1, label)
    if p2p.use_p2p(group, full):
        works, then = p2p.reduce_scatter(output, full, group, n, group_rank(group), scratch=scratch,
                                         in_place=_overlaps(output, full))
        return _finish(works, then, async_op, call)
    if _overlaps(output, full):
        tmp = scratch[:output.numel()].view_as(output)
        work = dist.reduce_scatter_single(tmp, full, group=group, async_op=True)
        return _finish(work, lambda: output.copy_(tmp), async_op, call)
    work = dist.reduce_scatter_single(output, full, group=group, async_op=True)
    return _finish(work, None, async_op, call)


def reduce_scatter_scratch_numel(output: torch.Tensor, full: torch.Tensor, group) -> int:
    """How many elements of scratch ``reduce_scatter(output, full, group)`` needs (0: none)."""
    n = group_size(group)
    if n == 1:
        return 0
    in_place = _overlaps(output, full)
    if p2p.use_p2p(group, full):
        return (n - 1 if in_place else n - 2) * output.numel()
    return output.numel() if in_place else 0


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def broadcast(tensor: torch.Tensor, group, *, src_group_rank: int = 0, label: str | None = None) -> None:
    if group_size(group) == 1:
        return
    call = _record("broadcast", tensor, group, 1, label)
    _finish(dist.broadcast(tensor, group=group, group_src=src_group_rank, async_op=True), None, False, call)


def all_gather_object(obj, group, *, label: str | None = None) -> list:
    """Gather a small picklable object from every rank (used for agreement checks, not data)."""
    if group_size(group) == 1:
        return [obj]
    out = [None] * group_size(group)
    with _STATS.lock:
        _STATS.counters["all_gather_object"].calls += 1
    call = calls.begin("all_gather_object", None, group, label)
    with calls.waiting(call):
        try:
            dist.all_gather_object(out, obj, group=group)
        except DistributedError:
            raise
        except RuntimeError as exc:
            raise _explain(exc, call) from exc
    return out


def comm_report(reset: bool = False) -> dict[str, dict]:
    """Calls, logical bytes and ring wire bytes per collective since the last reset."""
    with _STATS.lock:
        report = {k: {"calls": c.calls, "bytes": c.bytes, "wire_bytes": c.wire_bytes}
                  for k, c in _STATS.counters.items() if c.calls}
        if reset:
            _STATS.counters.clear()
    return report


def reset_comm_report() -> None:
    comm_report(reset=True)


def set_trace(enabled: bool) -> None:
    """Record every collective (name, dtype, shape, group size) in order, for the debug mode."""
    with _STATS.lock:
        _STATS.trace = [] if enabled else None


def get_trace() -> list:
    with _STATS.lock:
        return list(_STATS.trace or [])
