"""The config blocks below the top level: field types, precision, ZeRO, optimizer, scheduler, extras."""
from __future__ import annotations

from typing import Annotated, Any, Callable, ClassVar, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Strict, Tag,
                      create_model, field_validator, model_validator)


def _rule(test: Callable[[Any], bool], message: str) -> AfterValidator:
    """A check whose failure message is ``message.format(v=value)``."""
    def check(value: Any) -> Any:
        if not test(value):
            raise ValueError(message.format(v=value))
        return value
    return AfterValidator(check)


PosInt = Annotated[int, Strict(), Field(ge=1)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
# DeepSpeed configs write sizes as 5e8: a float with an integral value counts as an int.
Count = Annotated[int, BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v),
                  Strict(), Field(ge=0)]
NonNeg = Annotated[float, Strict(), Field(ge=0)]
Ratio = Annotated[float, Strict(), Field(ge=0, le=1)]
Beta = Annotated[float, Strict(), Field(ge=0, lt=1)]
Bool = Annotated[bool, Strict()]
LrValue = Union[NonNeg, list[NonNeg]]
WarmupType = Literal["log", "linear"]


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")
    INERT: ClassVar[frozenset[str]] = frozenset()

    def inert_fields(self) -> set[str]:
        """Fields of this block that are accepted but have no effect."""
        return set(self.INERT)


class FP16Config(_Block):
    enabled: Bool = False
    loss_scale: NonNeg = 0.0                 # 0: dynamic loss scaling
    initial_scale_power: NonNegInt = 16      # dynamic scaling starts at 2**initial_scale_power
    loss_scale_window: PosInt = 1000
    hysteresis: PosInt = 2
    consecutive_hysteresis: Bool = False
    min_loss_scale: Annotated[float, Strict(), Field(gt=0)] = 1.0

    def inert_fields(self) -> set[str]:
        return set() if self.enabled else set(type(self).model_fields) - {"enabled"}


class BF16Config(_Block):
    enabled: Bool = False


class OffloadConfig(_Block):
    """``offload_optimizer``: ZeRO-Offload — fp32 master and optimizer states on the CPU."""
    device: Annotated[Literal["none", "cpu", "nvme"], _rule(lambda d: d != "nvme", (
        "offload to 'nvme' is not supported by zerotrain; use \"cpu\" or \"none\""))] = "none"
    pin_memory: Bool = True
    buffer_count: Optional[PosInt] = None
    fast_init: Bool = False
    INERT = frozenset({"buffer_count", "fast_init"})

    def inert_fields(self) -> set[str]:
        return set(type(self).model_fields) if self.device == "none" else set(self.INERT)


class ParamOffloadConfig(_Block):
    """``offload_param`` (parameters on the CPU between uses) is not implemented: only "none"."""
    device: Annotated[Literal["none", "cpu", "nvme"], _rule(lambda d: d == "none", (
        "parameter offload to {v!r} is not supported by zerotrain; set device to \"none\" (optimizer "
        "states can be offloaded with offload_optimizer)"))] = "none"
    pin_memory: Bool = True

    def inert_fields(self) -> set[str]:
        return set(type(self).model_fields)     # only device "none" gets this far


class ZeroConfig(_Block):
    stage: Annotated[int, Strict(), _rule(lambda s: s in (0, 1, 2, 3),
                                          "stage {v} is not a ZeRO stage; valid stages are 0, 1, 2, 3")] = 0
    reduce_bucket_size: Count = 500_000_000
    allgather_bucket_size: Count = 500_000_000
    overlap_comm: Optional[Bool] = None
    contiguous_gradients: Bool = True
    reduce_scatter: Bool = True
    stage3_prefetch_bucket_size: Count = 50_000_000
    stage3_param_persistence_threshold: Count = 100_000
    stage3_max_live_parameters: Count = 1_000_000_000
    stage3_max_reuse_distance: Count = 1_000_000_000
    stage3_gather_16bit_weights_on_model_save: Bool = False
    offload_optimizer: OffloadConfig = Field(default_factory=OffloadConfig)
    offload_param: ParamOffloadConfig = Field(default_factory=ParamOffloadConfig)
    sub_group_size: Count = 1_000_000_000
    round_robin_gradients: Bool = False
    INERT = frozenset({"reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients",
                       "reduce_scatter", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                       "stage3_max_live_parameters", "stage3_max_reuse_distance",
                       "stage3_gather_16bit_weights_on_model_save", "sub_group_size", "round_robin_gradients"})


class AdamParams(_Block):
    lr: NonNeg = 1e-3
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: NonNeg = 1e-8
    weight_decay: NonNeg = 0.0
    amsgrad: Bool = False
    adam_w_mode: Bool = True       # true: decoupled weight decay (AdamW), DeepSpeed's default
    torch_adam: Bool = False       # DeepSpeed's kernel switch; zerotrain always runs torch's
    INERT = frozenset({"torch_adam"})


class AdamWParams(AdamParams):
    adam_w_mode: Annotated[bool, Strict(), _rule(bool, 'AdamW always decouples weight decay; for L2-style '
                                                       'Adam use type "Adam" with adam_w_mode false')] = True
    INERT = frozenset({"torch_adam", "adam_w_mode"})


class SGDParams(_Block):
    lr: NonNeg = 1e-3
    momentum: NonNeg = 0.0
    weight_decay: NonNeg = 0.0
    nesterov: Bool = False
    dampening: Annotated[float, Strict()] = 0.0

    @model_validator(mode="after")
    def _nesterov(self) -> SGDParams:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(f"nesterov needs momentum > 0 and dampening 0, got momentum "
                             f"{self.momentum} and dampening {self.dampening}")
        return self


class WarmupLRParams(_Block):
    warmup_min_lr: LrValue = 0.0
    warmup_max_lr: Optional[LrValue] = None   # None: the optimizer's lr
    warmup_num_steps: PosInt = 1000
    warmup_type: WarmupType = "log"


class _TotalSteps(_Block):
    @model_validator(mode="after")
    def _total_covers_warmup(self) -> Any:
        total, warmup = getattr(self, "total_num_steps"), getattr(self, "warmup_num_steps")
        if total < warmup:
            raise ValueError(f"total_num_steps {total} is less than warmup_num_steps {warmup}; "
                             "raise total_num_steps or shorten the warmup")
        return self


class WarmupDecayLRParams(WarmupLRParams, _TotalSteps):
    total_num_steps: PosInt
    warmup_max_lr: Optional[LrValue] = 0.001  # DeepSpeed's default for this schedule


class WarmupCosineLRParams(_TotalSteps):
    total_num_steps: PosInt
    warmup_min_ratio: Ratio = 0.0
    warmup_num_steps: PosInt = 1000
    cos_min_ratio: Ratio = 0.0001
    warmup_type: WarmupType = "log"


class _Typed(_Block):
    """A {"type": ..., "params": {...}} block; the type matches case-insensitively."""
    TYPE: ClassVar[str]
    type: str

    @field_validator("type", mode="before")
    @classmethod
    def _canonical(cls, value: Any) -> str:
        if isinstance(value, str) and value.lower() == cls.TYPE.lower():
            return cls.TYPE
        raise ValueError(f"expected {cls.TYPE!r}, got {value!r}")


def _typed(name: str, params: type[_Block], *, required: bool = False) -> type[_Typed]:
    spec = (params, ...) if required else (params, Field(default_factory=params))
    cls = create_model(f"{name}Block", __base__=_Typed, params=spec)
    cls.TYPE = name
    return cls


def _tagged(*classes: type[_Typed], error: str) -> Any:
    names = {c.TYPE.lower(): c.TYPE for c in classes}

    def pick(value: Any) -> str | None:
        if isinstance(value, _Typed):
            return value.TYPE
        if isinstance(value, dict) and isinstance(value.get("type"), str):
            return names.get(value["type"].lower())
        return None
    members = tuple(Annotated[c, Tag(c.TYPE)] for c in classes)
    return Annotated[Union[members], Discriminator(pick, custom_error_type=error,
                                                   custom_error_message="unknown type")]


OPTIMIZERS = (_typed("Adam", AdamParams), _typed("AdamW", AdamWParams), _typed("SGD", SGDParams))
SCHEDULERS = (_typed("WarmupLR", WarmupLRParams), _typed("WarmupDecayLR", WarmupDecayLRParams, required=True),
              _typed("WarmupCosineLR", WarmupCosineLRParams, required=True))
OptimizerConfig = _tagged(*OPTIMIZERS, error="unknown_optimizer")
SchedulerConfig = _tagged(*SCHEDULERS, error="unknown_scheduler")


class ActivationCheckpointingConfig(_Block):
    """DeepSpeed's ``activation_checkpointing`` block. Its presence turns on per-unit recompute
    (``shard_model(activation_checkpointing=True)``): each transformer block keeps only its inputs.
    Partitioning checkpoints over tensor-parallel ranks and CPU checkpointing are not implemented."""
    partition_activations: Annotated[Bool, _rule(lambda v: not v, (
        "partition_activations=true is not supported by zerotrain; set it to false (each tp rank keeps "
        "its unit inputs whole)"))] = False
    cpu_checkpointing: Annotated[Bool, _rule(lambda v: not v, (
        "cpu_checkpointing=true is not supported by zerotrain; set it to false (checkpoints stay on the "
        "device)"))] = False
    contiguous_memory_optimization: Bool = False
    number_checkpoints: Optional[PosInt] = None
    synchronize_checkpoint_boundary: Bool = False
    profile: Bool = False
    INERT = frozenset({"contiguous_memory_optimization", "number_checkpoints", "synchronize_checkpoint_boundary",
                       "profile"})


class TensorParallelConfig(_Block):
    tp_size: PosInt = 1


class ZeroTrainExtras(_Block):
    reduce_dtype: Optional[Literal["fp32", "bf16", "fp16"]] = None  # None: zerotrain's default (fp32)
    debug_collectives: Bool = False
