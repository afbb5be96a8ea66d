"""What one rank contributes to a checkpoint, and the facts about parameters save and load share.

A rank writes, for every parameter slice its master covers, the fp32 (master-dtype) values and
each optimizer state tensor's slice. Replicas write nothing: at stage 0 only dp rank 0 writes (every
rank holds everything), and a parameter that tensor parallelism does not split is written by tp
rank 0 only. Buffers and frozen parameters ("extras") are written whole by dp rank 0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .format import dtype_name, tensor_key, to_json


def zero_state_of(model, what: str):
    zs = getattr(model, "zero_state", None)
    if zs is None:
        raise ValueError(f"checkpoint.{what}: the model is not sharded; call zerotrain.shard_model(model, "
                         "stage=...) first (a plain model loads a consolidated file with "
                         "zerotrain.checkpoint.load_consolidated_into)")
    return zs


def tp_spec(t: torch.Tensor) -> dict | None:
    """How tensor parallelism split ``t`` (None: not split); the rank is not part of it."""
    if getattr(t, "_zt_tp_dim", None) is None:
        return None
    return {"dim": int(t._zt_tp_dim), "size": int(t._zt_tp_size), "full": int(t._zt_tp_full),
            "chunks": int(getattr(t, "_zt_tp_chunks", 1))}


def tp_rank_of(t: torch.Tensor) -> int:
    return int(t._zt_tp_rank) if tp_spec(t) is not None else 0


def global_shape(shape, tp: dict | None) -> list[int]:
    shape = list(shape)
    if tp is not None:
        shape[tp["dim"]] = tp["full"]
    return shape


def param_names(zs) -> dict[int, str]:
    return {id(p): n for u in zs.units for n, p in zip(u.names, u.params)}


def split_state_dict(model, zs):
    """(aliases {name: canonical name}, extras {name: tensor}) of ``model.state_dict()``."""
    owned = param_names(zs)
    aliases, extras = {}, {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in owned:
            if key != owned[id(t)]:
                aliases[key] = owned[id(t)]
        else:
            extras[key] = t.detach()
    return aliases, extras


@dataclass
class RankContent:
    tensors: list = field(default_factory=list)      # (key, tensor) in file order
    slices: list = field(default_factory=list)       # [group, name, lo, hi, [state keys]]
    scalars: dict = field(default_factory=dict)      # name -> {key: [value, dtype]}
    state_dtypes: dict = field(default_factory=dict)  # optimizer state key -> dtype name

    def add(self, kind: str, name: str, span: tuple[int, int], t: torch.Tensor) -> None:
        self.tensors.append((tensor_key(kind, name, *span), t.reshape(-1)))


def _writes(zs, t, *, replicated_over_dp: bool) -> bool:
    if replicated_over_dp and zs.mesh.dp_rank != 0:
        return False
    return tp_spec(t) is not None or zs.mesh.tp_rank == 0


def _scalar(v):
    if torch.is_tensor(v):
        return [to_json(v.item(), "optimizer state"), dtype_name(v.dtype)]
    if isinstance(v, (bool, int, float)):
        return [to_json(v, "optimizer state"), None]
    raise ValueError(f"checkpoint.save: optimizer state value of type {type(v).__name__} is neither a "
                     "tensor nor a number; zerotrain checkpoints hold tensors and plain numbers only")


def collect(model, zs, optimizer=None) -> RankContent:
    """This rank's tensors (views, not copies) and the slice list describing them."""
    content = RankContent()
    replicated = not zs.policy.shard_optimizer
    owned = optimizer.owned_slices() if optimizer is not None else zs.owned_slices()
    for s in owned:
        if not _writes(zs, s.param, replicated_over_dp=replicated):
            continue
        content.add("master", s.name, s.span, s.master)
        keys = []
        for key, view in getattr(s, "state", {}).items():
            content.add(f"state.{key}", s.name, s.span, view)
            content.state_dtypes[key] = dtype_name(view.dtype)
            keys.append(key)
        for key, v in getattr(s, "scalars", {}).items():
            content.scalars.setdefault(s.name, {})[key] = _scalar(v)
        content.slices.append(["param", s.name, *s.span, keys])
    _, extras = split_state_dict(model, zs)
    for name, t in extras.items():
        if _writes(zs, t, replicated_over_dp=True):
            content.add("extra", name, (0, t.numel()), t)
            content.slices.append(["extra", name, 0, t.numel(), []])
    return content


def describe_params(model, zs) -> tuple[dict, dict, dict]:
    """(params, extras, aliases) metadata for the manifest, from this rank's view of the model."""
    params = {}
    for u in zs.units:
        for slot, p in zip(u.layout.slots, u.params):
            params[slot.name] = {"shape": list(slot.shape), "dtype": dtype_name(u.dtypes.master),
                                 "tp": tp_spec(p), "slices": [], "scalars": {}}
    aliases, extras = split_state_dict(model, zs)
    extra_meta = {n: {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "tp": tp_spec(t), "slices": []}
                  for n, t in extras.items()}
    return params, extra_meta, aliases


def model_info(model) -> dict:
    config = getattr(model, "config", None)
    cls = type(model)
    if hasattr(model, "zero_state") and cls.__name__.startswith("Sharded"):
        cls = cls.__bases__[-1]                 # shard_model's subclass: report the user's class
    info = {"class": cls.__name__, "config": None}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        try:
            info["config"] = to_json(dataclasses.asdict(config), "model.config")
        except ValueError:
            info["config"] = None
    return info
