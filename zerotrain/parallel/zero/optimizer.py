"""``ShardedOptimizer``: any element-wise torch optimizer, run on this rank's master shard.

A step has three visible phases: finish the gradient reductions backward started; update the
master shard (unscale, overflow check, clip, the wrapped optimizer's own ``step``); make the
parameters follow (copy, and at stages 1–2 all-gather). The wrapped optimizer sees, per param
group, 1-D views ("pieces") of the master shard and of the reduced gradient: maximal runs of
consecutive parameters of one group inside this rank's range.
"""
from __future__ import annotations

import math

import torch

from .. import clip
from ..precision import LossScaler
from .offload import OffloadPolicy, wait_for_host_copies
from .pieces import OwnedSlice, Piece, build_pieces, owned

ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax,
               torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Rprop,
               torch.optim.Adagrad)


class StepInfo:
    """What ``step()`` did. ``skipped``: a gradient was inf/nan on some rank (every dtype; in fp16
    also the loss-scale overflow), so no rank updated anything; ``grad_norm`` is then that
    non-finite norm and ``clipped_grad_norm`` None.

    The values may still be on the device when ``step()`` returns (a step that decides on the
    device never waits for it); reading one waits for it then, once."""

    def __init__(self, grad_norm, clipped_grad_norm, skipped, loss_scale: float | None):
        self._raw = {"grad_norm": grad_norm, "clipped_grad_norm": clipped_grad_norm, "skipped": skipped}
        self.loss_scale = loss_scale

    def _value(self, key: str):
        v = self._raw[key]
        if torch.is_tensor(v):
            v = self._raw[key] = v.item()
        return v

    @property
    def skipped(self) -> bool:
        return bool(self._value("skipped"))

    @property
    def grad_norm(self) -> float | None:
        return self._value("grad_norm")

    @property
    def clipped_grad_norm(self) -> float | None:
        return None if self.skipped else self._value("clipped_grad_norm")

    def __repr__(self) -> str:
        return (f"StepInfo(grad_norm={self.grad_norm}, clipped_grad_norm={self.clipped_grad_norm}, "
                f"skipped={self.skipped}, loss_scale={self.loss_scale})")


# optimizers whose ``fused=True`` implementation ShardedOptimizer selects when none is chosen
FUSED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def _is_elementwise(cls) -> bool:
    return issubclass(cls, ELEMENTWISE) or getattr(cls, "zerotrain_elementwise", False)


class ShardedOptimizer(torch.optim.Optimizer):
    """``ShardedOptimizer(model, torch.optim.AdamW, groups_or_None, lr=..., ...)``.

    ``model`` must have gone through ``shard_model``. ``max_grad_norm`` turns on clipping inside
    ``step()``; ``step()`` returns a :class:`StepInfo` with the pre- and post-clip norms.
    ``offload="cpu"`` keeps the master weights and optimizer state in (pinned) host memory and
    steps on the CPU (ZeRO-Offload, see ``offload.py``).
    """

    def __init__(self, model, optimizer_class=torch.optim.AdamW, params_or_groups=None, *,
                 max_grad_norm: float | None = None, norm_type: float = 2.0, offload=None,
                 pin_memory: bool = True, **kwargs):
        zs = getattr(model, "zero_state", None)
        if zs is None:
            raise ValueError("ShardedOptimizer: the model is not sharded; call "
                             "zerotrain.shard_model(model, stage=...) first")
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise ValueError(f"optimizer_class={optimizer_class!r} must be a torch.optim.Optimizer subclass")
        if zs.policy.shard_optimizer and not _is_elementwise(optimizer_class):
            raise ValueError(
                f"ShardedOptimizer: {optimizer_class.__name__} is not known to be element-wise; at "
                f"stage {zs.stage} each rank updates a flat 1/N slice, which changes the maths of an "
                "optimizer whose update mixes elements (LBFGS, Adafactor, ...). Use stage 0, an "
                f"element-wise optimizer ({', '.join(c.__name__ for c in ELEMENTWISE)}), or set "
                f"{optimizer_class.__name__}.zerotrain_elementwise = True if it is element-wise.")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm={max_grad_norm} must be > 0 (or None for no clipping)")
        self.offload = OffloadPolicy.coerce(offload, pin_memory=pin_memory)
        self.model, self.zs = model, zs
        self.max_grad_norm, self.norm_type = max_grad_norm, float(norm_type)
        groups = self._user_groups(params_or_groups)
        if self.offload is not None:
            for u in zs.units:
                u.offload(self.offload)
        kwargs = self._prefer_fused(optimizer_class, kwargs)
        probe = optimizer_class([torch.zeros(1)], **kwargs)       # validates kwargs, gives defaults
        super().__init__(groups, probe.defaults)
        group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        self._pieces: list[Piece] = build_pieces(zs.units, group_of, shaped=not zs.policy.shard_optimizer)
        inner_groups = [dict({k: v for k, v in g.items() if k != "params"},
                             params=[pc.tensor for pc in self._pieces if pc.group == gi])
                        for gi, g in enumerate(self.param_groups)]
        self.inner = optimizer_class(inner_groups, **kwargs)
        self.scaler = LossScaler(zs.mp.loss_scale) if zs.mp.loss_scale is not None else None
        self.last_step = StepInfo(None, None, False, self.loss_scale)

    # ------------------------------------------------------------------ construction
    def _prefer_fused(self, optimizer_class, kwargs: dict) -> dict:
        """Use torch's fused kernel when the optimizer has one and the caller chose no
        implementation: the master pieces are few, large, flat tensors, exactly what it is for
        (AdamW on CPU: ~8x faster than the per-tensor loop, no full-size temporaries). Pass
        ``fused=False`` (or ``foreach=...``) to keep torch's default implementation."""
        if any(k in kwargs for k in ("fused", "foreach", "differentiable", "capturable")):
            return kwargs
        if optimizer_class not in FUSED:
            return kwargs
        dtypes = {u.dtypes.master for u in self.zs.units}
        device = self.zs.units[0].master.device
        try:
            optimizer_class([torch.zeros(1, dtype=d, device=device) for d in dtypes],
                            **kwargs, fused=True)
        except (RuntimeError, ValueError, TypeError):
            return kwargs
        return dict(kwargs, fused=True)

    def _user_groups(self, params_or_groups):
        if params_or_groups is None:
            params_or_groups = [p for u in self.zs.units for p in u.params]
        groups = list(params_or_groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        names = {id(p): n for n, p in self.model.named_parameters()}
        for gi, g in enumerate(groups):
            g = dict(g)
            g["params"] = list(g["params"]) if not isinstance(g["params"], torch.Tensor) else [g["params"]]
            for p in g["params"]:
                if id(p) not in self.zs.param_index:
                    where = f"'{names[id(p)]}' (frozen)" if id(p) in names else "not from this model"
                    raise ValueError(f"ShardedOptimizer: param group {gi} has a parameter {where}; "
                                     "pass the sharded model's own trainable parameters")
            groups[gi] = g
        return groups

    # ------------------------------------------------------------------ public API
    @property
    def loss_scale(self) -> float | None:
        return self.scaler.scale if self.scaler else None

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Multiply by the fp16 loss scale (identity otherwise); call ``.backward()`` on the result."""
        return loss * self.scaler.scale if self.scaler else loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients. ``set_to_none`` (the default, as in torch) also gives the gradient
        buffers' memory back until the next backward needs it; False keeps them, zeroed."""
        self.zs.schedule.finish()
        for u in self.zs.units:
            u.zero_grads(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        with self.zs.schedule.step_phase():
            self.last_step = self._step()
        return self.last_step

    def _step(self) -> StepInfo:
        zs = self.zs
        wait_for_host_copies(zs.units)
        grads = [u.step_grads() for u in zs.units]
        # The reduced gradients are still a SUM over dp (stages 1-3) and loss-scaled (fp16). The
        # norm is taken on them as they are and rescaled (a norm is homogeneous), so the 1/N, the
        # unscale and the clip coefficient cost one pass over the gradients together. The norm is
        # also the non-finite check: an inf or nan anywhere makes it non-finite, and it has been
        # reduced over every rank that holds distinct gradients, so every rank decides alike.
        factor = self._grad_factor()
        norm = clip.global_grad_norm(zs.units, norm_type=self.norm_type, group=self._norm_group(),
                                     tp=zs.mesh.tp) * factor
        if self._decides_on_device:
            return self._step_on_device(grads, norm, factor)
        norm = float(norm)
        if not math.isfinite(norm):
            return self._skip(norm)
        for u in zs.units:
            u.mark_stepped()              # refuses gradients that were never reduced
        coef = clip.clip_coefficient(norm, self.max_grad_norm) if self.max_grad_norm else 1.0
        if factor * coef != 1.0:
            for g in grads:
                g.mul_(factor * coef)
        self._run_inner()
        for u in zs.units:
            u.params_from_master()
        if self.scaler is not None:
            self.scaler.update(False)
        return StepInfo(norm, norm * coef, False, self.loss_scale)

    @property
    def _decides_on_device(self) -> bool:
        """A fused optimizer skips an update itself when told ``found_inf`` (a tensor), so the step
        needs no host sync: the norm, the clip coefficient and the skip stay on the device. fp16's
        dynamic loss scale is decided on the host, so fp16 takes the host path."""
        return self.scaler is None and getattr(self.inner, "_step_supports_amp_scaling", False)

    def _step_on_device(self, grads, norm: torch.Tensor, factor: float) -> StepInfo:
        for u in self.zs.units:
            u.mark_stepped()
        nonfinite = ~torch.isfinite(norm)
        scale = clip.clip_coefficient_tensor(norm, self.max_grad_norm) if self.max_grad_norm else None
        if scale is not None or factor != 1.0:
            scale = factor if scale is None else scale * factor
            for g in grads:
                g.mul_(scale.to(g.device, non_blocking=True) if torch.is_tensor(scale) else scale)
        self.inner.grad_scale = None
        self.inner.found_inf = nonfinite.to(self.inner_device, torch.float32, non_blocking=True)
        self._run_inner()
        for u in self.zs.units:
            u.params_from_master()       # a skipped step copies back the unchanged master
        clipped = norm * (scale / factor) if torch.is_tensor(scale) else norm
        return StepInfo(norm, clipped, nonfinite, self.loss_scale)

    @property
    def inner_device(self) -> torch.device:
        return self._pieces[0].tensor.device if self._pieces else torch.device("cpu")

    # ------------------------------------------------------------------ step phases
    def _grad_factor(self) -> float:
        """What turns the reduced gradients into the mean, unscaled gradient."""
        factor = 1.0 / self.zs.mesh.dp if self.zs.policy.grad_factor_dp else 1.0
        if self.scaler is not None:
            factor /= self.scaler.scale
        return factor

    def _skip(self, norm: float) -> StepInfo:
        """A non-finite gradient on any rank: leave master weights and optimizer state as they
        are on every rank (fp16: lower the loss scale) and drop the gradients."""
        if self.scaler is not None:
            self.scaler.update(True)
        for u in self.zs.units:
            u.zero_grads()
        return StepInfo(norm, None, True, self.loss_scale)

    def _norm_group(self):
        mesh = self.zs.mesh
        return mesh.world_group if self.zs.policy.shard_optimizer else mesh.tp_group

    def _run_inner(self) -> None:
        for pc in self._pieces:
            g = pc.grad_view()
            pc.tensor.grad = g if g.dtype == pc.tensor.dtype else g.to(pc.tensor.dtype)
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update({k: v for k, v in outer.items() if k != "params"})
        self.inner.step()
        for pc in self._pieces:
            pc.tensor.grad = None

    # ------------------------------------------------------------------ state
    def owned_slices(self) -> list[OwnedSlice]:
        """Every parameter slice this rank updates, with views of its master, reduced gradient and
        optimizer state (element-wise tensors) and the per-piece scalar state."""
        return [s for pc in self._pieces for s in owned(pc, self.inner.state.get(pc.tensor, {}))]

    def load_owned_state(self, fill, *, state_dtypes: dict, scalars_of) -> None:
        """Rebuild the wrapped optimizer's state slice by slice: ``fill(owned_slice, key, out)``
        writes state ``key`` of one slice into the 1-D ``out``; ``scalars_of(name)`` gives the
        scalar state ({key: value}) saved with parameter ``name``. The assembled state goes
        through the wrapped optimizer's own ``load_state_dict``, which places each value where that
        optimizer keeps it."""
        saved = self.inner.state_dict()
        index = {id(t): i for i, t in enumerate(t for g in self.inner.param_groups for t in g["params"])}
        state = {}
        for pc in self._pieces:
            piece_state = {k: torch.empty(pc.tensor.shape, dtype=dt, device=pc.tensor.device)
                           for k, dt in state_dtypes.items()}
            for s in owned(pc, piece_state):
                for key, out in s.state.items():
                    fill(s, key, out)
            piece_state.update(scalars_of(pc.slices[0].name))
            if piece_state:
                state[index[id(pc.tensor)]] = piece_state
        self.inner.load_state_dict({"state": state, "param_groups": saved["param_groups"]})

    def state_dict(self) -> dict:
        """This rank's shard of the state (load it back at the same stage and dp size)."""
        inner = self.inner.state_dict()
        return {"inner": inner, "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                 for g in self.param_groups],
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "layout": {"stage": self.zs.stage, "dp": self.zs.mesh.dp, "dp_rank": self.zs.mesh.dp_rank}}

    def load_state_dict(self, state_dict: dict) -> None:
        mine = {"stage": self.zs.stage, "dp": self.zs.mesh.dp, "dp_rank": self.zs.mesh.dp_rank}
        if state_dict.get("layout") != mine:
            raise ValueError(f"optimizer state was saved with layout {state_dict.get('layout')}, this "
                             f"optimizer is {mine}; use zerotrain's checkpoint loader to reshard")
        self.inner.load_state_dict(state_dict["inner"])
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update(saved)
        if self.scaler and state_dict.get("scaler"):
            self.scaler.load_state_dict(state_dict["scaler"])
