"""A sharded unit: one flat buffer for a group of parameters, and the three things done to it —
unshard (all-gather), reshard (free), reduce_grads (all-reduce or reduce-scatter).

What a unit holds per stage (Ψ = its padded size, N = dp size, S = Ψ/N):

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

When the compute dtype equals the master dtype the master *is* the parameter storage (a view),
so pure fp32 training keeps no second copy.
"""
from __future__ import annotations

import enum
import os

import torch

from ...distributed import comm
from .flat import FlatLayout, flatten_into
from .policy import Reduce, StagePolicy


class UnitState(enum.Enum):
    SHARDED = "sharded"
    GATHERING = "gathering"
    UNSHARDED = "unsharded"


def _free(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(0)


def _alloc(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(t.numel() * t.element_size())


class ScratchPool:
    """Buffers for the reductions of one backward, handed from a finished unit to the next.

    Stages 2–3 pack each unit's gradients into a full-size buffer for the reduce-scatter and
    free it once the collective is done; at most ``MAX_IN_FLIGHT + 1`` are alive at once (the
    schedule bounds reductions in flight). Reusing a finished buffer for the next unit saves
    the allocation and its first touch (on CPU a large allocation is a fresh mmap, page-faulted
    on use). A request is served by the smallest free buffer that is large enough (as a prefix
    view). The schedule empties the pool when backward ends, so nothing is held between steps.
    Stage 1 gets a pool with ``keep=0`` (every buffer freed when given back): pooling its
    reduce-scatter scratch, or keeping buffers across steps, left idle buffers on top of the
    peak and cost the largest stage-1 model at 16 GB a 4% search step, for ~1% of step time.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self._free: list[torch.Tensor] = []

    def take(self, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        device = torch.device(device)
        fits = [b for b in self._free if b.numel() >= numel and b.dtype == dtype and b.device == device]
        if not fits:
            return torch.empty(numel, dtype=dtype, device=device)
        buf = min(fits, key=torch.Tensor.numel)
        self._free = [b for b in self._free if b is not buf]
        return buf[:numel]

    def give(self, buf: torch.Tensor) -> None:
        base = buf if buf._base is None else buf._base
        if len(self._free) < self.keep:
            self._free.append(base)

    def trim(self, keep: int = 0) -> None:
        """Keep the ``keep`` largest free buffers, free the others."""
        self._free = sorted(self._free, key=torch.Tensor.numel, reverse=True)[:keep]

    @property
    def buffers(self) -> list[torch.Tensor]:
        return list(self._free)


class ShardedUnit:
    def __init__(self, module, named_params, *, index: int, policy: StagePolicy, group,
                 param_dtype: torch.dtype, master_dtype: torch.dtype, reduce_dtype: torch.dtype,
                 scratch: ScratchPool | None = None):
        self.module, self.index, self.policy, self.group = module, index, policy, group
        self.scratch = scratch or ScratchPool(keep=0)
        self.names = [n for n, _ in named_params]
        # the unit's module name (the parameters' common prefix) labels its collectives
        self.label = ".".join(os.path.commonprefix([n.split(".")[:-1] for n in self.names])) or "root"
        self.params = [p for _, p in named_params]
        self.param_dtype, self.master_dtype, self.reduce_dtype = param_dtype, master_dtype, reduce_dtype
        self.rank, self.world = comm.group_rank(group), comm.group_size(group)
        self.layout = FlatLayout.build([(n, p.shape) for n, p in named_params], self.world)
        self.lo, self.hi = self.layout.shard_range(self.rank)
        self.state = UnitState.UNSHARDED
        self._gather_handle = None
        self.grad_full = self.grad_shard = None
        self.accum_valid = False          # False: the next reduction starts the accumulation afresh
        self.grads_clean = False          # True: grad_full is known to be all zeros
        self.grads_ready: set[int] = set()

    # ---------------------------------------------------------------- construction
    def materialize(self, *, sync_from_rank0: bool) -> None:
        """Move the parameters into flat storage (and broadcast dp rank 0's values if asked)."""
        device = self.params[0].device
        src_dtype = torch.promote_types(self.master_dtype, self.params[0].dtype)
        init = flatten_into(torch.empty(self.layout.padded, dtype=src_dtype, device=device),
                            [p.detach() for p in self.params], self.layout)
        if sync_from_rank0:
            comm.broadcast(init, self.group, label=self.label)
        region = slice(None) if not self.policy.shard_optimizer else slice(self.lo, self.hi)
        self.full = init.to(self.param_dtype, copy=True)
        for p, view in zip(self.params, self.layout.views(self.full)):
            p.data = view                 # views stay valid while stage 3 frees and refills storage
        self.shard = self.full[self.lo:self.hi].clone() if self.policy.shard_params else None
        same = self.param_dtype == self.master_dtype
        if same:
            self.master = self.shard if self.policy.shard_params else self.full[region]
        else:
            self.master = init[region].to(self.master_dtype, copy=True)
        if self.policy.shard_params:
            _free(self.full)
            self.state = UnitState.SHARDED
        if self.policy.shard_grads:
            self.grad_shard = torch.zeros(self.layout.shard_numel, dtype=self.reduce_dtype, device=device)
        else:
            self.grad_full = torch.zeros(self.layout.padded, dtype=self.reduce_dtype, device=device)
        self.grads_clean = True

    @property
    def grads_in_place(self) -> bool:
        """Stages 0–1 with gradients in the parameter dtype: ``.grad`` can be a view of grad_full."""
        return self.grad_full is not None and self.reduce_dtype == self.param_dtype

    def grads_into_buffer(self) -> None:
        """Before a backward: point every ``.grad`` that is None at its view of the zeroed flat
        gradient buffer, so autograd accumulates in place — no gradient allocated per parameter
        per step and no copy into the buffer afterwards. Only done while the buffer is known to be
        zero (after ``zero_grads``); otherwise ``_pack`` copies as usual."""
        if not (self.grads_in_place and self.grads_clean):
            return
        for p, view in zip(self.params, self.layout.views(self.grad_full)):
            if p.grad is None:
                p.grad = view

    # ---------------------------------------------------------------- parameters
    def unshard(self, *, async_op: bool = False) -> None:
        """All-gather the full parameters (idempotent; stage 3 only does work)."""
        if self.state is UnitState.UNSHARDED:
            return
        if self.state is UnitState.SHARDED:
            _alloc(self.full)
            self._gather_handle = comm.all_gather(self.full, self.shard, self.group, async_op=True,
                                                  label=self.label)
            self.state = UnitState.GATHERING
        if not async_op:
            self._gather_handle.wait()
            self._gather_handle = None
            self.state = UnitState.UNSHARDED

    def reshard(self) -> None:
        if not self.policy.shard_params or self.state is UnitState.SHARDED:
            return
        if self.state is UnitState.GATHERING:
            self._gather_handle.wait()
            self._gather_handle = None
        _free(self.full)
        self.state = UnitState.SHARDED

    def after_step(self) -> None:
        """Make the parameters reflect the updated master (stages 1–2 all-gather them, async)."""
        def refresh(target: torch.Tensor) -> None:
            if target.data_ptr() != self.master.data_ptr() or target.dtype != self.master.dtype:
                target.copy_(self.master)
        if self.policy.shard_params:
            refresh(self.shard)
        elif not self.policy.shard_optimizer:
            refresh(self.full)
        else:
            self.wait_params()                # a gather still in flight would overwrite the slice
            own = self.full[self.lo:self.hi]
            refresh(own)
            # In place (the input is this rank's slice of the output: no extra buffer) and
            # asynchronous: the next forward waits for each unit just before using it, so the
            # gather overlaps the forward of the units before it.
            self._gather_handle = comm.all_gather(self.full, own, self.group, async_op=True, label=self.label)
            self.state = UnitState.GATHERING

    def wait_params(self) -> None:
        """Finish a post-step gather (stages 1–2); a no-op otherwise."""
        if self.state is UnitState.GATHERING and not self.policy.shard_params:
            self.unshard()

    # ---------------------------------------------------------------- gradients
    def _pack(self, flat: torch.Tensor, *, accumulate: bool) -> None:
        """Move each parameter's ``.grad`` into ``flat`` (adding if ``accumulate``)."""
        keep_views = flat is self.grad_full and self.grads_in_place
        self.grads_clean = False
        for p, view in zip(self.params, self.layout.views(flat)):
            g = p.grad
            if g is not None and g.data_ptr() == view.data_ptr():
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
        if self.policy.shard_grads:
            full = self.scratch.take(self.layout.padded, self.reduce_dtype, self.grad_shard.device)
            self._pack(full, accumulate=False)
            if self.accum_valid:
                # fold what this rank accumulated so far into its own chunk, so the reduction
                # lands straight in grad_shard with no second buffer
                full[self.lo:self.hi].add_(self.grad_shard)
            self.accum_valid = True
            return self._reduce_scatter(self.grad_shard, full, lambda: self.scratch.give(full))
        self._pack(self.grad_full, accumulate=self.accum_valid)
        self.accum_valid = True
        if self.policy.reduce is Reduce.ALL_REDUCE_AVG:
            return comm.all_reduce(self.grad_full, self.group, op="avg", async_op=True, label=self.label)

        def drop_other_slices():          # they were this rank's local terms, now sent
            self.grad_full[:self.lo].zero_()
            self.grad_full[self.hi:].zero_()
        return self._reduce_scatter(self.grad_full[self.lo:self.hi], self.grad_full, drop_other_slices)

    def grad_region(self) -> torch.Tensor:
        """The reduced gradient matching ``master`` (SUM over dp for stages 1–3)."""
        if self.policy.shard_grads:
            return self.grad_shard
        return self.grad_full[self.lo:self.hi] if self.policy.shard_optimizer else self.grad_full

    def zero_grads(self) -> None:
        for buf in (self.grad_full, self.grad_shard):
            if buf is not None:
                buf.zero_()
        for p in self.params:
            p.grad = None
        self.accum_valid = False
        self.grads_clean = True

    @property
    def region(self) -> tuple[int, int]:
        """The [lo, hi) range of the flat buffer this rank's master and optimizer state cover."""
        return (self.lo, self.hi) if self.policy.shard_optimizer else (0, self.layout.padded)
