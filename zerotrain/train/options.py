"""Options of ``zerotrain train``: typed sections, JSON config files and ``key=value`` overrides.

Precedence, lowest first: the defaults below, ``--config FILE`` (JSON with the same sections),
the named command-line flags, then ``key=value`` overrides. A key is either dotted
(``optim.lr=3e-4``) or a bare field name that exists in exactly one section (``lr=3e-4``);
values are read as JSON when they parse (``3e-4``, ``null``, ``["Ruth"]``) and as text otherwise.
Unknown keys are rejected with the closest valid name.

Weight decay applies to 2-D weight matrices (the linear layers and the tied token embedding /
LM head, and the position embedding); biases and LayerNorm parameters are not decayed.

The defaults train the ``tiny`` preset on the bundled corpus in about six minutes on two CPU
cores (two ranks, one thread each).
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from zerotrain.data import DEFAULT_HELDOUT_BOOKS

PosInt = Annotated[int, Strict(), Field(ge=1)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
Real = Annotated[float, Field(allow_inf_nan=False)]


class UsageError(ValueError):
    """A user or configuration error: the CLI prints the message and exits with status 2."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelOptions(_Section):
    preset: str = "tiny"
    n_layer: PosInt | None = None      # None: the preset's value
    n_head: PosInt | None = None
    n_embd: PosInt | None = None
    block_size: PosInt | None = None
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    copy_head: bool | None = None      # None: off (fine-tuning turns it on; see GPTConfig.copy_head)


class DataOptions(_Section):
    corpus: str | None = None          # None: the bundled World English Bible
    vocab_size: Annotated[int, Strict(), Field(ge=260)] = 8192
    tokenizer_chars: PosInt | None = None   # train the tokenizer on this many characters only
    heldout_books: list[str] = Field(default_factory=lambda: list(DEFAULT_HELDOUT_BOOKS))
    facts: bool = True                 # the WordNet fact prose joins the bundled corpus' training side

    @field_validator("corpus")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return None if value is None else str(Path(value).expanduser().resolve())


class ParallelOptions(_Section):
    nproc: PosInt = 2
    stage: Literal[0, 1, 2, 3] = 3
    tp: PosInt = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False     # recompute each block's activations in backward
    device: Literal["auto", "cpu", "cuda"] = "auto"   # auto: the GPUs when CUDA is present


class OptimOptions(_Section):
    lr: Annotated[Real, Field(gt=0)] = 3e-3
    min_lr: Annotated[Real, Field(ge=0)] = 3e-4
    warmup: NonNegInt = 30
    weight_decay: Annotated[Real, Field(ge=0)] = 0.1
    beta1: Annotated[Real, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[Real, Field(ge=0, lt=1)] = 0.95
    grad_clip: Annotated[Real, Field(gt=0)] | None = 1.0

    @model_validator(mode="after")
    def _min_below_max(self):
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}; "
                             "min_lr is where the cosine decay ends, set it <= lr")
        return self


class TrainOptions(_Section):
    steps: PosInt = 1000
    batch_size: PosInt = 32            # global: sequences per optimizer step over all ranks
    seed: NonNegInt = 1337
    log_interval: PosInt = 10
    eval_interval: NonNegInt = 250     # 0: only the final evaluation
    eval_windows: PosInt = 48          # held-out windows per periodic evaluation
    ckpt_interval: NonNegInt = 250     # 0: only at the end and on Ctrl-C
    keep_last: PosInt | None = 2
    max_bad_steps: NonNegInt = 20      # this many non-finite steps in a row stop the run (0: never)
    cloze_passages: NonNegInt = 300
    sample_tokens: NonNegInt = 48


class RunOptions(_Section):
    name: str | None = None            # None: "<preset>-zero<stage>"
    runs_dir: str = "runs"
    preflight: bool = True             # check the run fits this machine's memory before starting it


class Options(_Section):
    model: ModelOptions = Field(default_factory=ModelOptions)
    data: DataOptions = Field(default_factory=DataOptions)
    parallel: ParallelOptions = Field(default_factory=ParallelOptions)
    optim: OptimOptions = Field(default_factory=OptimOptions)
    train: TrainOptions = Field(default_factory=TrainOptions)
    run: RunOptions = Field(default_factory=RunOptions)

    @property
    def run_name(self) -> str:
        return self.run.name or f"{self.model.preset}-zero{self.parallel.stage}"

    @property
    def run_dir(self) -> Path:
        return Path(self.run.runs_dir) / self.run_name

    def model_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.model_dump().items() if k != "preset" and v is not None}


SECTIONS = {name: info.annotation for name, info in Options.model_fields.items()}


def all_keys() -> list[str]:
    return [f"{s}.{f}" for s, cls in SECTIONS.items() for f in cls.model_fields]


def resolve_key(key: str) -> tuple[str, str]:
    """``"optim.lr"`` or ``"lr"`` -> ("optim", "lr"); unknown keys raise with a suggestion."""
    key = key.strip().replace("-", "_")
    if "." in key:
        section, _, field = key.partition(".")
        if section in SECTIONS and field in SECTIONS[section].model_fields:
            return section, field
    else:
        owners = [s for s, cls in SECTIONS.items() if key in cls.model_fields]
        if len(owners) == 1:
            return owners[0], key
        if len(owners) > 1:
            raise UsageError(f"override key {key!r} is ambiguous; write one of "
                             + ", ".join(f"{s}.{key}" for s in owners))
    names = all_keys() + [k.split(".", 1)[1] for k in all_keys()]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        raise UsageError(f"unknown option {key!r}; did you mean {close[0]!r}? "
                         "(`zerotrain train --options` lists them all)")
    raise UsageError(f"unknown option {key!r}; valid options: {', '.join(all_keys())}")


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_override(item: str) -> tuple[str, str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"override {item!r} is not key=value (e.g. optim.lr=3e-4 or steps=100)")
    section, field = resolve_key(key)
    return section, field, parse_value(value)


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"])
        if item["type"] == "value_error":           # our own checks name fields and values
            lines.append(item["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{path}: {item['msg']} (got {item.get('input')!r})")
    return "invalid options:\n  - " + "\n  - ".join(lines)


def build_options(*, config_file: str | None = None, settings: dict[str, Any] | None = None,
                  overrides: list[str] = (), base: dict | None = None) -> Options:
    """Defaults (or ``base``) <- config file <- ``settings`` {dotted key: value} <- ``overrides``."""
    data: dict[str, dict] = {s: {} for s in SECTIONS}
    layers = [base or {}]
    if config_file is not None:
        layers.append(read_config(config_file))
    for layer in layers:
        for key, values in layer.items():
            if key not in SECTIONS:      # a dotted or bare option name at the top level
                section, field = resolve_key(key)
                data[section][field] = values
                continue
            if not isinstance(values, dict):
                raise UsageError(f"config section {key!r} must be an object of options, got {values!r}")
            for field, value in values.items():
                data[key][resolve_key(f"{key}.{field}")[1]] = value
    for key, value in (settings or {}).items():
        section, field = resolve_key(key)
        data[section][field] = value
    for item in overrides:
        section, field, value = parse_override(item)
        data[section][field] = value
    try:
        return Options.model_validate(data)
    except ValidationError as e:
        raise UsageError(_describe(e)) from None


def read_config(path: str) -> dict:
    from zerotrain.config.loading import read_json
    data = read_json(path, error=UsageError)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the top level must be an object of sections ({', '.join(SECTIONS)})")
    return data


def check_launch(opts: Options, *, world_size: int | None = None) -> None:
    """Launch-time checks that need no process group; raise UsageError naming the fix."""
    from zerotrain.model import get_config
    nproc = opts.parallel.nproc if world_size is None else world_size
    batch, tp = opts.train.batch_size, opts.parallel.tp
    limit = (os.cpu_count() or 1) * 4
    if world_size is None and nproc > limit:
        raise UsageError(f"--nproc {nproc} is more than 4 x the {os.cpu_count()} CPU cores of this "
                         f"machine; use at most {limit} (the default 2 suits a laptop)")
    if nproc % tp:
        raise UsageError(f"--tp {tp} does not divide the {nproc} processes; choose --nproc as a "
                         f"multiple of {tp} (each tp group of {tp} ranks holds one model replica)")
    dp = nproc // tp
    ranks = f"{dp} data-parallel replicas ({nproc} processes / tp {tp})" if tp > 1 else f"{nproc} processes"
    if dp > batch:
        raise UsageError(f"--nproc {nproc} is larger than the global batch size {batch}: some ranks "
                         f"would get no data; use --nproc <= {batch * tp} or a larger --batch-size")
    if batch % dp:
        raise UsageError(f"global batch size {batch} is not divisible by {ranks}; choose "
                         f"--batch-size as a multiple of {dp} (e.g. {batch + dp - batch % dp})")
    try:
        cfg = get_config(opts.model.preset, vocab_size=opts.data.vocab_size, **opts.model_overrides())
    except ValueError as e:
        raise UsageError(str(e)) from None
    if cfg.n_head % tp:
        raise UsageError(f"--tp {tp} does not divide the model's {cfg.n_head} attention heads; choose tp "
                         f"in {[d for d in range(1, cfg.n_head + 1) if cfg.n_head % d == 0]}")
    if opts.data.corpus is not None and not Path(opts.data.corpus).is_file():
        raise UsageError(f"corpus file not found: {opts.data.corpus}; pass an existing text file "
                         "with --corpus PATH, or leave it out for the bundled corpus")
