"""Loading full (dense) values into a sharded model, one unit at a time.

``model.load_full_state_dict(source)`` takes an HF-style state dict — in memory, or a safetensors
file such as ``zerotrain checkpoint consolidate``'s output — keyed like the dense model's
``state_dict()``. Each rank reads one unit's tensors at a time (from a file: lazily, nothing else
is read), takes its tensor-parallel slice of a split parameter, fills the unit's flat values and
keeps what its stage keeps. So a rank never holds the whole model, whatever its size; no
collective is needed (every rank reads the same source).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..tensor.layers import shard_like


class _Source:
    def __init__(self, source):
        self._file = None
        if isinstance(source, Mapping):
            self.keys, self._get = set(source), lambda k: source[k]
        elif isinstance(source, (str, Path)):
            from safetensors import safe_open
            if not Path(source).is_file():
                raise ValueError(f"load_full_state_dict: {source} is not a file; pass a state dict or a "
                                 "safetensors file (e.g. from `zerotrain checkpoint consolidate`)")
            self._file = safe_open(str(source), framework="pt")
            self.keys, self._get = set(self._file.keys()), self._file.get_tensor
        else:
            raise ValueError(f"load_full_state_dict: expected a mapping of tensors or a safetensors path, "
                             f"got {type(source).__name__}")

    def get(self, name: str) -> torch.Tensor:
        return self._get(name)


def _expected(model, zs) -> tuple[dict, dict]:
    """({canonical name: parameter} of the units, {name: tensor} of frozen parameters and buffers)."""
    owned = {n: p for u in zs.units for n, p in zip(u.names, u.params)}
    ids = {id(p) for p in owned.values()}
    rest = {k: t for k, t in model.state_dict(keep_vars=True).items() if id(t) not in ids}
    return owned, rest


def _dense_value(src: _Source, name: str, target: torch.Tensor) -> torch.Tensor:
    full = src.get(name)
    part = shard_like(full, target)
    if part.shape != target.shape:
        raise ValueError(f"load_full_state_dict: {name} has shape {tuple(full.shape)} in the source, "
                         f"which does not fit the model's {tuple(target.shape)} (tensor-parallel slice "
                         "included); build the model with the source's configuration")
    return part


@torch.no_grad()
def load_full_state_dict(model, source, *, strict: bool = True) -> None:
    zs = model.zero_state
    src = _Source(source)
    owned, rest = _expected(model, zs)
    aliases = {k for k in model.state_dict(keep_vars=True) if k not in owned and k not in rest}
    missing = [n for n in list(owned) + list(rest) if n not in src.keys]
    unexpected = [k for k in src.keys if k not in owned and k not in rest and k not in aliases]
    if strict and (missing or unexpected):
        raise ValueError(f"load_full_state_dict: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                         "pass strict=False to load the matching part")
    for u in zs.units:
        if not all(n in src.keys for n in u.names):
            continue                      # strict=False: this unit keeps its values
        u.wait_params()
        u.reshard()                       # stage 3: load_values fills a sharded unit
        values = u.new_values()
        for view, name, p in zip(u.layout.views(values), u.names, u.params):
            view.copy_(_dense_value(src, name, p))
        values[u.layout.numel:].zero_()
        u.load_values(values, sync_from_rank0=False)
    for name, t in rest.items():
        if name in src.keys:
            t.copy_(_dense_value(src, name, t))
