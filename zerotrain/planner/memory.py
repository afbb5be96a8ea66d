"""Bytes per rank and communication per step for one (stage, dp, tp, dtype, batch) setting.

Everything a stage changes is read from its row of the stage table (``policy_for(stage)``).
Each sharding unit is a flat buffer padded to a multiple of dp (N); a rank's shard of it is
padded/N elements. Ψ is the padded sum over units (per tp rank). With p, r, m the element sizes
of the compute, reduce and master dtypes and k the optimizer's states per element (Adam 2, SGD
with momentum 1, SGD 0, each in master dtype):

==================  ==========================================  ===========================
model state         bytes per rank                              whole when
==================  ==========================================  ===========================
parameters          p·Ψ, or p·Ψ/N                               not ``shard_params``
gradients           r·Ψ, or r·Ψ/N                               not ``shard_grads``
master + states     (m + k·m)·|owned region| (Ψ or Ψ/N)         not ``shard_optimizer``
==================  ==========================================  ===========================

The master is fp32 (fp64 for an fp64 model); when the compute dtype *is* the master dtype the
parameter (shard) is the master and no second copy exists. Transient buffers on top, each from a
policy field: optimizer sharded but gradients whole (stage 1) → the peers' chunks of one unit
((N − 1)/N of the largest) received while reducing it in place (the point-to-point reduce-scatter
zerotrain uses on CPU); gradients sharded → the full gradients of one unit (the largest) while
reducing it; parameters sharded → the gathered parameters of two units (current + prefetched:
the two largest). Activations: see ``activations.py``; communication: see ``comm.py``.

Devices. ``device="cpu"``: the bytes live in the process's RSS, on top of the runtime's own
(``DEFAULT_RUNTIME_OVERHEAD_BYTES``). ``device="cuda"``: ``total_bytes`` is what
``torch.cuda.max_memory_allocated`` counts; the caching allocator reserves more (blocks cached
for reuse, fragmentation), and the CUDA context lives outside both (see the plan's notes).

Offload (``offload="cpu"``, ZeRO-Offload): the fp32 master and optimizer states of the owned
region live in pinned host memory and the step runs on the CPU; on a CUDA device the reduced
gradients of the owned region go device→host into an fp32 host buffer, so a stage that shards
gradients keeps no gradient shard on the device. On a CPU run offload moves nothing: the same
bytes are reported as host memory.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from zerotrain.parallel.zero.policy import StagePolicy, policy_for
from zerotrain.parallel.zero.hooks import StepSchedule
from zerotrain.planner.activations import DEVICES, Activations, activations
from zerotrain.planner.comm import CommVolume, comm_volume
from zerotrain.planner.spec import ModelSpec

DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}
_DTYPE_ALIASES = {
    torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    "float64": "fp64", "double": "fp64", "float32": "fp32", "float": "fp32",
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
}
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}
OFFLOAD = (None, "cpu")
# RSS of a bare `python -c "import torch"` (torch 2.13 CPU, measured: 223 MB)
DEFAULT_RUNTIME_OVERHEAD_BYTES = 345_000_000  # a torch rank that has run a forward (327 MiB measured)
CUDA_NOTE = ("cuda: device bytes are what torch.cuda.max_memory_allocated() counts; the caching "
             "allocator reserves more (torch.cuda.max_memory_reserved(): freed blocks it keeps, "
             "fragmentation; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True keeps the two close) "
             "and the CUDA context and library workspaces come on top (several hundred MB, not "
             "modelled): leave headroom")


@dataclass(frozen=True)
class Extra:
    """A named cost beyond the closed-form formula (bytes already counted in the plan)."""

    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """Predicted bytes per rank for one setting; see the module docstring for the model."""

    model: str
    stage: int
    dp: int
    tp: int
    param_dtype: str
    reduce_dtype: str
    master_dtype: str
    optimizer: str
    micro_batch: int
    seq_len: int | None
    activation_checkpointing: bool
    device: str                 # "cpu" or "cuda": where the model computes
    offload: str | None         # None, or "cpu": master + optimizer states on the host
    numel: int                  # Ψ of the whole model
    numel_per_tp_rank: int      # Ψ_tp, unpadded
    params_bytes: int
    grads_bytes: int            # on the device
    master_bytes: int
    optimizer_states_bytes: int
    host_grads_bytes: int       # offload to a CUDA run's host: the fp32 gradient d2h buffer
    model_states_bytes: int     # all of the above, wherever they live
    comm_buffers_bytes: int     # transient buffers: reduce scratch, unit grads, gathered units
    activations_bytes: int      # at the peak (see ``activations``)
    total_bytes: int            # on the device: model states there + transients + activations
    host_bytes: int             # offloaded to host memory (0 without offload)
    runtime_overhead_bytes: int
    peak_rss_bytes: int         # the process's RSS: a CPU run's everything, a CUDA run's host part
    comm: CommVolume
    activations: Activations | None = None
    extras: tuple[Extra, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def devices(self) -> int:
        return self.dp * self.tp

    def to_dict(self) -> dict:
        return asdict(self)


def dtype_name(dtype, *, field: str = "dtype") -> str:
    """'fp32' / 'bf16' / 'fp16' / 'fp64' from a name or torch dtype."""
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPE_BYTES:
        raise ValueError(f"{field}={dtype!r} is not a known dtype: "
                         "use one of fp32, bf16, fp16, fp64")
    return name


def plan(spec: ModelSpec, *, stage: int, dp: int, tp: int = 1, param_dtype,
         reduce_dtype=None, optimizer: str = "adamw", micro_batch: int = 1,
         seq_len: int | None = None, activation_checkpointing: bool = False,
         device: str = "cpu", attention: str = "auto", offload: str | None = None,
         runtime_overhead_bytes: int = DEFAULT_RUNTIME_OVERHEAD_BYTES) -> Plan:
    """Predict bytes per rank and communication per step (see the module docstring).

    ``attention``: the SDPA kernel to assume, "auto" (what torch picks on ``device``), "flash",
    "efficient" or "math". ``offload``: None or "cpu"."""
    policy = policy_for(stage)
    _check(dp=dp, tp=tp, micro_batch=micro_batch, seq_len=seq_len, offload=offload,
           device=device)
    pdt, rdt, mdt, opt = _dtypes(param_dtype, reduce_dtype, optimizer)
    per_elem = _per_element(pdt, rdt, mdt, OPTIMIZER_STATES[opt])
    numels = [u.numel(tp) for u in spec.units]
    padded = [math.ceil(n / dp) * dp for n in numels]
    states = _model_states(policy, padded, dp, per_elem)
    transient, extras = _transients(policy, spec, padded, dp=dp, p=DTYPE_BYTES[pdt],
                                    r=DTYPE_BYTES[rdt])
    pad = sum(padded) - sum(numels)
    if pad:
        extras.insert(0, Extra("padding", _padding_bytes(policy, dp, pad, per_elem),
                               f"{pad} elements to make each unit a multiple of dp={dp}"))
    seq = seq_len if seq_len is not None else spec.block_size
    act, notes = _activations(spec, tp=tp, micro_batch=micro_batch, seq_len=seq, pdt=pdt,
                              device=device, attention=attention, ckpt=activation_checkpointing)
    host, off_extras, off_notes = _offload(policy, states, padded, dp=dp, mdt=mdt,
                                           device=device, offload=offload)
    comm, comm_notes = comm_volume(spec, policy, dp=dp, tp=tp, full=sum(padded),
                                   p=DTYPE_BYTES[pdt], r=DTYPE_BYTES[rdt], micro_batch=micro_batch,
                                   seq_len=seq, checkpointing=activation_checkpointing)
    act_bytes = act.peak_bytes if act else 0
    model_states = sum(states.values())
    total = model_states - host + transient + act_bytes
    process = (total + host if device == "cpu" else host) + runtime_overhead_bytes
    return Plan(
        model=spec.name, stage=stage, dp=dp, tp=tp, param_dtype=pdt, reduce_dtype=rdt,
        master_dtype=mdt, optimizer=opt, micro_batch=micro_batch, seq_len=seq,
        activation_checkpointing=activation_checkpointing, device=device, offload=offload,
        numel=spec.numel(1), numel_per_tp_rank=sum(numels), **states,
        model_states_bytes=model_states, comm_buffers_bytes=transient,
        activations_bytes=act_bytes, total_bytes=total, host_bytes=host,
        runtime_overhead_bytes=runtime_overhead_bytes, peak_rss_bytes=process, comm=comm,
        activations=act, extras=tuple(extras + off_extras),
        notes=tuple(_head_note(spec, tp, policy) + notes + comm_notes + off_notes
                    + ([CUDA_NOTE] if device == "cuda" else [])),
    )


def _dtypes(param_dtype, reduce_dtype, optimizer: str) -> tuple[str, str, str, str]:
    """(compute, reduce, master dtype names, optimizer name); the reduce dtype defaults to the
    master's (zerotrain's engine default)."""
    pdt = dtype_name(param_dtype, field="param_dtype")
    mdt = "fp64" if pdt == "fp64" else "fp32"
    rdt = dtype_name(reduce_dtype, field="reduce_dtype") if reduce_dtype is not None else mdt
    opt = optimizer.lower().replace("-", "_")
    if opt not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer={optimizer!r} is unknown: "
                         f"use one of {', '.join(OPTIMIZER_STATES)}")
    return pdt, rdt, mdt, opt


def _check(**values) -> None:
    for field in ("dp", "tp", "micro_batch", "seq_len"):
        v = values[field]
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{field}={v!r}: must be a positive integer")
    if values["device"] not in DEVICES:
        raise ValueError(f"device={values['device']!r} is unknown: use 'cpu' or 'cuda'")
    if values["offload"] not in OFFLOAD:
        raise ValueError(f"offload={values['offload']!r} is unknown: use None (no offload) or "
                         "'cpu' (fp32 master and optimizer states in host memory)")


def _per_element(pdt, rdt, mdt, k) -> dict[str, int]:
    """Bytes per element of each model state."""
    m = DTYPE_BYTES[mdt]
    return {"params_bytes": DTYPE_BYTES[pdt], "grads_bytes": DTYPE_BYTES[rdt],
            "master_bytes": m if pdt != mdt else 0, "optimizer_states_bytes": k * m}


def _owned(policy: StagePolicy, padded: list[int], dp: int) -> int:
    """Elements whose master and optimizer state a rank keeps (every rank's region is as long)."""
    return sum(hi - lo for lo, hi in (policy.owned_region(n, dp, 0) for n in padded))


def _model_states(policy: StagePolicy, padded: list[int], dp: int, per_elem) -> dict[str, int]:
    full = sum(padded)
    shard = full // dp
    owned = _owned(policy, padded, dp)
    elems = {"params_bytes": shard if policy.shard_params else full,
             "grads_bytes": shard if policy.shard_grads else full,
             "master_bytes": owned, "optimizer_states_bytes": owned}
    return {k: n * per_elem[k] for k, n in elems.items()}


def _padding_bytes(policy: StagePolicy, dp: int, pad: int, per_elem) -> int:
    """Bytes of padding in this rank's model-state buffers: all of it in whole buffers, the
    rank's 1/dp of it in shards (every shard is padded/dp long, so each rank pays the same)."""
    kinds = (per_elem["params_bytes"], per_elem["grads_bytes"],
             per_elem["master_bytes"] + per_elem["optimizer_states_bytes"])
    return round(sum(b * pad * (1 if w else 1 / dp) for w, b in zip(policy.whole, kinds)))


MAX_IN_FLIGHT = StepSchedule.MAX_IN_FLIGHT


def _transients(policy: StagePolicy, spec, padded, *, dp: int, p: int,
                r: int) -> tuple[int, list[Extra]]:
    """Buffers that live only while a unit is gathered or reduced, from the policy's fields."""
    order = sorted(range(len(padded)), key=lambda i: -padded[i])
    big = order[0]
    name = spec.units[big].name
    extras = []
    if policy.shard_optimizer and not policy.shard_grads and dp > 1:
        b = padded[big] // dp * (dp - 1) * r
        extras.append(Extra("reduce scratch", b, f"the peers' chunks of the largest unit ({name}) "
                                                 "received by the point-to-point reduce-scatter"))
    if policy.shard_params:
        live = order[:2]
        names = " + ".join(spec.units[i].name for i in live)
        extras.append(Extra("gathered parameters", sum(padded[i] for i in live) * p,
                            f"current + prefetched unit ({names})"))
    if policy.shard_grads:
        # each unit's gradients accumulate in a full-size send buffer that lives until its
        # reduce-scatter completes; the schedule keeps MAX_IN_FLIGHT outstanding plus the one filling
        live = MAX_IN_FLIGHT + 1
        extras.append(Extra("unit gradient buffers", live * padded[big] * r,
                            f"full grads of {live} units in flight (largest: {name})"))
        if dp > 2:
            b = live * padded[big] // dp * (dp - 2) * r
            extras.append(Extra("reduce scratch", b, "the peers' chunks received by the point-to-point "
                                                     f"reduce-scatters of {live} units in flight"))
    return sum(e.bytes for e in extras), extras


def _activations(spec, *, tp, micro_batch, seq_len, pdt, device, attention,
                 ckpt) -> tuple[Activations | None, list[str]]:
    if not spec.has_shape:
        return None, ["activations not estimated: the model's n_layer, n_embd and n_head are "
                      "unknown"]
    if seq_len is None:
        return None, ["activations not estimated: give seq_len (the model has no block_size)"]
    act = activations(spec, tp=tp, micro_batch=micro_batch, seq_len=seq_len, param_dtype=pdt,
                      elem=DTYPE_BYTES[pdt], device=device, attention=attention,
                      checkpointing=ckpt)
    notes = [] if spec.vocab_size else ["logits not estimated: the vocabulary size is unknown"]
    return act, notes


def _offload(policy: StagePolicy, states: dict[str, int], padded: list[int], *, dp: int,
             mdt: str, device: str, offload: str | None) -> tuple[int, list[Extra], list[str]]:
    """Splits model states between device and host: sets ``states["host_grads_bytes"]`` (the d2h
    gradient buffer) and zeroes the device gradients that go straight to it; returns (host
    bytes, extras, notes)."""
    states["host_grads_bytes"] = 0
    if offload is None:
        return 0, [], []
    host = states["master_bytes"] + states["optimizer_states_bytes"]
    extras = [Extra("host: master + optimizer states", host,
                    f"{mdt} master and optimizer states of the owned region, pinned; the step "
                    "runs on the CPU")]
    if device == "cpu":
        return host, extras, [
            "offload on a CPU run moves nothing: the same bytes, reported as host memory"]
    states["host_grads_bytes"] = _owned(policy, padded, dp) * DTYPE_BYTES[mdt]
    extras.append(Extra("host: gradient buffer", states["host_grads_bytes"],
                        f"{mdt} gradients of the owned region, copied device→host as reduced"))
    if policy.shard_grads:
        states["grads_bytes"] = 0           # a reduced shard goes to the host at once
    return host + states["host_grads_bytes"], extras, [
        "pinned host buffers: torch's caching host allocator rounds each pinned allocation up "
        "to a power of two, which can cost up to 2x the host bytes shown"]


def _head_note(spec, tp, policy: StagePolicy) -> list[str]:
    if policy.shard_grads and len(spec.units) == 1:
        return ["the model is one sharding unit: the transient buffers hold all of it at once "
                "(give n_layer to split it into per-layer units)"]
    if tp > 1 and spec.n_head is not None and spec.n_head % tp:
        return [f"n_head={spec.n_head} is not divisible by tp={tp}: attention heads cannot be "
                "split evenly (the estimate assumes they can)"]
    return []
