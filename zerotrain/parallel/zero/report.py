"""``memory_report``: bytes this rank holds, counted from the live tensors, by category.

Each storage is counted once (views of one buffer share it) and at its current size (a stage-3
full buffer that is freed counts 0).
"""
from __future__ import annotations

import torch


def _storage_key(t: torch.Tensor):
    return t.untyped_storage().data_ptr(), t.device


class _StorageTally:
    def __init__(self):
        self.seen = set()
        self.bytes = {}

    def add(self, category: str, t: torch.Tensor | None):
        if t is None or not torch.is_tensor(t):
            return
        key = _storage_key(t)
        if key in self.seen or t.untyped_storage().nbytes() == 0:
            self.bytes.setdefault(category, 0)
            return
        self.seen.add(key)
        self.bytes[category] = self.bytes.get(category, 0) + t.untyped_storage().nbytes()


def memory_report(model, optimizer=None) -> dict[str, int]:
    """Bytes by category: params, grads, master, optimizer_states, buffers, comm_buffers, and total.

    A master that is a view of the parameters (pure fp32) counts as params, not twice.
    ``comm_buffers``: reduction buffers the stage 1–3 pool holds (none between steps).
    ``host`` / ``device``: the split of ``total`` between host memory and the compute device. With
    ZeRO-Offload the master, optimizer state and host gradient buffers are host memory (on a
    CPU-only run too: that is what offload changes there); without it everything is device memory."""
    c = _StorageTally()
    zs = getattr(model, "zero_state", None)
    units = zs.units if zs else []
    for u in units:
        c.add("params", u.full)
        c.add("params", u.shard)
    for p in model.parameters():          # parameters outside any unit (frozen) or not sharded
        c.add("params", p.data)
    for u in units:
        c.add("grads", u.grad_full)
        c.add("grads", u.grad_shard)
    for p in model.parameters():
        c.add("grads", p.grad)
    for u in units:
        c.add("master", u.master)
        if u.host is not None and u.host.moves:
            c.add("grads_host", u.host.grads)
    inner = getattr(optimizer, "inner", optimizer)
    if inner is not None:
        for state in inner.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    c.add("optimizer_states", v)
                elif torch.is_tensor(v):
                    c.add("optimizer_scalars", v)
    for b in model.buffers():
        c.add("buffers", b)
    if units:
        for b in units[0].scratch.buffers:
            c.add("comm_buffers", b)
    keys = ("params", "grads", "master", "optimizer_states", "buffers", "comm_buffers", "grads_host")
    report = {k: c.bytes.get(k, 0) for k in keys}
    report["model_states"] = sum(report[k] for k in ("params", "grads", "master", "optimizer_states"))
    report["total"] = (report["model_states"] + report["buffers"] + report["comm_buffers"]
                       + report["grads_host"] + c.bytes.get("optimizer_scalars", 0))
    offloaded = any(u.host is not None for u in units)
    report["host"] = (report["master"] + report["optimizer_states"] + report["grads_host"]
                      + c.bytes.get("optimizer_scalars", 0)) if offloaded else 0
    report["device"] = report["total"] - report["host"]
    return report
