"""The schedule of one training step, driven by module and autograd hooks.

The schedule owns the ``Phase`` (``states.py``); units own their parameter and gradient states.

IDLE → FORWARD (model pre-forward; the order units run in is recorded)
    unit pre-forward   unshard this unit (stage 3; stages 1–2 finish the post-step gather),
                       prefetch the unit that ran after it last time
    unit post-forward  reshard (stage 3); hook the outputs so backward can announce itself
FORWARD → IDLE (model post-forward: release whatever was prefetched but never ran)
IDLE → BACKWARD (the first backward hook)
    pre-backward       unshard again (stage 3), prefetch the unit that ran before it
    unit pre-forward   a recompute (activation checkpointing): unshard only
    unit post-forward  keep the parameters: the unit's own backward still needs them
    post-accumulate-grad per parameter: once a unit's gradients are all in, reduce them (in the
                       fixed order below) and reshard it
BACKWARD → IDLE (end of backward: reduce what never got a grad, wait for every reduction, reshard)
IDLE → STEP → IDLE (``ShardedOptimizer.step``: nothing may be in flight when it reads gradients)

Reductions are issued in one fixed order (reverse of registration, root last) on every rank, so a
parameter that gets no gradient on some rank delays its unit's collective instead of reordering
the collectives — a rank-dependent order would hang or mix up buffers. At most ``MAX_IN_FLIGHT``
reductions are outstanding; each holds a full-size gradient buffer at stages 2–3.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch.utils._pytree import tree_flatten

from .states import Phase
from .unit import ShardedUnit


def _tensors_in(output) -> list[torch.Tensor]:
    """Tensors in a module's output: nested tuples/lists/dicts and dict-like results (e.g. a
    HuggingFace ModelOutput), found even when the container is not a registered pytree node."""
    found, stack = [], [output]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, Mapping):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        else:
            leaves = tree_flatten(obj)[0]
            if not (len(leaves) == 1 and leaves[0] is obj):     # a registered container
                stack.extend(leaves)
    return found


class TraceEvent(NamedTuple):
    """One schedule event, recorded when ``StepSchedule.trace`` is a list (tests, debugging)."""
    phase: Phase
    event: str
    unit: int | None         # the unit's index
    state: object            # the unit's ParamState when the event happened (before acting)
    detail: int | None = None


def _in_backward() -> bool:
    """True while autograd's engine is executing a backward on this thread."""
    return torch._C._current_graph_task_id() != -1


class StepSchedule:
    MAX_IN_FLIGHT = 2

    def __init__(self, units: list[ShardedUnit], root: ShardedUnit | None, *, prefetch: bool):
        self.units = units
        self.root = root
        self.prefetch = prefetch
        blocks = [u for u in units if u is not root]
        self.reduce_order = blocks[::-1] + ([root] if root is not None else [])
        self.phase = Phase.IDLE
        self.sync_grads = True            # False inside ``no_sync()``: backward keeps grads local
        self.trace: list[TraceEvent] | None = None     # when a list, every event is appended
        self._fwd_order: list[ShardedUnit] = []
        self._last_fwd_order: list[ShardedUnit] = []
        self._reset_backward()

    def _reset_backward(self):
        self._next_reduce = 0
        self._pending = []
        self._callback_queued = False

    def _note(self, event: str, unit: ShardedUnit | None = None, detail: int | None = None) -> None:
        if self.trace is not None:
            self.trace.append(TraceEvent(self.phase, event, None if unit is None else unit.index,
                                         None if unit is None else unit.param_state, detail))

    # ------------------------------------------------------------------ forward
    def begin_forward(self) -> None:
        """Model pre-forward. A model forward inside backward (a whole-model recompute) or inside
        a forward (re-entrant call) is not a new forward."""
        if self.phase is Phase.FORWARD or (self.phase is Phase.BACKWARD and _in_backward()):
            return
        if self.phase is Phase.BACKWARD:    # a backward that raised never reached its end
            self.end_backward()
        self.phase = Phase.FORWARD
        if self._fwd_order:
            self._last_fwd_order = self._fwd_order
        self._fwd_order = []
        self._note("begin_forward")

    def end_forward(self) -> None:
        """Model post-forward: anything prefetched but never run is released (stage 3)."""
        if self.phase is not Phase.FORWARD:
            return
        for u in self.units:
            u.reshard()
        self.phase = Phase.IDLE
        self._note("end_forward")

    def pre_forward(self, unit: ShardedUnit):
        self._note("pre_forward", unit)
        if self.phase is Phase.BACKWARD:
            unit.unshard()                  # a recompute: the gather is all it needs
            return
        self._fwd_order.append(unit)
        unit.unshard()                      # stage 3 gathers; stages 1-2 finish the post-step gather
        if torch.is_grad_enabled():
            unit.prepare_backward()
        if self.prefetch and unit.policy.shard_params:
            nxt = self._neighbour(self._last_fwd_order, unit, +1)
            if nxt is not None:
                self._note("prefetch", nxt)
                nxt.unshard(async_op=True)

    def post_forward(self, unit: ShardedUnit, output):
        self._note("post_forward", unit)
        if self.phase is Phase.BACKWARD:
            return output                   # a recompute: backward uses the parameters next
        unit.reshard()
        if torch.is_grad_enabled():
            tensors = [t for t in _tensors_in(output) if t.requires_grad]
            if tensors:
                torch.autograd.graph.register_multi_grad_hook(
                    tensors, lambda grads: self.pre_backward(unit), mode="any")
        return output

    @staticmethod
    def _neighbour(order, unit, step):
        try:
            i = order.index(unit) + step
        except ValueError:
            return None
        return order[i] if 0 <= i < len(order) else None

    # ------------------------------------------------------------------ backward
    def _enter_backward(self):
        if self.phase is not Phase.BACKWARD:
            self.phase = Phase.BACKWARD
            self._note("begin_backward")
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.end_backward)

    def pre_backward(self, unit: ShardedUnit):
        self._enter_backward()
        self._note("pre_backward", unit)
        unit.attach_send_buffer()
        if not unit.policy.shard_params:
            return
        unit.unshard()
        if self.prefetch:
            prev = self._neighbour(self._fwd_order, unit, -1)
            if prev is not None:
                self._note("prefetch", prev)
                prev.unshard(async_op=True)

    def on_grad(self, unit: ShardedUnit, param_index: int):
        self._enter_backward()
        unit.grad_arrived(param_index)
        self._issue_ready()

    def _issue_ready(self, *, flush: bool = False):
        while self._next_reduce < len(self.reduce_order):
            unit = self.reduce_order[self._next_reduce]
            if not flush and not unit.all_grads_arrived:
                return
            self._next_reduce += 1
            if self.sync_grads:
                self._note("reduce", unit)
                self._pending.append(unit.reduce_grads())
                self._bound_in_flight()
            if unit is not self.root or flush:
                unit.reshard()

    def _bound_in_flight(self):
        """Each reduction in flight holds its unit's full-size gradient buffer: wait for the oldest
        beyond MAX_IN_FLIGHT so backward's peak memory stays a few units, not the whole model."""
        for handle in self._pending:
            if handle.is_completed():
                handle.wait()               # finished: run its bookkeeping, return its buffer
        in_flight = [h for h in self._pending if not h.waited]
        for handle in in_flight[:max(len(in_flight) - self.MAX_IN_FLIGHT, 0)]:
            handle.wait()
        self._pending = [h for h in self._pending if not h.waited]
        self._note("in_flight", detail=len(self._pending))

    def end_backward(self):
        self._issue_ready(flush=True)
        for handle in self._pending:
            handle.wait()
        for u in self.units:
            u.end_backward(reduced=self.sync_grads)
            u.reshard()
        if self.units:
            self.units[0].scratch.trim(0)     # nothing held between steps: the forward's peak is
                                              # activations, and ZeRO's point is the bytes
        self._reset_backward()
        self.phase = Phase.IDLE
        self._note("end_backward")

    def finish(self):
        """Before anything reads gradients: no reduction may still be in flight."""
        if self._pending or (self.phase is Phase.BACKWARD and not _in_backward()):
            self.end_backward()

    # ------------------------------------------------------------------ step
    @contextlib.contextmanager
    def step_phase(self):
        self.finish()
        self.phase = Phase.STEP
        self._note("begin_step")
        try:
            yield
        finally:
            self.phase = Phase.IDLE
            self._note("end_step")
