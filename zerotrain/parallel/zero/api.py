"""``shard_model``: the PyTorch-style face of ZeRO.

The model stays the user's module (its class gains a few methods, as with FSDP2's
``fully_shard``); its parameters become views into flat per-unit buffers and hooks drive the
gather / free / reduce schedule for the chosen stage.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging

import torch
import torch.nn as nn

from ...distributed import comm
from ...distributed.mesh import Mesh
from ..checkpointing import apply_activation_checkpointing
from ..precision import MixedPrecision
from .full_state import load_full_state_dict
from .hooks import StepSchedule
from .materialize import check_buffers, filler, materialize_values, swap_in
from .policy import policy_for
from .scratch import ScratchPool
from .unit import ParamSlice, ShardedUnit, UnitDtypes

log = logging.getLogger("zerotrain")


def default_wrap(model: nn.Module) -> list[nn.Module]:
    """Each child of a ModuleList/Sequential holding >= 2 modules of one class (transformer-block-like)."""
    units = []
    for m in model.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2:
            kids = list(m)
            if len({type(k) for k in kids}) == 1 and any(True for k in kids for _ in k.parameters()):
                units.extend(k for k in kids if not any(k is u or _inside(k, u) for u in units))
    return units


def _inside(module: nn.Module, other: nn.Module) -> bool:
    return any(module is m for m in other.modules())


def _assign_params(model: nn.Module, unit_modules: list[nn.Module]):
    """Parameter → owning unit module (None = root). A parameter used by two units goes to root."""
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(p, name)
    owners: dict[nn.Parameter, set] = {}
    for i, m in enumerate(unit_modules):
        for p in m.parameters():
            owners.setdefault(p, set()).add(i)
    per_unit = [[] for _ in unit_modules]
    root = []
    for p, name in names.items():
        if not p.requires_grad:
            continue                        # frozen parameters stay replicated and untouched
        owner = owners.get(p, set())
        (per_unit[next(iter(owner))] if len(owner) == 1 else root).append((name, p))
    return per_unit, root


class ZeroState:
    """Everything ``shard_model`` attaches to a model (``model.zero_state``)."""

    def __init__(self, *, mesh: Mesh, policy, mp: MixedPrecision, units, root, schedule,
                 dtypes: UnitDtypes, recomputed=()):
        self.mesh, self.policy, self.mp = mesh, policy, mp
        self.recomputed = list(recomputed)    # units under activation checkpointing
        self.units, self.root, self.schedule = units, root, schedule
        self.dtypes = dtypes
        self.param_index = {id(p): (u, i) for u in units for i, p in enumerate(u.params)}

    @property
    def stage(self) -> int:
        return self.policy.stage

    def owned_slices(self) -> list[ParamSlice]:
        """Every parameter slice whose master this rank keeps, unit by unit in flat order."""
        return [s for u in self.units for s in u.owned_slices()]


class ShardedModule:
    """Mixed into the user's model class by ``shard_model``."""

    zero_state: ZeroState

    @contextlib.contextmanager
    def no_sync(self):
        """Skip gradient reduction for the backward passes inside (accumulate locally instead)."""
        sched = self.zero_state.schedule
        prev, sched.sync_grads = sched.sync_grads, False
        try:
            yield
        finally:
            sched.sync_grads = prev

    def state_dict(self, *args, **kwargs):
        """The module's state dict (stages 0–2; at stage 3 use ``full_state_dict``)."""
        for u in self.zero_state.units:
            u.wait_params()
        return super().state_dict(*args, **kwargs)

    @contextlib.contextmanager
    def gathered_parameters(self):
        """Full parameters on every rank inside the block (stage 3 gathers them; read-only use)."""
        units = self.zero_state.units
        for u in units:
            u.unshard()
        try:
            yield
        finally:
            for u in units:
                u.reshard()

    def load_full_state_dict(self, source, *, strict: bool = True) -> None:
        """Load full (dense, HF-style) values — a state dict or a safetensors file — one unit at a
        time, each rank keeping what its stage keeps (see ``full_state.py``). Load before building
        the optimizer, or its state will not match the new weights."""
        load_full_state_dict(self, source, strict=strict)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """A full, unsharded copy of the module's state (parameters in master precision)."""
        with self.gathered_parameters():
            return {k: v.detach().clone() for k, v in self.state_dict().items()}


def _check_same_everywhere(mesh: Mesh, stage, mp: MixedPrecision, per_unit, root) -> None:
    shapes = [[(n, tuple(p.shape), str(p.dtype)) for n, p in u] for u in per_unit + [root]]
    desc = {"stage": stage, "param_dtype": str(mp.param_dtype), "reduce_dtype": str(mp.reduce_dtype),
            "dp": mesh.dp, "tp": mesh.tp,
            "layout": hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]}
    seen = comm.all_gather_object(desc, mesh.world_group)
    for key in desc:
        values = {r: d[key] for r, d in enumerate(seen)}
        if len(set(map(str, values.values()))) > 1:
            raise ValueError(f"shard_model: ranks disagree on {key}: "
                             + ", ".join(f"rank {r}: {v}" for r, v in values.items())
                             + ". Every rank must build the same model and pass the same arguments.")


def shard_model(model: nn.Module, *, stage: int, mesh: Mesh | None = None, mixed_precision=None,
                wrap=None, sync_module_states: bool = True, prefetch: bool = True,
                activation_checkpointing=False, param_init_fn=None, device=None) -> nn.Module:
    """Shard ``model`` in place over the data-parallel group of ``mesh`` and return it.

    ``stage``: 0 plain data parallel, 1 optimizer states sharded, 2 + gradients, 3 + parameters.
    ``mixed_precision``: None, "bf16"/"fp16"/"fp32" or a :class:`MixedPrecision`.
    ``wrap``: the modules that become units (a list, or a callable ``module -> bool``); default:
    each block of a ModuleList of identical blocks. Everything else is in the root unit.
    ``activation_checkpointing``: True (every unit but the root) or a callable ``module -> bool``:
    those units keep only their inputs and recompute their activations in backward.
    ``device``: where the parameters and states live (default: the mesh's device — the rank's GPU
    under NCCL — or, in a single process, where the model is). A model on another device is moved
    there unit by unit. A model built on the meta device is materialised unit by unit, holding
    only what the stage keeps, initialised by ``param_init_fn(module)``, the model's
    ``init_weights()`` or each module's ``reset_parameters()`` (see ``materialize.py``).
    """
    policy = policy_for(stage)
    if isinstance(model, ShardedModule):
        raise ValueError("shard_model: this model is already sharded; call it once per model")
    mp = MixedPrecision.coerce(mixed_precision)
    mesh = mesh or Mesh.default()
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"shard_model: {type(model).__name__} has no trainable parameters; "
                         "nothing to shard (check requires_grad or that the model is built)")
    meta = any(p.is_meta for p in model.parameters())
    if meta:
        check_buffers(model)
    device = _target_device(model, mesh, device, meta)
    unit_modules = _select_units(model, wrap)
    per_unit, root_params = _assign_params(model, unit_modules)
    recomputed = apply_activation_checkpointing(unit_modules, activation_checkpointing) \
        if activation_checkpointing is not False else []
    _check_same_everywhere(mesh, stage, mp, per_unit, root_params)

    first = next(p for p in model.parameters() if p.requires_grad)
    master = first.dtype if first.dtype in (torch.float32, torch.float64) else torch.float32
    dtypes = UnitDtypes(param=mp.param_dtype or first.dtype, master=master,
                        reduce=mp.reduce_dtype or master)
    # stages 2-3 reuse full-size pack buffers; stage 1's receive scratch is allocated per
    # reduction: pooling it too left idle buffers beside the ones in flight and cost the largest
    # stage-1 model a 4% search step at 16 GB, for ~1% of step time
    scratch = ScratchPool(keep=StepSchedule.MAX_IN_FLIGHT + 1 if policy.shard_grads else 0)
    kw = dict(policy=policy, group=mesh.dp_group, dtypes=dtypes, scratch=scratch, device=device)
    module_names = {m: n for n, m in model.named_modules()}
    units, root = [], None
    if root_params:
        root = ShardedUnit(model, root_params, index=0, name="root", **kw)
        units.append(root)
    for m, params in zip(unit_modules, per_unit):
        if params:
            units.append(ShardedUnit(m, params, index=len(units), name=module_names[m], **kw))
    if meta:
        _materialize(model, units, param_init_fn, device=device, sync=sync_module_states)
    else:
        for u in units:
            u.adopt_params(sync_from_rank0=sync_module_states)
        _move_rest(model, device)
    schedule = StepSchedule(units, root, prefetch=prefetch)
    _install_hooks(model, units, schedule)
    model.zero_state = ZeroState(mesh=mesh, policy=policy, mp=mp, units=units, root=root,
                                 schedule=schedule, dtypes=dtypes,
                                 recomputed=[u for u in units if any(u.module is m for m in recomputed)])
    model.__class__ = type(f"Sharded{type(model).__name__}", (ShardedModule, type(model)), {})
    log.info("shard_model: stage %d over dp=%d, %d units, %d parameters, param %s / master %s / reduce %s",
             stage, mesh.dp, len(units), sum(u.layout.numel for u in units), dtypes.param, dtypes.master,
             dtypes.reduce)
    return model


def _target_device(model, mesh: Mesh, device, meta: bool) -> torch.device:
    if device is not None:
        return torch.device(device)
    if meta or mesh.world_size > 1:
        return mesh.device
    return next(model.parameters()).device      # one process: where the user built the model


def _materialize(model, units, param_init_fn, *, device, sync: bool) -> None:
    """Meta → device, one unit at a time (see materialize.py); every unit stays on meta until all
    are filled, so the model's init never sees a unit's freed stage-3 storage."""
    fill, one_at_a_time = filler(model, param_init_fn)
    for u in units:
        values = u.new_values()
        materialize_values(model, u.params, u.layout.views(values), fill, one_at_a_time)
        values[u.layout.numel:].zero_()
        u.load_values(values, sync_from_rank0=sync)
    for u in units:
        u.bind_params()
    frozen = [p for p in model.parameters() if p.is_meta]      # not in any unit: kept whole
    for p in frozen:
        value = torch.empty(p.shape, dtype=p.dtype, device=device)
        materialize_values(model, [p], [value], fill, one_at_a_time)
        swap_in(p, value)


def _move_rest(model, device) -> None:
    """Frozen parameters and buffers follow the units to ``device``."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device != device:
                t.data = t.data.to(device)


def _select_units(model, wrap) -> list[nn.Module]:
    if wrap is None:
        return default_wrap(model)
    if callable(wrap) and not isinstance(wrap, (list, tuple)):
        chosen = [m for m in model.modules() if m is not model and wrap(m)]
    else:
        chosen = list(wrap)
    outer = []
    for m in chosen:
        if m is model:
            raise ValueError("shard_model: wrap must not include the model itself (it is the root unit)")
        if not any(_inside(m, o) for o in outer):
            outer.append(m)
    return outer


def _install_hooks(model, units, schedule: StepSchedule) -> None:
    # the model's own hooks bracket every unit's: its pre-hook runs first, its post-hook last
    model.register_forward_pre_hook(lambda m, a: schedule.begin_forward(), prepend=True)
    for unit in units:
        module = unit.module
        module.register_forward_pre_hook(lambda m, a, u=unit: schedule.pre_forward(u))
        module.register_forward_hook(lambda m, a, out, u=unit: schedule.post_forward(u, out))
        for i, p in enumerate(unit.params):
            p.register_post_accumulate_grad_hook(lambda p, u=unit, i=i: schedule.on_grad(u, i))
    model.register_forward_hook(lambda m, a, out: schedule.end_forward())
