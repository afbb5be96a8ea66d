"""The top-level :class:`ZeroTrainConfig`, batch resolution (:class:`ResolvedBatch`) and the field walk."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import Field, model_validator

from zerotrain.config.blocks import (ActivationCheckpointingConfig, BF16Config, Bool, FP16Config, NonNeg, NonNegInt, OptimizerConfig, PosInt,
                                     SchedulerConfig, SGDParams, TensorParallelConfig, ZeroConfig,
                                     ZeroTrainExtras, _Block)
from zerotrain.config.errors import ConfigError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass(frozen=True)
class ResolvedBatch:
    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int
    dp_size: int
    derivation: dict[str, str] = field(default_factory=dict)  # derived key -> how it was computed


class ZeroTrainConfig(_Block):
    train_batch_size: Optional[PosInt] = None
    train_micro_batch_size_per_gpu: Optional[PosInt] = None
    gradient_accumulation_steps: Optional[PosInt] = None
    optimizer: Optional[OptimizerConfig] = None
    scheduler: Optional[SchedulerConfig] = None
    fp16: FP16Config = Field(default_factory=FP16Config)
    bf16: BF16Config = Field(default_factory=BF16Config)
    gradient_clipping: NonNeg = 0.0          # 0: no clipping
    zero_optimization: ZeroConfig = Field(default_factory=ZeroConfig)
    steps_per_print: PosInt = 10
    wall_clock_breakdown: Bool = False
    seed: Optional[NonNegInt] = None
    tensor_parallel: TensorParallelConfig = Field(default_factory=TensorParallelConfig)
    activation_checkpointing: ActivationCheckpointingConfig = Field(default_factory=ActivationCheckpointingConfig)
    zerotrain: ZeroTrainExtras = Field(default_factory=ZeroTrainExtras)
    INERT = frozenset({"wall_clock_breakdown"})

    @model_validator(mode="after")
    def _consistent(self) -> ZeroTrainConfig:
        problems = []
        if self.fp16.enabled and self.bf16.enabled:
            problems.append("fp16.enabled and bf16.enabled are both true; enable at most one")
        tbs, micro, gas = (getattr(self, k) for k in BATCH_KEYS)
        per_rank = (micro or 1) * (gas or 1)
        if tbs is None and micro is None:
            problems.append("train_batch_size or train_micro_batch_size_per_gpu must be set "
                            "(gradient_accumulation_steps alone cannot fix the batch)")
        elif tbs is not None and tbs % per_rank:
            problems.append(f"train_batch_size {tbs} is not a multiple of train_micro_batch_size_per_gpu "
                            f"{micro or 1} × gradient_accumulation_steps {gas or 1} = {per_rank}; "
                            "no data-parallel size fits")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def recompute_units(self) -> bool:
        """Per-unit activation checkpointing: on when the config has an activation_checkpointing block."""
        return "activation_checkpointing" in self.model_fields_set

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16.enabled else "bf16" if self.bf16.enabled else "fp32"

    def build_optimizer_spec(self) -> tuple[type, dict[str, Any]]:
        """(torch optimizer class, constructor kwargs) for the ``optimizer`` block."""
        import torch
        if self.optimizer is None:
            raise ConfigError("optimizer: not set in the config; add an optimizer block or pass one")
        p = self.optimizer.params
        if isinstance(p, SGDParams):
            return torch.optim.SGD, p.model_dump()
        cls = torch.optim.AdamW if p.adam_w_mode else torch.optim.Adam
        return cls, dict(lr=p.lr, betas=p.betas, eps=p.eps, weight_decay=p.weight_decay, amsgrad=p.amsgrad)

    def resolve(self, dp_size: int) -> ResolvedBatch:
        """Fill in the batch triple for ``dp_size`` data-parallel ranks: tbs = micro × gas × dp."""
        return _resolve_batch(self, dp_size)

    def inert_keys(self) -> list[str]:
        """Dotted paths the user set that zerotrain accepts but does not act on."""
        return [path for path, _, source, inert in _walk(self, "") if inert and source == "user"]


def _resolve_batch(cfg: ZeroTrainConfig, dp: int) -> ResolvedBatch:
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise ConfigError(f"data-parallel size must be a positive integer, got {dp!r}")
    tbs, micro, gas = (getattr(cfg, k) for k in BATCH_KEYS)
    how: dict[str, str] = {}
    if gas is None and (micro is None or tbs is None):
        gas, how["gradient_accumulation_steps"] = 1, "default 1 (only one batch size given)"
    if micro is None:
        micro, rest = divmod(tbs, gas * dp)
        if rest:
            raise ConfigError(f"train_batch_size {tbs} is not divisible by gradient_accumulation_steps "
                              f"{gas} × data-parallel size {dp} = {gas * dp}")
        how["train_micro_batch_size_per_gpu"] = f"{tbs} / ({gas} × {dp})"
    elif gas is None:
        gas, rest = divmod(tbs, micro * dp)
        if rest or gas == 0:
            raise ConfigError(f"train_batch_size {tbs} is not divisible by train_micro_batch_size_per_gpu "
                              f"{micro} × data-parallel size {dp} = {micro * dp}")
        how["gradient_accumulation_steps"] = f"{tbs} / ({micro} × {dp})"
    elif tbs is None:
        tbs, how["train_batch_size"] = micro * gas * dp, f"{micro} × {gas} × {dp}"
    if tbs != micro * gas * dp:
        raise ConfigError(f"train_batch_size {tbs} != train_micro_batch_size_per_gpu {micro} × "
                          f"gradient_accumulation_steps {gas} × data-parallel size {dp} = {micro * gas * dp}")
    return ResolvedBatch(tbs, micro, gas, dp, how)


def _walk(model: _Block, prefix: str):
    """Yield (dotted path, value, "user" | "default", inert) for every leaf field."""
    inert = model.inert_fields()
    for name in type(model).model_fields:
        value, path = getattr(model, name), prefix + name
        if isinstance(value, _Block):
            for row in _walk(value, path + "."):
                yield row[0], row[1], row[2], row[3] or name in inert
        else:
            yield path, value, "user" if name in model.model_fields_set else "default", name in inert
