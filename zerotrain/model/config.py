"""GPT configuration and the named presets, from CPU-sized toys up to Turing-NLG 17B.

A preset is looked up with :func:`get_config`, which returns a fresh copy (overrides applied and
validated) so the table in :data:`PRESETS` is never mutated by callers.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

_POSITIVE_INT_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")


@dataclass
class GPTConfig:
    """Shape and initialisation of a decoder-only transformer (pre-LayerNorm, tied embeddings)."""

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    init_std: float = 0.02
    copy_head: bool = False   # pointer head: the next token may be copied from the context (CopyHead)

    def __post_init__(self) -> None:
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"GPTConfig.{name} must be a positive int, got {value!r}; "
                    f"set {name} to an integer >= 1")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"choose n_embd as a multiple of n_head (e.g. {self.n_head * max(1, round(self.n_embd / self.n_head))})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"GPTConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        for name in ("bias", "copy_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) \
                or not self.init_std > 0.0:
            raise ValueError(
                f"GPTConfig.init_std must be a positive float, got {self.init_std!r}; "
                "0.02 is the usual value")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def copy_dim(self) -> int:
        """Width of the copy head's queries and keys."""
        return max(1, self.n_embd // 2)


PRESETS: dict[str, GPTConfig] = {
    # CPU-trainable: ~1.9M parameters (1.05M of them the tied 8192 x 128 embedding).
    "tiny": GPTConfig(vocab_size=8192, block_size=128, n_layer=4, n_head=4, n_embd=128),
    # CPU-trainable: ~5.2M parameters.
    "small": GPTConfig(vocab_size=8192, block_size=256, n_layer=8, n_head=6, n_embd=192),
    # GPT-2 small: 124.4M parameters (tied).
    "gpt2-124m": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    # GPT-2 XL: 1.56B parameters.
    "gpt2-1.5b": GPTConfig(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
    # Megatron-LM 8.3B: vocabulary padded to 51200; 8.32B parameters.
    "megatron-8.3b": GPTConfig(vocab_size=51200, block_size=1024, n_layer=72, n_head=32,
                               n_embd=3072),
    # Turing-NLG: 78 layers, hidden 4256, 28 heads (head_dim 152); 17.18B parameters.
    "tnlg-17b": GPTConfig(vocab_size=50257, block_size=1024, n_layer=78, n_head=28, n_embd=4256),
}


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.4)
    return f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""


def get_config(name: str, **overrides) -> GPTConfig:
    """Return a fresh, validated copy of preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(
            f"unknown model preset {name!r}; {_suggest(name, PRESETS)}"
            f"valid presets: {', '.join(PRESETS)}")
    fields = [f.name for f in dataclasses.fields(GPTConfig)]
    for key in overrides:
        if key not in fields:
            raise ValueError(
                f"unknown GPTConfig field {key!r} in overrides for preset {name!r}; "
                f"{_suggest(key, fields)}valid fields: {', '.join(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)
