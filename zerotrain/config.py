"""Typed zerotrain configuration: the common subset of DeepSpeed's ``ds_config.json`` plus two
zerotrain blocks (``tensor_parallel``, ``zerotrain``).

Parsing rejects unknown keys (naming the closest valid one), wrong types (no "32" -> 32) and
contradictions, and reports every problem in one :class:`ConfigError`, one line per field. The
batch triple is resolved by :meth:`ZeroTrainConfig.resolve` once the data-parallel size is known.
Keys accepted for compatibility that change nothing are listed by ``inert_keys()``.

Optimizer choice: as in DeepSpeed, ``"Adam"`` has ``adam_w_mode`` true by default and then is
AdamW (decoupled weight decay); ``"Adam"`` with ``adam_w_mode: false`` is torch's L2-style Adam.
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Strict, Tag,
                      TypeAdapter, ValidationError, create_model, field_validator, model_validator)

logger = logging.getLogger("zerotrain")


class ConfigError(ValueError):
    """A configuration problem; the message names each bad field, the value received and the fix."""


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
    device: Annotated[Literal["none", "cpu", "nvme"], _rule(lambda d: d == "none", (
        "offload to {v!r} is not supported by zerotrain yet; set device to \"none\" or remove the block"))] = "none"
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
    offload_param: OffloadConfig = Field(default_factory=OffloadConfig)
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


class TensorParallelConfig(_Block):
    tp_size: PosInt = 1


class ZeroTrainExtras(_Block):
    reduce_dtype: Optional[Literal["fp32", "bf16", "fp16"]] = None  # None: zerotrain's default (fp32)
    debug_collectives: Bool = False


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


# ---------------------------------------------------------------- errors

_DEEPSPEED_ONLY = {"communication_data_type": " Use zerotrain.reduce_dtype.", "fp32_allreduce":
                   " Use zerotrain.reduce_dtype.", "amp": " Use bf16 or fp16.", **dict.fromkeys((
                       "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor",
                       "comms_logger", "pipeline", "prescale_gradients", "gradient_predivide_factor",
                       "zero_allow_untested_optimizer", "sparse_attention", "elasticity", "autotuning",
                       "data_efficiency"), "")}
_UNIONS = {"optimizer": OPTIMIZERS, "scheduler": SCHEDULERS}
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "model_type": "an object {...}", "dict_type": "an object {...}",
             "tuple_type": "a list", "list_type": "a list"}
_BOUNDS = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}",
           "less_than": "< {lt}"}
_HINTS = {"gradient_clipping": " (0 turns clipping off)"}


def _dotted(loc: tuple) -> str:
    out = ""
    for i, part in enumerate(loc):
        if i == 1 and loc[0] in _UNIONS:
            continue                      # the union tag pydantic adds after optimizer / scheduler
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _block_at(loc: tuple) -> type[_Block] | None:
    cls: Any = ZeroTrainConfig
    if loc and loc[0] in _UNIONS:
        cls = next((c for c in _UNIONS[loc[0]] if len(loc) > 1 and c.TYPE == loc[1]), None)
        loc = loc[2:]
    for part in loc:
        cls = getattr(cls.model_fields.get(part) if cls else None, "annotation", None)
        if not (isinstance(cls, type) and issubclass(cls, _Block)):
            return None
    return cls


def _got(value: Any) -> str:
    hint = " ('auto' is a HuggingFace placeholder; write the number)" if value == "auto" else ""
    return f"got {json.dumps(value, default=repr)} ({type(value).__name__}){hint}"


def _unknown_key(loc: tuple) -> str:
    key, path = loc[-1], _dotted(loc)
    if len(loc) == 1 and key in _DEEPSPEED_ONLY:
        return f"{path}: a DeepSpeed option zerotrain does not support; remove it.{_DEEPSPEED_ONLY[key]}"
    block = _block_at(loc[:-1])
    valid = sorted(block.model_fields) if block else []
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if close:
        return f"{path}: unknown key; did you mean {close[0]!r}?"
    return f"{path}: unknown key; valid keys are: {', '.join(valid)}"


def _unknown_type(loc: tuple, value: Any) -> str:
    names = [c.TYPE for c in _UNIONS[loc[0]]]
    if not isinstance(value, dict):
        return f'{loc[0]}: expected an object {{"type": ..., "params": {{...}}}}, {_got(value)}'
    if not isinstance(value.get("type"), str):
        return f"{loc[0]}.type: required, a string, one of {', '.join(names)}"
    lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(value["type"].lower(), list(lower), n=1, cutoff=0.6)
    guess = f"did you mean {lower[close[0]]!r}? " if close else ""
    return f"{loc[0]}.type: unknown type {value['type']!r}; {guess}valid types are {', '.join(names)}"


def _describe(error: dict) -> list[str]:
    kind, loc, value = error["type"], tuple(error["loc"]), error.get("input")
    path = _dotted(loc)
    if kind == "extra_forbidden":
        return [_unknown_key(loc)]
    if kind in ("unknown_optimizer", "unknown_scheduler"):
        return [_unknown_type(loc, value)]
    if kind == "missing":
        return [f"{path}: required, not set"]
    if kind in _EXPECTED:
        return [f"{path}: expected {_EXPECTED[kind]}, {_got(value)}"]
    if kind in _BOUNDS:
        bound = _BOUNDS[kind].format(**error.get("ctx", {}))
        return [f"{path}: must be {bound}, {_got(value)}{_HINTS.get(path, '')}"]
    if kind == "literal_error":
        return [f"{path}: expected one of {error['ctx']['expected']}, {_got(value)}"]
    msg = error["msg"].removeprefix("Value error, ")
    return [f"{path}: {line}" if path else line for line in msg.splitlines()]


def format_validation_error(error: ValidationError, source: str) -> str:
    """One message for a pydantic error: a header, then one line per problem naming its field."""
    lines: list[str] = []
    for item in error.errors():
        lines.extend(line for line in _describe(item) if line not in lines)
    head = f"invalid zerotrain config ({source}): {len(lines)} problem{'s' * (len(lines) != 1)}"
    return "\n".join([head] + [f"  - {line}" for line in lines])


# ---------------------------------------------------------------- loading

def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def parse_config(data: dict[str, Any], source: str = "config dict") -> ZeroTrainConfig:
    """Validate a dict into a :class:`ZeroTrainConfig`, raising one :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object, got {type(data).__name__}")
    try:
        return ZeroTrainConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def parse_scheduler(data: dict[str, Any]) -> Any:
    """Validate a bare ``scheduler`` block (as it appears under "scheduler")."""
    try:
        return TypeAdapter(SchedulerConfig).validate_python(data)
    except ValidationError as e:
        errors = [{**err, "loc": ("scheduler", *err["loc"])} for err in e.errors()]
        raise ConfigError("\n".join(["invalid scheduler block"] +
                                     [f"  - {line}" for err in errors for line in _describe(err)])) from None


def load_config(source: str | os.PathLike | dict | ZeroTrainConfig) -> ZeroTrainConfig:
    """Parse a JSON file path or a dict; log one warning naming the keys that have no effect."""
    if isinstance(source, ZeroTrainConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        cfg = parse_config(_read_json(os.fspath(source)), os.fspath(source))
    elif isinstance(source, dict):
        cfg = parse_config(source)
    else:
        raise ConfigError(f"config must be a path or a dict, got {type(source).__name__}")
    inert = cfg.inert_keys()
    if inert:
        logger.warning("config keys accepted but without effect in zerotrain: %s", ", ".join(inert))
    return cfg


# ---------------------------------------------------------------- explain and CLI

def explain(cfg: ZeroTrainConfig, dp_size: int) -> str:
    """The effective config: every value and where it came from (user, default, derived, inert)."""
    batch, rows = cfg.resolve(dp_size), []
    for path, value, source, inert in _walk(cfg, ""):
        if path in BATCH_KEYS:
            value = getattr(batch, path)
            source = f"derived: {batch.derivation[path]}" if path in batch.derivation else source
        if path.endswith("warmup_max_lr") and value is None:
            value = cfg.optimizer.params.lr if cfg.optimizer is not None else None
            source = "derived: optimizer.params.lr" if value is not None else "default: the optimizer's lr"
        if path in ("optimizer", "scheduler"):
            source = "not set"
        rows.append((path, value, source + (", inert" if inert else "")))
    rows += [("(world size = dp × tp)", dp_size * cfg.tensor_parallel.tp_size, "derived"),
             ("(precision)", cfg.precision, "derived")]
    if cfg.optimizer is not None:
        rows.append(("(torch optimizer)", f"torch.optim.{cfg.build_optimizer_spec()[0].__name__}", "derived"))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"zerotrain effective config (data-parallel size {dp_size})",
             "sources: user = set in the config, default = not set, derived = computed, "
             "inert = accepted without effect", ""]
    return "\n".join(lines + [f"{p:<{width}}{json.dumps(v, default=str):<14} [{s}]" for p, v, s in rows])


def cli_config(argv: list[str]) -> int:
    """``zerotrain config explain FILE [--dp N]`` and ``zerotrain config validate FILE [--dp N]``."""
    parser = argparse.ArgumentParser(prog="zerotrain config", description="Check a ds_config-style JSON.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("explain", "print the effective config"), ("validate", "check the config")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("file")
        cmd.add_argument("--dp", type=int, default=None, help="data-parallel size (explain: default 1)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        cfg = load_config(args.file)
        if args.command == "explain":
            print(explain(cfg, 1 if args.dp is None else args.dp))
            return 0
        if args.dp is not None:
            cfg.resolve(args.dp)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    inert = cfg.inert_keys()
    print(f"{args.file}: valid" + (f"; accepted without effect: {', '.join(inert)}" if inert else ""))
    return 0
