"""Learning-rate schedules named and parameterised like DeepSpeed's: WarmupLR, WarmupDecayLR, WarmupCosineLR.

Each is a ``torch.optim.lr_scheduler.LRScheduler`` and works on any ``torch.optim.Optimizer``
(subclasses included). The learning rate is a closed-form function ``f(t)`` of
``t = last_epoch``, the number of ``step()`` calls after construction:

* warmup (t < W, with W = max(2, warmup_num_steps)):
  ``log``: g = ln(t + 1) / ln(W);  ``linear``: g = t / W.
* WarmupLR:        lr = min_lr + (max_lr - min_lr) * g, then max_lr from t = W on.
* WarmupDecayLR:   as WarmupLR during warmup, then g = max(0, (T - t) / max(1, T - W)).
* WarmupCosineLR:  ratio = r0 + (1 - r0) * g during warmup (r0 = warmup_min_ratio), then with
  p = min(1, (t - W + 1) / max(1, T - W)):  ratio = c + (1 - c) * (1 + cos(pi p)) / 2
  (c = cos_min_ratio); lr = base_lr * ratio, base_lr being the optimizer's lr at construction.

Step convention: torch's. Construction applies f(0); the k-th ``step()`` applies f(k), so
optimizer step t (counting from 0) runs at f(t). DeepSpeed's engine runs its first two
optimizer steps at the warmup start and step t at f(t - 1) from then on; zerotrain does not
repeat the first value.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

WARMUP_TYPES = ("log", "linear")

__all__ = ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "build_scheduler", "warmup_gamma"]


def warmup_gamma(step: int, warmup_num_steps: int, warmup_type: str) -> float:
    """Fraction of the warmup done at ``step``: 0 at step 0, 1 from max(2, warmup_num_steps) on."""
    total = max(2, warmup_num_steps)
    if step >= total:
        return 1.0
    if warmup_type == "log":
        return math.log(step + 1) / math.log(total)
    return step / total


def _check(warmup_num_steps: int, warmup_type: str, total_num_steps: int | None = None) -> None:
    if isinstance(warmup_num_steps, bool) or not isinstance(warmup_num_steps, int) or warmup_num_steps < 1:
        raise ValueError(f"warmup_num_steps must be a positive integer, got {warmup_num_steps!r}")
    if warmup_type not in WARMUP_TYPES:
        raise ValueError(f"warmup_type must be 'log' or 'linear', got {warmup_type!r}")
    if total_num_steps is None:
        return
    if isinstance(total_num_steps, bool) or not isinstance(total_num_steps, int) or total_num_steps < 1:
        raise ValueError(f"total_num_steps must be a positive integer, got {total_num_steps!r}")
    if total_num_steps < warmup_num_steps:
        raise ValueError(f"total_num_steps {total_num_steps} is less than warmup_num_steps "
                         f"{warmup_num_steps}; raise total_num_steps or shorten the warmup")


def _per_group(value: float | Sequence[float], optimizer: Optimizer, name: str) -> list[float]:
    count = len(optimizer.param_groups)
    if isinstance(value, (int, float)):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} values but the optimizer has {count} param groups")
    return values


class WarmupLR(LRScheduler):
    """Warm up from ``warmup_min_lr`` to ``warmup_max_lr`` (default: the optimizer's lr), then hold."""

    def __init__(self, optimizer: Optimizer, *, warmup_min_lr: float | Sequence[float] = 0.0,
                 warmup_max_lr: float | Sequence[float] | None = None, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_epoch: int = -1) -> None:
        _check(warmup_num_steps, warmup_type)
        self.warmup_num_steps = warmup_num_steps
        self.warmup_type = warmup_type
        self.min_lrs = _per_group(warmup_min_lr, optimizer, "warmup_min_lr")
        self.max_lrs = None if warmup_max_lr is None else _per_group(warmup_max_lr, optimizer, "warmup_max_lr")
        super().__init__(optimizer, last_epoch)

    def _gamma(self, step: int) -> float:
        return warmup_gamma(step, self.warmup_num_steps, self.warmup_type)

    def get_lr(self) -> list[float]:
        top = self.max_lrs if self.max_lrs is not None else [float(lr) for lr in self.base_lrs]
        gamma = self._gamma(self.last_epoch)
        return [low + (high - low) * gamma for low, high in zip(self.min_lrs, top)]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to 0 at ``total_num_steps``. ``warmup_max_lr`` defaults to 1e-3."""

    def __init__(self, optimizer: Optimizer, total_num_steps: int, *,
                 warmup_min_lr: float | Sequence[float] = 0.0,
                 warmup_max_lr: float | Sequence[float] | None = 0.001, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_epoch: int = -1) -> None:
        _check(warmup_num_steps, warmup_type, total_num_steps)
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr=warmup_min_lr, warmup_max_lr=warmup_max_lr,
                         warmup_num_steps=warmup_num_steps, warmup_type=warmup_type, last_epoch=last_epoch)

    def _gamma(self, step: int) -> float:
        warmup = max(2, self.warmup_num_steps)
        if step < warmup:
            return warmup_gamma(step, self.warmup_num_steps, self.warmup_type)
        return max(0.0, (self.total_num_steps - step) / max(1.0, self.total_num_steps - warmup))


class WarmupCosineLR(LRScheduler):
    """Warm up the lr ratio from ``warmup_min_ratio`` to 1, then cosine-decay it to ``cos_min_ratio``."""

    def __init__(self, optimizer: Optimizer, total_num_steps: int, *, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001,
                 warmup_type: str = "log", last_epoch: int = -1) -> None:
        _check(warmup_num_steps, warmup_type, total_num_steps)
        self.total_num_steps = total_num_steps
        self.warmup_min_ratio = float(warmup_min_ratio)
        self.warmup_num_steps = warmup_num_steps
        self.cos_min_ratio = float(cos_min_ratio)
        self.warmup_type = warmup_type
        super().__init__(optimizer, last_epoch)

    def lr_ratio(self, step: int) -> float:
        warmup = max(2, self.warmup_num_steps)
        if step < warmup:
            gamma = warmup_gamma(step, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * gamma
        progress = min(1.0, (step - warmup + 1) / max(1, self.total_num_steps - warmup))
        cosine = (1.0 + math.cos(math.pi * progress)) / 2.0
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self) -> list[float]:
        ratio = self.lr_ratio(self.last_epoch)
        return [float(lr) * ratio for lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


_SCHEDULERS = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR}


def build_scheduler(optimizer: Optimizer, scheduler_cfg: Any) -> LRScheduler | None:
    """The scheduler a config's ``scheduler`` block describes (a parsed block or a raw dict); None for None."""
    if scheduler_cfg is None:
        return None
    if isinstance(scheduler_cfg, dict):
        from zerotrain.config import parse_scheduler
        scheduler_cfg = parse_scheduler(scheduler_cfg)
    kwargs = scheduler_cfg.params.model_dump()
    cls = _SCHEDULERS[scheduler_cfg.type]
    if "total_num_steps" in kwargs:
        return cls(optimizer, kwargs.pop("total_num_steps"), **kwargs)
    return cls(optimizer, **kwargs)
