"""Mixed-precision policy and the fp16 dynamic loss scaler."""
from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp64": torch.float64, "float64": torch.float64}


def as_dtype(value, field: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise ValueError(f"{field}={value!r} is not a dtype; use one of {sorted(set(_DTYPES))} or a torch.dtype")


@dataclass(frozen=True)
class LossScaleConfig:
    """fp16 dynamic loss scaling. ``static_scale`` set → a fixed scale, no dynamics."""
    initial_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1000
    hysteresis: int = 1           # overflows tolerated before the scale is lowered
    min_scale: float = 1.0
    static_scale: float | None = None

    def __post_init__(self):
        if self.initial_scale <= 0 or (self.static_scale is not None and self.static_scale <= 0):
            raise ValueError("loss scale must be > 0")
        if not 0 < self.backoff_factor < 1 or self.growth_factor < 1:
            raise ValueError("need 0 < backoff_factor < 1 and growth_factor >= 1")
        if self.growth_interval < 1 or self.hysteresis < 1:
            raise ValueError("growth_interval and hysteresis must be >= 1")


@dataclass(frozen=True)
class MixedPrecision:
    """``param_dtype``: compute/storage dtype of the parameters the model sees (None: keep the model's).
    ``reduce_dtype``: dtype gradients are reduced and accumulated in (None: the master dtype, fp32).
    Master weights are fp32 (fp64 if the model is fp64). fp16 turns on dynamic loss scaling."""
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    loss_scale: LossScaleConfig | None = None

    @classmethod
    def coerce(cls, value) -> "MixedPrecision":
        if value is None:
            return cls()
        if isinstance(value, cls):
            mp = value
        elif isinstance(value, (str, torch.dtype)):
            mp = cls(param_dtype=as_dtype(value, "mixed_precision"))
        else:
            raise ValueError(f"mixed_precision={value!r}: pass 'bf16', 'fp16', 'fp32', a torch.dtype "
                             "or zerotrain.MixedPrecision(...)")
        mp = cls(as_dtype(mp.param_dtype, "param_dtype"), as_dtype(mp.reduce_dtype, "reduce_dtype"),
                 mp.loss_scale)
        if mp.param_dtype == torch.float16 and mp.loss_scale is None:
            mp = cls(mp.param_dtype, mp.reduce_dtype, LossScaleConfig())
        return mp


class LossScaler:
    """Dynamic loss scale: back off after ``hysteresis`` overflows, grow after ``growth_interval``
    clean steps. Decisions are made from a flag already agreed on by every rank."""

    def __init__(self, cfg: LossScaleConfig):
        self.cfg = cfg
        self.scale = float(cfg.static_scale or cfg.initial_scale)
        self._good_steps = 0
        self._hysteresis_left = cfg.hysteresis

    @property
    def dynamic(self) -> bool:
        return self.cfg.static_scale is None

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            self._good_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale * self.cfg.backoff_factor, self.cfg.min_scale)
                self._hysteresis_left = self.cfg.hysteresis
            return
        self._good_steps += 1
        if self._good_steps >= self.cfg.growth_interval:
            self.scale *= self.cfg.growth_factor
            self._good_steps = 0
            self._hysteresis_left = self.cfg.hysteresis

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self._good_steps, "hysteresis_left": self._hysteresis_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._good_steps = int(state["good_steps"])
        self._hysteresis_left = int(state["hysteresis_left"])
