"""Building a sharded model from the meta device, one unit at a time.

A model constructed under ``torch.device("meta")`` (or ``zerotrain.zero.Init()``) has shapes but no
storage. ``shard_model`` then gives each unit's parameters real storage one parameter (or one
module) at a time, lets the model's own initialisation fill them, copies the values into the
unit's flat buffer, and returns them to the meta device before the next unit — so a rank never
holds more than its own states plus one unit's values (and, for a tensor-parallel parameter, one
full-size parameter, from which it keeps its slice).

How parameters are filled, in order of preference:

1. ``param_init_fn(module)``: called for each module that directly holds parameters being
   materialised; exactly those parameters have storage (full-size for a tp-split one).
2. ``model.init_weights()`` if the model has it: called once per parameter with only that
   parameter materialised; it must fill parameters that have storage and skip meta ones. The
   zerotrain GPT's does, seeding each parameter from its name, so a meta-built GPT gets bitwise
   the weights of the dense build (``torch.manual_seed(s); GPT(cfg)``) at any stage, dp and tp.
3. ``module.reset_parameters()`` for each module holding the parameters (torch's layers): valid
   weights, but drawn from the global RNG in another order than a dense build, so not the same
   values.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..tensor.layers import shard_like


def swap_in(p: nn.Parameter, data: torch.Tensor) -> None:
    """Give parameter ``p`` the storage ``data`` (any device, meta included), keeping its identity
    and attributes (``p.data = ...`` cannot cross from meta to a real device)."""
    new = nn.Parameter(data, requires_grad=p.requires_grad)
    new.__dict__.update(p.__dict__)
    torch.utils.swap_tensors(p, new)


def to_meta(p: nn.Parameter) -> None:
    swap_in(p, torch.empty(p.shape, dtype=p.dtype, device="meta"))


def dense_shape(p: nn.Parameter) -> torch.Size:
    """The full shape of a tensor-parallel slice (its own shape if it is not split)."""
    dim = getattr(p, "_zt_tp_dim", None)
    if dim is None:
        return p.shape
    shape = list(p.shape)
    shape[dim] = int(p._zt_tp_full)
    return torch.Size(shape)


def _holders(model: nn.Module) -> dict[int, nn.Module]:
    """Parameter id -> the first module that holds it directly."""
    out = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            out.setdefault(id(p), m)
    return out


def filler(model: nn.Module, param_init_fn=None):
    """``fill(params)``: initialise ``params`` (given storage by the caller) the chosen way; and
    whether parameters are filled one at a time."""
    holders = _holders(model)
    if param_init_fn is not None:
        if not callable(param_init_fn):
            raise ValueError(f"param_init_fn={param_init_fn!r} must be a callable taking a module")
        return lambda params: _per_module(params, holders, param_init_fn), False
    init_weights = getattr(model, "init_weights", None)
    if callable(init_weights):
        return lambda params: init_weights(), True

    def reset(module):
        if not hasattr(module, "reset_parameters"):
            raise ValueError(f"shard_model: {type(module).__name__} holds meta parameters but has no "
                             "reset_parameters(); pass param_init_fn=... to initialise it, or give the "
                             "model an init_weights() that fills parameters which are not on meta")
        module.reset_parameters()
    return lambda params: _per_module(params, holders, reset), False


def _per_module(params, holders, init) -> None:
    seen = []
    for p in params:
        m = holders[id(p)]
        if not any(m is s for s in seen):
            seen.append(m)
            init(m)


def _groups(params: list[nn.Parameter], holders, one_at_a_time: bool) -> list[list[int]]:
    if one_at_a_time:
        return [[i] for i in range(len(params))]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(id(holders[id(p)]), []).append(i)
    return list(groups.values())


@torch.no_grad()
def materialize_values(model: nn.Module, params: list[nn.Parameter], views: list[torch.Tensor], fill,
                       one_at_a_time: bool) -> None:
    """Initialise the meta ``params`` into ``views`` (each parameter's view of a flat buffer);
    the parameters are back on meta afterwards."""
    holders = _holders(model)
    for group in _groups(params, holders, one_at_a_time):
        temps = {}
        for i in group:
            p, view = params[i], views[i]
            shape = dense_shape(p)
            temps[i] = view if shape == p.shape else torch.empty(shape, dtype=view.dtype, device=view.device)
            swap_in(p, temps[i])
        fill([params[i] for i in group])
        for i in group:
            p = params[i]
            if temps[i] is not views[i]:
                views[i].copy_(shard_like(temps[i], p))
            elif p.data_ptr() != views[i].data_ptr():
                views[i].copy_(p.detach())           # the init replaced the storage
            to_meta(p)


def check_buffers(model: nn.Module) -> None:
    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if meta:
        raise ValueError(f"shard_model: buffers {meta[:5]} are on the meta device; zerotrain materialises "
                         "parameters only. Create buffers on a real device (register them with "
                         "device='cpu' in __init__, or after shard_model)")
