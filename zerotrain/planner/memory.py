"""Bytes per rank and communication per step for one (stage, dp, tp, dtype, batch) setting.

Model states follow zerotrain's ZeRO engine. Each sharding unit is a flat buffer padded to a
multiple of dp (N); a rank's shard of it is padded/N elements. Ψ is the padded sum over units
(per tp rank). With p, r, m the element sizes of the compute, reduce and master dtypes and
k the optimizer's states per element (Adam 2, SGD with momentum 1, SGD 0, each in master dtype):

========  ==========  ==========  ======================  =============
stage     params (p)  grads (r)   master (m, if p != m)   states (k·m)
========  ==========  ==========  ======================  =============
0         Ψ           Ψ           Ψ                       Ψ
1         Ψ           Ψ           Ψ/N                     Ψ/N
2         Ψ           Ψ/N         Ψ/N                     Ψ/N
3         Ψ/N         Ψ/N         Ψ/N                     Ψ/N
========  ==========  ==========  ======================  =============

The master is fp32 (fp64 for an fp64 model); when the compute dtype *is* the master dtype the
parameter (shard) is the master and no second copy exists. Transient buffers on top: stage 1
receives the peers' chunks of one unit ((N − 1)/N of the largest) while reducing it in place (the
point-to-point reduce-scatter zerotrain uses on CPU); stage 2 holds the full gradients of one
unit (the largest) while reducing it; stage 3 holds the gathered parameters of two units
(current + prefetched: the two largest) and one unit's full gradients.

Communication per step per rank over dp, in elements of the communicated dtype: stage 0 all-reduce
2Ψ (reduce dtype); stages 1-2 reduce-scatter Ψ (reduce dtype) + all-gather Ψ (compute dtype);
stage 3 two all-gathers 2Ψ (compute dtype) + reduce-scatter Ψ. A ring moves (N−1)/N of it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from zerotrain.planner.activations import activation_bytes, tp_comm_elements
from zerotrain.planner.spec import ModelSpec

DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}
_DTYPE_ALIASES = {
    torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    "float64": "fp64", "double": "fp64", "float32": "fp32", "float": "fp32",
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
}
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}
# stage -> which model states a rank holds whole: (params, grads, master and optimizer states)
STAGE_FULL = {0: (True, True, True), 1: (True, True, False), 2: (True, False, False),
              3: (False, False, False)}
# RSS of a bare `python -c "import torch"` (torch 2.13 CPU, measured: 223 MB)
DEFAULT_RUNTIME_OVERHEAD_BYTES = 345_000_000  # a torch rank that has run a forward (327 MiB measured)


@dataclass(frozen=True)
class Extra:
    """A named cost beyond the closed-form formula (bytes already counted in the plan)."""

    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class CommVolume:
    """Per step per rank. elements: of the communicated dtype; wire: what a ring moves."""

    dp_elements: int
    dp_bytes: int
    dp_wire_bytes: int
    tp_elements: int
    tp_bytes: int
    tp_wire_bytes: int


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
    numel: int                  # Ψ of the whole model
    numel_per_tp_rank: int      # Ψ_tp, unpadded
    params_bytes: int
    grads_bytes: int
    master_bytes: int
    optimizer_states_bytes: int
    model_states_bytes: int
    comm_buffers_bytes: int     # transient gathers / gradient buffers (stages 2-3)
    activations_bytes: int
    total_bytes: int            # model states + transient buffers + activations
    runtime_overhead_bytes: int
    peak_rss_bytes: int         # total + runtime overhead (a CPU run's peak RSS)
    comm: CommVolume
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
         runtime_overhead_bytes: int = DEFAULT_RUNTIME_OVERHEAD_BYTES) -> Plan:
    """Predict bytes per rank and communication per step (see the module docstring)."""
    _check(stage=stage, dp=dp, tp=tp, micro_batch=micro_batch, seq_len=seq_len)
    pdt = dtype_name(param_dtype, field="param_dtype")
    mdt = "fp64" if pdt == "fp64" else "fp32"
    rdt = dtype_name(reduce_dtype, field="reduce_dtype") if reduce_dtype is not None else mdt
    opt = optimizer.lower().replace("-", "_")
    if opt not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer={optimizer!r} is unknown: "
                         f"use one of {', '.join(OPTIMIZER_STATES)}")
    numels = [u.numel(tp) for u in spec.units]
    padded = [math.ceil(n / dp) * dp for n in numels]
    states = _model_states(stage, dp, sum(padded), pdt, rdt, mdt, OPTIMIZER_STATES[opt])
    per_elem = _model_states(0, 1, 1, pdt, rdt, mdt, OPTIMIZER_STATES[opt])
    transient, extras = _transients(stage, spec, padded, pdt, rdt, dp)
    pad = sum(padded) - sum(numels)
    if pad:
        extras.insert(0, Extra("padding", _padding_bytes(stage, dp, pad, per_elem),
                               f"{pad} elements to make each unit a multiple of dp={dp}"))
    seq = seq_len if seq_len is not None else spec.block_size
    act, act_notes = activation_bytes(spec, tp=tp, micro_batch=micro_batch, seq_len=seq,
                                      elem=DTYPE_BYTES[pdt], checkpointing=activation_checkpointing)
    comm, comm_notes = _comm(spec, stage=stage, dp=dp, tp=tp, full=sum(padded), pdt=pdt, rdt=rdt,
                             micro_batch=micro_batch, seq_len=seq, ckpt=activation_checkpointing)
    model_states = sum(states.values())
    total = model_states + transient + act
    return Plan(
        model=spec.name, stage=stage, dp=dp, tp=tp, param_dtype=pdt, reduce_dtype=rdt,
        master_dtype=mdt, optimizer=opt, micro_batch=micro_batch, seq_len=seq,
        activation_checkpointing=activation_checkpointing, numel=spec.numel(1),
        numel_per_tp_rank=sum(numels), **states, model_states_bytes=model_states,
        comm_buffers_bytes=transient, activations_bytes=act, total_bytes=total,
        runtime_overhead_bytes=runtime_overhead_bytes,
        peak_rss_bytes=total + runtime_overhead_bytes, comm=comm, extras=tuple(extras),
        notes=tuple(_head_note(spec, tp, stage) + act_notes + comm_notes),
    )


def _check(**values) -> None:
    if values["stage"] not in STAGE_FULL:
        raise ValueError(f"stage={values['stage']!r}: ZeRO stages are 0, 1, 2, 3")
    for field in ("dp", "tp", "micro_batch", "seq_len"):
        v = values[field]
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{field}={v!r}: must be a positive integer")


def _model_states(stage, dp, full, pdt, rdt, mdt, k) -> dict[str, int]:
    shard = full // dp
    whole_p, whole_g, whole_s = STAGE_FULL[stage]
    s_elems = full if whole_s else shard
    return {
        "params_bytes": (full if whole_p else shard) * DTYPE_BYTES[pdt],
        "grads_bytes": (full if whole_g else shard) * DTYPE_BYTES[rdt],
        "master_bytes": s_elems * DTYPE_BYTES[mdt] if pdt != mdt else 0,
        "optimizer_states_bytes": s_elems * k * DTYPE_BYTES[mdt],
    }


def _padding_bytes(stage, dp, pad, per_elem) -> int:
    """Bytes of padding in this rank's model-state buffers: all of it in whole buffers, the
    rank's 1/dp of it in shards (every shard is padded/dp long, so each rank pays the same)."""
    whole = STAGE_FULL[stage]
    kinds = (per_elem["params_bytes"], per_elem["grads_bytes"],
             per_elem["master_bytes"] + per_elem["optimizer_states_bytes"])
    return round(sum(b * pad * (1 if w else 1 / dp) for w, b in zip(whole, kinds)))


def _transients(stage, spec, padded, pdt, rdt, dp) -> tuple[int, list[Extra]]:
    order = sorted(range(len(padded)), key=lambda i: -padded[i])
    big = order[0]
    name = spec.units[big].name
    if stage == 1:
        if dp == 1:
            return 0, []
        b = padded[big] // dp * (dp - 1) * DTYPE_BYTES[rdt]
        return b, [Extra("reduce scratch", b, f"the peers' chunks of the largest unit ({name}) "
                                              "received by the point-to-point reduce-scatter (CPU)")]
    if stage == 2:
        b = padded[big] * DTYPE_BYTES[rdt]
        return b, [Extra("unit gradient buffer", b, f"full grads of the largest unit ({name})")]
    if stage != 3:
        return 0, []
    live = order[:2]
    gathered = sum(padded[i] for i in live) * DTYPE_BYTES[pdt]
    grads = padded[big] * DTYPE_BYTES[rdt]
    names = " + ".join(spec.units[i].name for i in live)
    return gathered + grads, [
        Extra("gathered parameters", gathered, f"current + prefetched unit ({names})"),
        Extra("unit gradient buffer", grads, f"full grads of the largest unit ({name})"),
    ]


def _comm(spec, *, stage, dp, tp, full, pdt, rdt, micro_batch, seq_len, ckpt):
    p, r = DTYPE_BYTES[pdt], DTYPE_BYTES[rdt]
    if stage == 0:
        elems, nbytes = 2 * full, 2 * full * r
    else:
        gathers = 2 if stage == 3 else 1
        elems, nbytes = (1 + gathers) * full, full * r + gathers * full * p
    tp_elems, notes = tp_comm_elements(spec, tp=tp, micro_batch=micro_batch, seq_len=seq_len,
                                       checkpointing=ckpt)
    return CommVolume(
        dp_elements=elems, dp_bytes=nbytes, dp_wire_bytes=nbytes * (dp - 1) // dp,
        tp_elements=tp_elems, tp_bytes=tp_elems * p, tp_wire_bytes=tp_elems * p * (tp - 1) // tp,
    ), notes


def _head_note(spec, tp, stage) -> list[str]:
    if stage >= 2 and len(spec.units) == 1:
        return ["the model is one sharding unit: the transient buffers hold all of it at once "
                "(give n_layer to split it into per-layer units)"]
    if tp > 1 and spec.n_head is not None and spec.n_head % tp:
        return [f"n_head={spec.n_head} is not divisible by tp={tp}: attention heads cannot be "
                "split evenly (the estimate assumes they can)"]
    return []
