"""The schedule of one training step, driven by module and autograd hooks.

forward:   pre-forward  → unshard this unit (stage 3), prefetch the next one
           post-forward → reshard (stage 3); hook the outputs so backward can announce itself
backward:  pre-backward → unshard again (stage 3), prefetch the previous unit
           post-accumulate-grad per parameter → when a unit's grads are all in, reduce them
           end of backward → reduce what never got a grad, wait for every reduction, reshard

Reductions are issued in one fixed order (reverse of registration, root last) on every rank, so a
parameter that gets no gradient on some rank delays its unit's collective instead of reordering
the collectives — a rank-dependent order would hang or mix up buffers.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils._pytree import tree_flatten

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


class StepSchedule:
    MAX_IN_FLIGHT = 2
    def __init__(self, units: list[ShardedUnit], root: ShardedUnit | None, *, prefetch: bool):
        self.units = units
        self.root = root
        self.prefetch = prefetch
        blocks = [u for u in units if u is not root]
        self.reduce_order = blocks[::-1] + ([root] if root is not None else [])
        self.require_sync = True
        self._fwd_order: list[ShardedUnit] = []
        self._last_fwd_order: list[ShardedUnit] = []
        self._reset_backward()

    def _reset_backward(self):
        self._next_reduce = 0
        self._pending = []
        self._callback_queued = False
        for u in self.units:
            u.grads_ready = set()

    # ------------------------------------------------------------------ forward
    def pre_forward(self, unit: ShardedUnit):
        if unit is self.root or (self.root is None and unit is self.units[0]):
            self._last_fwd_order, self._fwd_order = (self._fwd_order or self._last_fwd_order), []
        self._fwd_order.append(unit)
        unit.unshard()                      # stage 3 gathers; stages 1-2 finish the post-step gather
        if torch.is_grad_enabled():
            unit.grads_into_buffer()
        if not unit.policy.shard_params:
            return
        if self.prefetch:
            nxt = self._neighbour(self._last_fwd_order, unit, +1)
            if nxt is not None:
                nxt.unshard(async_op=True)

    def post_forward(self, unit: ShardedUnit, output):
        if unit.policy.shard_params:
            if unit is self.root:        # anything prefetched but never run is released too
                for u in self.units:
                    u.reshard()
            else:
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
    def _queue_end_callback(self):
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.end_backward)

    def pre_backward(self, unit: ShardedUnit):
        self._queue_end_callback()
        if not unit.policy.shard_params:
            return
        unit.unshard()
        if self.prefetch:
            prev = self._neighbour(self._fwd_order, unit, -1)
            if prev is not None:
                prev.unshard(async_op=True)

    def on_grad(self, unit: ShardedUnit, param_index: int):
        self._queue_end_callback()
        unit.grads_ready.add(param_index)
        self._issue_ready()

    def _issue_ready(self, *, flush: bool = False):
        while self._next_reduce < len(self.reduce_order):
            unit = self.reduce_order[self._next_reduce]
            if not flush and len(unit.grads_ready) < len(unit.params):
                return
            self._next_reduce += 1
            if self.require_sync:
                self._pending.append(unit.reduce_grads())
                self._bound_in_flight()
            if unit is not self.root or flush:
                unit.reshard()

    def _bound_in_flight(self):
        """Each reduction in flight holds its unit's full-size gradient buffer: wait for the oldest
        beyond MAX_IN_FLIGHT so backward's peak memory stays a few units, not the whole model."""
        waiting = [h for h in self._pending if not h.is_completed()]
        for handle in waiting[:-self.MAX_IN_FLIGHT]:
            handle.wait()

    def end_backward(self):
        self._issue_ready(flush=True)
        for handle in self._pending:
            handle.wait()
        for u in self.units:
            u.reshard()
        if self.units:
            self.units[0].scratch.trim(0)     # nothing held between steps: the forward's peak is
                                              # activations, and ZeRO's point is the bytes
        self._reset_backward()

    def finish(self):
        """Called by the optimizer before it reads gradients: nothing may still be in flight."""
        if self._pending:
            self.end_backward()
