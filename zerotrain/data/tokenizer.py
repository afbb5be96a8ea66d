"""Byte-level BPE tokenizer (HuggingFace ``tokenizers``) behind a small, stable interface.

Byte-level means every string round-trips exactly: ``decode(encode(text)) == text``.
Training is deterministic: the same texts and settings give the same JSON file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


class Tokenizer:
    """Thin wrapper: ``encode``, ``decode``, ``eot_id``, ``vocab_size``, ``save``."""

    def __init__(self, hf: _HFTokenizer):
        self._hf = hf
        self._byte_lengths: list[int] | None = None
        if hf.token_to_id(EOT) is None:
            raise ValueError(f"tokenizer has no {EOT!r} token; train it with "
                             f"special=({EOT!r}, ...)")

    @property
    def hf(self) -> _HFTokenizer:
        return self._hf

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self._hf.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each token id stands for; special tokens count 0 (they are not text)."""
        if self._byte_lengths is None:
            special = {tok.content for tok in self._hf.get_added_tokens_decoder().values()
                       if tok.special}
            lengths = [0] * self.vocab_size
            for token, idx in self._hf.get_vocab(with_added_tokens=True).items():
                # byte-level: each character of a learned token stands for one byte
                lengths[idx] = 0 if token in special else len(token)
            self._byte_lengths = lengths
        return self._byte_lengths

    def num_bytes(self, ids: Iterable[int]) -> int:
        """Bytes of text the ids decode to (exact even when a slice splits a character)."""
        lengths = self.token_byte_lengths()
        return sum(lengths[int(i)] for i in ids)

    def to_str(self) -> str:
        return self._hf.to_str()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self._hf.to_str(pretty=True), encoding="utf-8")
        return path


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, *,
                    special: Sequence[str] = (EOT,), min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on ``texts``; the first special token should be ``EOT``."""
    special = list(special)
    if EOT not in special:
        raise ValueError(f"special={special} must include {EOT!r} (used as eot_id)")
    floor = 256 + len(special)
    if vocab_size < floor:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the 256 byte tokens plus "
                         f"{len(special)} special tokens; use vocab_size >= {floor}")
    hf = _HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}; train one with "
                                "zerotrain.data.train_tokenizer(...).save(path)")
    return Tokenizer(_HFTokenizer.from_file(str(path)))
