"""Reading any part of a saved parameter (or state tensor) from the slices that hold it.

A saved parameter is a set of slices ``[lo, hi)`` of its flattened *local* tensor on each tp rank.
``read(name, kind, lo, hi, target)`` returns elements ``[lo, hi)`` of the local tensor the caller's
layout ``target`` would hold: when the tensor-parallel split is the same, only the overlapping
byte ranges of the files are read; when it differs (tp degree changed), the parameter is rebuilt
whole (one parameter at a time) and re-split the caller's way.
"""
from __future__ import annotations

import torch

from .format import CheckpointError, dtype_of, tensor_key
from .integrity import check_entry
from .tensorfile import ShardReader


def _same_split(saved: dict | None, target: dict | None) -> bool:
    if saved is None or target is None:
        return saved is None and target is None
    return all(saved[k] == target[k] for k in ("dim", "size", "full", "chunks"))


class ParamSource:
    def __init__(self, manifest: dict, reader: ShardReader):
        self.manifest, self.reader = manifest, reader

    def meta(self, name: str, group: str = "params") -> dict:
        return self.manifest[group][name]

    def read(self, name: str, kind: str, lo: int, hi: int, *, target: dict | None = None,
             target_rank: int = 0, group: str = "params") -> torch.Tensor:
        meta = self.meta(name, group)
        if _same_split(meta["tp"], target):
            return self.read_local(meta, name, kind, tp_rank=target_rank if target else 0, lo=lo, hi=hi)
        full = self.read_global(name, kind, group=group)
        if target is not None:
            from ..parallel.tensor.layers import shard_tensor
            full = shard_tensor(full, dim=target["dim"], size=target["size"], rank=target_rank,
                                chunks=target["chunks"])
        return full.reshape(-1)[lo:hi]

    def read_into(self, out: torch.Tensor, name: str, kind: str, lo: int, *, target: dict | None = None,
                  target_rank: int = 0, group: str = "params") -> torch.Tensor:
        """``out[:] = read(name, kind, lo, lo + out.numel(), ...)``; when the split is the same and
        ``out`` has the saved dtype, the bytes go straight from the file into ``out``."""
        meta = self.meta(name, group)
        hi = lo + out.numel()
        direct = out.device.type == "cpu" and out.is_contiguous() and out.dtype == self._dtype(meta, kind)
        if direct and _same_split(meta["tp"], target):
            return self.read_local(meta, name, kind, tp_rank=target_rank if target else 0, lo=lo, hi=hi, out=out)
        return out.copy_(self.read(name, kind, lo, hi, target=target, target_rank=target_rank, group=group))

    def _dtype(self, meta: dict, kind: str) -> torch.dtype:
        if kind.startswith("state."):
            return dtype_of(self.manifest["optimizer"]["state"][kind[len("state."):]])
        return dtype_of(meta["dtype"])

    def read_local(self, meta: dict, name: str, kind: str, *, tp_rank: int, lo: int, hi: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        state_key = kind[len("state."):] if kind.startswith("state.") else None
        if out is None:
            out = torch.empty(hi - lo, dtype=self._dtype(meta, kind))
        filled = 0
        for sl in meta["slices"]:
            if sl["tp_rank"] != tp_rank or (state_key is not None and state_key not in sl["state"]):
                continue
            a, b = max(lo, sl["lo"]), min(hi, sl["hi"])
            if a >= b:
                continue
            key = tensor_key(kind, name, sl["lo"], sl["hi"])
            check_entry(self.reader, sl["file"], key, dtype=self._dtype(meta, kind), numel=sl["hi"] - sl["lo"])
            self.reader.read_into(sl["file"], key, a - sl["lo"], out[a - lo:b - lo])
            filled += b - a
        if filled != hi - lo:
            raise CheckpointError(f"checkpoint {self.reader.dir}: {kind} of {name!r} elements [{lo}, {hi}) "
                                  f"(tp rank {tp_rank}) are not all in the checkpoint ({filled} of {hi - lo} "
                                  "found); the manifest and files do not match")
        return out

    def read_global(self, name: str, kind: str, *, group: str = "params") -> torch.Tensor:
        """The whole, unsplit tensor (global shape)."""
        meta = self.meta(name, group)
        shape = torch.Size(meta["shape"])
        tp = meta["tp"]
        if tp is None:
            return self.read_local(meta, name, kind, tp_rank=0, lo=0, hi=shape.numel()).view(shape)
        from ..parallel.tensor.layers import unshard_tensors
        shards = [self.read_local(meta, name, kind, tp_rank=r, lo=0, hi=shape.numel()).view(shape)
                  for r in range(tp["size"])]
        return unshard_tensors(shards, dim=tp["dim"], full=tp["full"], chunks=tp["chunks"])
