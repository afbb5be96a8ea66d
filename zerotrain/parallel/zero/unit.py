"""A sharded unit: one flat buffer for a group of parameters, and the three things done to it —
unshard (all-gather), reshard (free), reduce_grads (all-reduce or reduce-scatter).

What a unit holds per stage (Ψ = its padded size, N = dp size, S = Ψ/N); every tensor is
created in ``__init__`` and only its contents (or, for ``full`` at stage 3, its storage) change:

============  =====================  ==========================  ==============================
stage         parameters             gradients                   master (fp32) / optimizer view
============  =====================  ==========================  ==============================
0             ``full`` (Ψ)           ``grad_full`` (Ψ, averaged)  all Ψ
1             ``full`` (Ψ)           ``grad_full`` (Ψ, own slice  own slice S
                                     holds the reduced SUM)
2             ``full`` (Ψ)           ``grad_shard`` (S, SUM)      own slice S
3             ``shard`` (S); ``full``  ``grad_shard`` (S, SUM)    own slice S
              gathered per use
============  =====================  ==========================  ==============================

``master_storage`` says what the master is: the parameter shard itself, a view of ``full``
(pure fp32/fp64 training keeps no second copy) or a separate copy (mixed precision).

States (``states.py`` has the transition tables; only this class changes them):

* ``param_state``: SHARDED → GATHERING → UNSHARDED → SHARDED (``unshard`` / ``wait`` / ``reshard``).
* ``grad_state``: EMPTY → (LOCAL) → REDUCING → REDUCED → STEPPED → ... ; ``zero_grads`` → EMPTY.
  A reduction from REDUCED or REDUCED_LOCAL adds onto the buffers (accumulation), from any other
  state it overwrites them; ``step()`` is allowed from REDUCED (or EMPTY: zero gradients) only.
"""
from __future__ import annotations

import enum
import os
import weakref
from dataclasses import dataclass

import torch

from ...distributed import comm
from .flat import FlatLayout, flatten_into
from .materialize import swap_in
from . import offload as _offload
from .offload import HostState, OffloadPolicy, host_buffer


def offload_moves(device) -> bool:
    return _offload.moves_to_host(device)
from .policy import Reduce, StagePolicy
from .scratch import ScratchPool
from .states import ACCUMULATES, GradEvent, GradState, ParamState, next_grad_state


class MasterStorage(enum.Enum):
    PARAM_SHARD = "the stage-3 parameter shard"
    PARAM_FULL = "a view of the full parameters"
    COPY = "a separate copy in the master dtype"
    HOST = "a copy in host memory (ZeRO-Offload)"


@dataclass(frozen=True)
class UnitDtypes:
    param: torch.dtype       # what the model computes with
    master: torch.dtype      # what the optimizer updates (fp32, fp64 for an fp64 model)
    reduce: torch.dtype      # what gradients are reduced and accumulated in


@dataclass(frozen=True)
class ParamSlice:
    """The part of one parameter inside this rank's owned region of its unit."""
    unit: "ShardedUnit"
    index: int               # the parameter's position in the unit
    flat: tuple[int, int]    # [start, end) in the unit's flat buffer
    span: tuple[int, int]    # [lo, hi) in the parameter's own flattened elements

    @property
    def name(self) -> str:
        return self.unit.names[self.index]

    @property
    def param(self) -> torch.nn.Parameter:
        return self.unit.params[self.index]

    @property
    def master(self) -> torch.Tensor:
        lo = self.unit.region[0]
        return self.unit.master[self.flat[0] - lo:self.flat[1] - lo]

    @property
    def grad(self) -> torch.Tensor:
        lo = self.unit.region[0]
        return self.unit.grad_region()[self.flat[0] - lo:self.flat[1] - lo]


def _free(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(0)


def _alloc(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(t.numel() * t.element_size())


class ShardedUnit:
    def __init__(self, module, named_params, *, index: int, policy: StagePolicy, group,
                 dtypes: UnitDtypes, scratch: ScratchPool | None = None, name: str = "", device=None):
        self.module, self.index, self.policy, self.group = module, index, policy, group
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        # the unit's module name (by default the parameters' common prefix) names it in errors and
        # labels its collectives for the collective-order checker
        self.name = name or ".".join(os.path.commonprefix([n.split(".")[:-1] for n in self.names])) or "root"
        self.label = self.name
        self.scratch = scratch or ScratchPool(keep=0)
        self.dtypes = dtypes
        self.rank, self.world = comm.group_rank(group), comm.group_size(group)
        self.layout = FlatLayout.build([(n, p.shape) for n, p in named_params], self.world)
        self.lo, self.hi = self.layout.shard_range(self.rank)
        self.region = policy.owned_region(self.layout.padded, self.world, self.rank)
        self.master_storage = (MasterStorage.COPY if dtypes.param != dtypes.master else
                               MasterStorage.PARAM_SHARD if policy.shard_params else MasterStorage.PARAM_FULL)
        self._allocate(torch.device(device) if device is not None else self.params[0].device)
        self.param_state = ParamState.SHARDED if policy.shard_params else ParamState.UNSHARDED
        self.grad_state = GradState.EMPTY
        self._gather_handle: comm.Handle | None = None
        self._ready: set[int] = set()       # parameters whose gradient arrived in this backward
        self.host: HostState | None = None  # ZeRO-Offload: set by ``offload``
        self._send: torch.Tensor | None = None  # stages 2-3: .grad views live here until reduced

    def _allocate(self, device: torch.device) -> None:
        """Every tensor the unit will hold, with its aliasing fixed here (``master_storage``)."""
        if device.type == "meta":
            raise ValueError(f"{self.name}: parameters on the meta device need a device to materialise on")
        padded, shard, dt = self.layout.padded, self.layout.shard_numel, self.dtypes
        self.full = torch.empty(padded, dtype=dt.param, device=device)
        self.shard = torch.empty(shard, dtype=dt.param, device=device) if self.policy.shard_params else None
        if self.master_storage is MasterStorage.COPY:
            self.master = torch.empty(self.region[1] - self.region[0], dtype=dt.master, device=device)
        else:
            self.master = self.shard if self.policy.shard_params else self.full[self.region[0]:self.region[1]]
        # the gradient buffer holds no memory until a backward needs it, and gives it back on
        # zero_grad(set_to_none=True): a forward's activations never share the peak with it
        self.grad_full = None if self.policy.shard_grads else torch.empty(padded, dtype=dt.reduce, device=device)
        self.grad_shard = torch.empty(shard, dtype=dt.reduce, device=device) if self.policy.shard_grads else None
        _free(self.grad_full if self.grad_shard is None else self.grad_shard)
        if self.policy.shard_params:
            _free(self.full)                  # allocated by each gather, freed after each use

    # ---------------------------------------------------------------- construction
    def adopt_params(self, *, sync_from_rank0: bool) -> None:
        """Take the module's current parameter values into flat storage (dp rank 0's values on
        every rank if asked); each parameter becomes a view of ``full``."""
        init = flatten_into(self.new_values(), [p.detach() for p in self.params], self.layout)
        self.load_values(init, sync_from_rank0=sync_from_rank0)
        self.bind_params()

    def new_values(self) -> torch.Tensor:
        """A flat buffer to assemble this unit's initial values in (master precision or finer)."""
        dtype = torch.promote_types(self.dtypes.master, self.params[0].dtype)
        return torch.empty(self.layout.padded, dtype=dtype, device=self.full.device)

    def load_values(self, init: torch.Tensor, *, sync_from_rank0: bool) -> None:
        """Fill the parameters (what this stage keeps of them) and the master from ``init``, a
        flat buffer of every value; dp rank 0's ``init`` wins if ``sync_from_rank0``."""
        if sync_from_rank0:
            comm.broadcast(init, self.group, label=self.label)
        if self.policy.shard_params:
            _alloc(self.full)
        self.full.copy_(init)
        if self.shard is not None:
            self.shard.copy_(self.full[self.lo:self.hi])
        if self.separate_master:
            self.master.copy_(init[self.region[0]:self.region[1]])
        if self.policy.shard_params:
            _free(self.full)

    def bind_params(self) -> None:
        """Make each parameter a view of ``full`` (views stay valid while stage 3 frees and
        refills its storage); a parameter still on the meta device gets its storage this way."""
        freed = self.param_state is ParamState.SHARDED
        if freed:
            _alloc(self.full)                 # views of a 0-byte storage cannot be made
        for p, view in zip(self.params, self.layout.views(self.full)):
            if p.is_meta:     # off meta first; then .data, so the parameter keeps its own version
                swap_in(p, view.new_empty(0))      # counter (gathers into ``full`` must not bump it)
            p.data = view
            p._zt_unit = weakref.ref(self)    # zero.GatheredParameters finds the unit from a parameter
        if freed:
            _free(self.full)

    @property
    def separate_master(self) -> bool:
        """The master is its own tensor (not the parameters' storage): updates must be copied over."""
        return self.master_storage in (MasterStorage.COPY, MasterStorage.HOST)

    def offload(self, policy: OffloadPolicy) -> None:
        """Move the master (and so the optimizer state built on it) to host memory, with a host
        buffer for the reduced gradient. Before the optimizer is built. On the CPU: nothing moves."""
        if self.host is not None:
            return
        if not offload_moves(self.full.device):
            self.host = HostState(self.master, None)
            return
        master = host_buffer(self.master, self.dtypes.master, policy.pin_memory)
        master.copy_(self.master)
        self.master, self.master_storage = master, MasterStorage.HOST
        self.host = HostState(master, host_buffer(self.master, self.dtypes.reduce, policy.pin_memory))

    def step_grads(self) -> torch.Tensor:
        """The reduced gradient the optimizer reads: the host copy when offloaded, else on device."""
        return self.host.grads if self.host is not None and self.host.moves else self.grad_region()

    def owned_slices(self) -> list[ParamSlice]:
        """One entry per parameter overlapping this rank's owned region, in flat order."""
        return [ParamSlice(self, i, (s, e), (s - self.layout.slots[i].offset, e - self.layout.slots[i].offset))
                for i, s, e in self.layout.pieces_in(*self.region)]

    # ---------------------------------------------------------------- parameters
    def unshard(self, *, async_op: bool = False) -> None:
        """All-gather the full parameters (idempotent; stage 3 only does work)."""
        if self.param_state is ParamState.UNSHARDED:
            return
        if self.param_state is ParamState.SHARDED:
            _alloc(self.full)
            self._gather_handle = comm.all_gather(self.full, self.shard, self.group, async_op=True,
                                                  label=self.label)
            self.param_state = ParamState.GATHERING
        if not async_op:
            self._gather_handle.wait()
            self._gather_handle = None
            self.param_state = ParamState.UNSHARDED

    def reshard(self) -> None:
        if not self.policy.shard_params or self.param_state is ParamState.SHARDED:
            return
        if self.param_state is ParamState.GATHERING:
            self._gather_handle.wait()
            self._gather_handle = None
        _free(self.full)
        self.param_state = ParamState.SHARDED

    def params_from_master(self) -> None:
        """Make the parameters reflect the updated master (stages 1–2 all-gather them, async)."""
        if self.policy.gather_after_step:
            self.wait_params()                # a gather still in flight would overwrite the slice
        if self.separate_master:
            target = self.shard if self.policy.shard_params else self.full[self.region[0]:self.region[1]]
            target.copy_(self.master, non_blocking=True)
        if self.policy.gather_after_step:
            # In place (the input is this rank's slice of the output: no extra buffer) and
            # asynchronous: the next forward waits for each unit just before using it, so the
            # gather overlaps the forward of the units before it.
            self._gather_handle = comm.all_gather(self.full, self.full[self.lo:self.hi], self.group,
                                                  async_op=True, label=self.label)
            self.param_state = ParamState.GATHERING

    def load_full_from(self, src: int) -> None:
        """``full`` was changed on dp rank ``src`` (``zero.GatheredParameters(modifier_rank=...)``):
        take those values everywhere, into the shard and the master too. Needs UNSHARDED."""
        self.wait_params()
        comm.broadcast(self.full, self.group, src_group_rank=src, label=self.label)
        if self.shard is not None:
            self.shard.copy_(self.full[self.lo:self.hi])
        if self.separate_master:
            self.master.copy_(self.full[self.region[0]:self.region[1]])

    def wait_params(self) -> None:
        """Finish a post-step gather (stages 1–2); a no-op otherwise."""
        if self.param_state is ParamState.GATHERING and not self.policy.shard_params:
            self.unshard()

    # ---------------------------------------------------------------- gradients
    def _move(self, event: GradEvent) -> None:
        self.grad_state = next_grad_state(self.grad_state, event, unit=self.name)

    def _reduced(self) -> None:
        self._move(GradEvent.REDUCED)
        if self.host is not None and self.host.moves:      # device→host now, overlapping backward
            self.host.grads.copy_(self.grad_region(), non_blocking=True)

    @property
    def grads_in_place(self) -> bool:
        """Stages 0–1 with gradients in the parameter dtype: ``.grad`` can be a view of grad_full."""
        return self.grad_full is not None and self.dtypes.reduce == self.dtypes.param

    def _grad_buffer(self) -> torch.Tensor:
        """The gradient buffer (grad_full or grad_shard), allocated and zeroed if it was freed."""
        buf = self.grad_shard if self.policy.shard_grads else self.grad_full
        if buf.untyped_storage().nbytes() == 0:
            _alloc(buf)
            buf.zero_()
        return buf

    def prepare_backward(self) -> None:
        """Before a backward (from a forward in grad mode): point every ``.grad`` that is None at
        its view of the flat gradient buffer, so autograd accumulates in place — no gradient
        allocated per parameter per step and no copy into the buffer afterwards. Gradients a
        step consumed are zeroed first: the next backward starts afresh."""
        if not self.grads_in_place:
            return
        if self.grad_state is GradState.STEPPED:
            self.zero_grads(set_to_none=False)
        for p, view in zip(self.params, self.layout.views(self._grad_buffer())):
            if p.grad is None:
                p.grad = view

    def attach_send_buffer(self) -> None:
        """Stages 2–3 with gradients in the parameter dtype, as this unit's backward begins: point
        every ``.grad`` that is None at its view of the (pooled) buffer the reduce-scatter will
        send, so autograd accumulates there — no per-parameter gradient allocated, and no copy
        into the buffer afterwards. Kept across backward passes inside ``no_sync()``."""
        if not self.policy.shard_grads or self.dtypes.reduce != self.dtypes.param:
            return
        if self._send is None:
            self._send = self.scratch.take(self.layout.padded, self.dtypes.reduce, self.full.device).zero_()
        for p, view in zip(self.params, self.layout.views(self._send)):
            if p.grad is None:
                p.grad = view

    def grad_arrived(self, param_index: int) -> None:
        """Note that a parameter's gradient is in (for this backward)."""
        self._ready.add(param_index)

    @property
    def all_grads_arrived(self) -> bool:
        return len(self._ready) == len(self.params)

    def end_backward(self, *, reduced: bool) -> None:
        """The backward is over; without a reduction its gradients stay local (``no_sync``)."""
        if not reduced and self.grad_state is not GradState.REDUCING:
            self._move(GradEvent.LOCAL)
        self._ready = set()

    def _pack(self, flat: torch.Tensor, *, accumulate: bool) -> None:
        """Move each parameter's ``.grad`` into ``flat`` (adding if ``accumulate``)."""
        keep_views = flat is self.grad_full and self.grads_in_place
        for p, view in zip(self.params, self.layout.views(flat)):
            g = p.grad
            if g is not None and g.data_ptr() == view.data_ptr():
                if not keep_views:            # the buffer is about to be sent, then reused
                    p.grad = None
                continue                      # autograd already accumulated into our buffer
            if g is None:
                if not accumulate:
                    view.zero_()
            elif accumulate:
                view.add_(g)
            else:
                view.copy_(g)
            p.grad = view if keep_views else None
        if not accumulate:
            flat[self.layout.numel:].zero_()

    def _reduce_scatter(self, output, full, then) -> comm.Handle:
        """Reduce-scatter with the algorithm's scratch (if any) from the pool; ``then`` runs after."""
        need = comm.reduce_scatter_scratch_numel(output, full, self.group)
        scratch = self.scratch.take(need, full.dtype, full.device) if need else None
        handle = comm.reduce_scatter(output, full, self.group, async_op=True, scratch=scratch, label=self.label)

        def done():
            if scratch is not None:
                self.scratch.give(scratch)
            then()
        return comm.Handle(handle, done)

    def reduce_grads(self) -> comm.Handle:
        """Reduce this unit's gradients over dp; the returned handle finishes the bookkeeping."""
        accumulate = self.grad_state in ACCUMULATES
        self._move(GradEvent.REDUCE)
        self._grad_buffer()
        if self.policy.shard_grads:
            full, self._send = self._send, None       # autograd may have accumulated into it already
            if full is None:
                full = self.scratch.take(self.layout.padded, self.dtypes.reduce, self.grad_shard.device)
            self._pack(full, accumulate=False)
            if accumulate:
                # fold what this rank accumulated so far into its own chunk, so the reduction
                # lands straight in grad_shard with no second buffer
                full[self.lo:self.hi].add_(self.grad_shard)

            def release():
                self.scratch.give(full)
                self._reduced()
            return self._reduce_scatter(self.grad_shard, full, release)
        self._pack(self.grad_full, accumulate=accumulate)
        if self.policy.reduce is Reduce.ALL_REDUCE_AVG:
            work = comm.all_reduce(self.grad_full, self.group, op="avg", async_op=True,
                                  label=self.label)
            return comm.Handle(work, self._reduced)

        def drop_other_slices():          # they were this rank's local terms, now sent
            self.grad_full[:self.lo].zero_()
            self.grad_full[self.hi:].zero_()
            self._reduced()
        return self._reduce_scatter(self.grad_full[self.lo:self.hi], self.grad_full, drop_other_slices)

    def grad_region(self) -> torch.Tensor:
        """The reduced gradient matching ``master`` (SUM over dp for stages 1–3)."""
        buf = self._grad_buffer()
        return buf if self.policy.shard_grads else buf[self.region[0]:self.region[1]]

    def mark_stepped(self) -> None:
        self._move(GradEvent.STEP)

    def zero_grads(self, *, set_to_none: bool = True) -> None:
        """Drop the gradients: free the buffer (``set_to_none``) or zero it."""
        self._move(GradEvent.ZERO)
        for p in self.params:
            p.grad = None
        if self._send is not None:            # local gradients of no_sync() passes, dropped
            self.scratch.give(self._send)
            self._send = None
        buf = self.grad_shard if self.policy.shard_grads else self.grad_full
        if set_to_none:
            _free(buf)
        elif buf.untyped_storage().nbytes():
            buf.zero_()
