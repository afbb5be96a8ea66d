"""What this process knows about its collectives: their order, the one it waits in, and (debug
mode) a cross-check that every rank of a group issues the same collective at the same position.

Every collective through :mod:`~zerotrain.distributed.comm` becomes a :class:`Call`: its number
in this process (``index``, all groups), its position in its group's sequence (``seq``), the op,
shape, dtype, an optional label (the sharded unit's module name, e.g. ``blocks.3``) and the
training step: 1 from ``init_distributed`` on, advanced by every ``ShardedOptimizer.step()``
(``set_step`` sets it, as the trainer does on resume). The call a rank is blocked in is kept (``inflight``) so that a
failure or a hang can be described by what the rank was doing.

Debug mode (``init_distributed(debug=True)`` or ``ZEROTRAIN_DEBUG_COLLECTIVES=1``): before each
collective the ranks of its group all-gather a 7-number fingerprint of it (seq, op, numel, dtype,
shape hash, label hash, step) — 56 bytes per rank — and compare. At the first difference every
rank raises the same :class:`CollectiveMismatch` naming, per rank, the step, op, label, dtype and
shape, instead of exchanging mismatched data or hanging. Cost: one small blocking all-gather per
collective (``bench/collective_check.py`` measures it).
"""
from __future__ import annotations

import os
import threading
import time
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import CollectiveMismatch

DEBUG_ENV = "ZEROTRAIN_DEBUG_COLLECTIVES"
_OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_gather_object")


@dataclass(frozen=True)
class Call:
    index: int                 # this process's n-th collective, over all groups (1-based)
    seq: int                   # position in its group's sequence (1-based)
    op: str
    shape: tuple
    dtype: str
    label: str | None
    step: int | None
    group: object = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        label = f" '{self.label}'" if self.label else ""
        shape = f" {self.dtype}{list(self.shape)}" if self.dtype else ""
        step = f" at step {self.step}" if self.step is not None else ""
        return f"collective #{self.index} ({self.op}{label}{shape}){step}"


class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.index = 0
        self.seqs: dict[int, int] = {}
        self.step: int | None = None
        self.debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
        self.inflight: tuple[Call, float] | None = None
        self.ranks: dict[int, list[int]] = {}
        self.counting = False


_S = _State()


def start() -> None:
    """A new process group: count steps from 1 (and count them at all, once per process)."""
    forget()
    _S.step = 1
    if not _S.counting:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        register_optimizer_step_post_hook(_stepped)
        _S.counting = True


def _stepped(optimizer, args, kwargs) -> None:
    # every optimizer fires this hook; count zerotrain's (ShardedOptimizer), not the one it wraps
    if type(optimizer).__module__.startswith("zerotrain.") and _S.step is not None:
        _S.step += 1


def set_debug(enabled: bool) -> None:
    """Turn the cross-check on or off (every rank must choose the same)."""
    _S.debug = bool(enabled)


def debug_enabled() -> bool:
    return _S.debug


def set_step(step: int | None) -> None:
    """The training step this rank is in; collectives and their errors are tagged with it."""
    _S.step = step


def current_step() -> int | None:
    return _S.step


def issued() -> int:
    """How many collectives this process has issued."""
    return _S.index


def issued_by_group() -> dict[str, int]:
    """How many collectives this process has issued on each group, keyed "0,1,2" by its ranks."""
    with _S.lock:
        return {",".join(map(str, _S.ranks[key])): seq for key, seq in _S.seqs.items() if key in _S.ranks}


def group_key(group) -> str:
    return ",".join(map(str, group_ranks(group)))


def forget() -> None:
    with _S.lock:
        _S.index, _S.step, _S.inflight = 0, None, None
        _S.seqs.clear()
        _S.ranks.clear()


def group_ranks(group) -> list[int]:
    """Global ranks of ``group`` (cached)."""
    key = id(group)
    if key not in _S.ranks:
        _S.ranks[key] = dist.get_process_group_ranks(group)
    return _S.ranks[key]


def begin(op: str, tensor: torch.Tensor | None, group, label: str | None) -> Call:
    """Number a collective about to be issued on ``group`` (and cross-check it in debug mode)."""
    group_ranks(group)
    with _S.lock:
        _S.index += 1
        seq = _S.seqs.get(id(group), 0) + 1
        _S.seqs[id(group)] = seq
        call = Call(_S.index, seq, op, tuple(tensor.shape) if tensor is not None else (),
                    str(tensor.dtype).removeprefix("torch.") if tensor is not None else "", label,
                    _S.step, group)
    if _S.debug:
        with waiting(call):
            _cross_check(call)
    return call


class waiting:
    """Context: this thread is blocked in ``call`` (None: leave the record as it is)."""

    def __init__(self, call: Call | None):
        self.call, self.saved = call, None

    def __enter__(self):
        if self.call is not None:
            self.saved = _S.inflight
            _S.inflight = (self.call, time.monotonic())

    def __exit__(self, *exc):
        if self.call is not None:
            _S.inflight = self.saved
        return False


def inflight() -> tuple[Call, float] | None:
    """(the call this process is blocked in, since when (monotonic)), or None."""
    return _S.inflight


def _code(text: str) -> int:
    return zlib.crc32(text.encode("utf-8")) & 0x7FFFFFFF


def _fingerprint(call: Call) -> list[int]:
    numel = 1
    for d in call.shape:
        numel *= d
    return [call.seq, _OPS.index(call.op), numel, _code(call.dtype), _code(repr(call.shape)),
            _code(call.label or ""), -1 if call.step is None else call.step]


def _cross_check(call: Call) -> None:
    group = call.group
    n = dist.get_world_size(group)
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor(_fingerprint(call), dtype=torch.int64, device=device)
    table = torch.empty(n * mine.numel(), dtype=torch.int64, device=device)
    try:
        dist.all_gather_single(table, mine, group=group)
    except RuntimeError as exc:
        from .watchdog import explain
        raise explain(exc, call) from exc
    if bool((table.view(n, -1) == mine).all()):
        return
    # Every rank holds the same table, so every rank gets here and gathers the descriptions.
    described = [None] * n
    dist.all_gather_object(described, call.describe(), group=group)
    ranks = group_ranks(group)
    rows = "; ".join(f"rank {r}: {d}" for r, d in zip(ranks, described))
    raise CollectiveMismatch(
        f"collective order diverged at position {call.seq} of the group of ranks {ranks}: {rows}. "
        "Every rank must issue the same collectives in the same order (same steps, same units, "
        "same shapes)")
