"""What the planner needs to know about a model: parameters per sharding unit, and its shape.

A *sharding unit* is what zerotrain's ZeRO engine flattens into one padded 1-D buffer: every
child of an ``nn.ModuleList`` (a transformer block) is a unit, and everything else (embeddings,
final norm, tied lm_head) forms the ``root`` unit. Each unit's elements are split into the part
that tensor parallelism slices over tp ranks and the part every tp rank holds whole.

Which parameters tensor parallelism slices (by name, the zerotrain GPT layout): attention
``attn.c_attn`` weight and bias and ``attn.c_proj`` weight, MLP ``mlp.c_fc`` weight and bias and
``mlp.c_proj`` weight, and the vocabulary embedding ``wte`` (tied ``lm_head``). LayerNorms,
row-parallel output biases and position embeddings are replicated. Parameters of any other
module are treated as replicated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

_TP_SPLIT = re.compile(
    r"(^|\.)(attn\.c_attn\.(weight|bias)|attn\.c_proj\.weight|mlp\.c_fc\.(weight|bias)"
    r"|mlp\.c_proj\.weight|wte\.weight|lm_head\.weight)$"
)
ROOT = "root"


@dataclass(frozen=True)
class UnitSpec:
    """Elements of one sharding unit: ``split`` is sliced over tp ranks, ``replicated`` is not."""

    name: str
    split: int
    replicated: int = 0

    def numel(self, tp: int = 1) -> int:
        """Elements one tp rank holds (the sliced part rounded up, as uneven slices are)."""
        return -(-self.split // tp) + self.replicated


@dataclass(frozen=True)
class ModelSpec:
    """A model as the planner sees it. Shape fields are optional; without n_layer, n_embd and
    n_head the planner cannot estimate activations or tensor-parallel traffic (and says so).
    ``dropout`` decides which attention kernel runs on CPU and whether masks are kept."""

    name: str
    units: tuple[UnitSpec, ...]
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    vocab_size: int | None = None
    block_size: int | None = None
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.dropout, bool) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r}: must be a probability in [0, 1), "
                             "e.g. 0.0 (the GPT presets' default) or 0.1")

    def numel(self, tp: int = 1) -> int:
        """Ψ: parameters per tp rank (the whole model when tp = 1)."""
        return sum(u.numel(tp) for u in self.units)

    @property
    def has_shape(self) -> bool:
        return None not in (self.n_layer, self.n_embd, self.n_head)

    @classmethod
    def from_module(cls, module: nn.Module, *, name: str | None = None, **shape) -> ModelSpec:
        """Count parameters per unit of any module (build it on ``torch.device("meta")`` to
        count models that do not fit in memory). Tied parameters count once."""
        prefixes = _unit_prefixes(module)
        split: dict[str, int] = {}
        repl: dict[str, int] = {}
        for pname, param in module.named_parameters():
            unit = _unit_of(pname, prefixes)
            target = split if _TP_SPLIT.search(pname) else repl
            target[unit] = target.get(unit, 0) + param.numel()
        order = ([ROOT] if ROOT in split or ROOT in repl else []) + [
            p for p in prefixes if p in split or p in repl
        ]
        units = tuple(UnitSpec(u, split.get(u, 0), repl.get(u, 0)) for u in order)
        return cls(name=name or type(module).__name__, units=units, **shape)

    @classmethod
    def from_config(cls, config, *, name: str | None = None) -> ModelSpec:
        """A zerotrain ``GPTConfig``: builds ``GPT(config)`` on the meta device and counts it."""
        from zerotrain.model import GPT

        with torch.device("meta"):
            model = GPT(config)
        return cls.from_module(
            model, name=name or "GPT", n_layer=config.n_layer, n_embd=config.n_embd,
            n_head=config.n_head, vocab_size=config.vocab_size, block_size=config.block_size,
            dropout=config.dropout,
        )

    @classmethod
    def from_preset(cls, preset: str) -> ModelSpec:
        """A zerotrain model preset (tiny, small, gpt2-124m, gpt2-1.5b, megatron-8.3b, tnlg-17b)."""
        from zerotrain.model import get_config

        return cls.from_config(get_config(preset), name=preset)

    @classmethod
    def from_params(cls, numel: float, *, n_layer: int | None = None, **shape) -> ModelSpec:
        """A bare parameter count. One unit, all of it sliced by tp; with ``n_layer`` it is
        split into that many equal units (the remainder goes to the first), which is what the
        stage-3 gather of one unit at a time needs to be realistic."""
        total = int(round(numel))
        if total <= 0:
            raise ValueError(f"params={numel!r}: give a positive parameter count, e.g. 7.5e9")
        if n_layer is None:
            return cls(name=f"{total:.4g} params", units=(UnitSpec("model", total),), **shape)
        if n_layer < 1 or n_layer > total:
            raise ValueError(f"n_layer={n_layer}: must be between 1 and params ({total})")
        each, rest = divmod(total, n_layer)
        units = tuple(UnitSpec(f"layer{i}", each + (rest if i == 0 else 0)) for i in range(n_layer))
        return cls(name=f"{total:.4g} params", units=units, n_layer=n_layer, **shape)


def _unit_prefixes(module: nn.Module) -> list[str]:
    """Children of ModuleLists, outermost first (a ModuleList inside a block stays in it)."""
    prefixes: list[str] = []
    for mname, mod in module.named_modules():
        if not isinstance(mod, nn.ModuleList):
            continue
        if any(mname == p or mname.startswith(p + ".") for p in prefixes):
            continue
        for cname, _ in mod.named_children():
            prefixes.append(f"{mname}.{cname}" if mname else cname)
    return prefixes


def _unit_of(pname: str, prefixes: list[str]) -> str:
    for p in prefixes:
        if pname.startswith(p + "."):
            return p
    return ROOT
