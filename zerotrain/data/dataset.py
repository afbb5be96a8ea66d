"""Token files and batches.

A token file is a ``.npy`` array of token ids (uint16 when the vocabulary fits, else
uint32), written once and then memory-mapped.  ``batches`` draws, for global step ``s``,
the same global batch of random windows on every rank (seeded by ``(seed, s)``) and hands
each data-parallel rank its contiguous slice, so the union over ranks is independent of
``dp_size``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .tokenizer import Tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def build_token_file(tokenizer: Tokenizer, text: str | Sequence[str], path: str | Path) -> Path:
    """Tokenise ``text`` once and write it to ``path`` (``.npy``).

    ``text`` may be a list of documents: they are encoded separately and joined with
    the tokenizer's end-of-text token.
    """
    docs = [text] if isinstance(text, str) else list(text)
    ids: list[int] = []
    for number, doc in enumerate(docs):
        if number:
            ids.append(tokenizer.eot_id)
        ids.extend(tokenizer.encode(doc))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=token_dtype(tokenizer.vocab_size),
                                      shape=(len(ids),))
    array[:] = ids
    array.flush()
    del array
    return path


class TokenDataset:
    """A memory-mapped token file viewed as windows of ``block_size + 1`` tokens."""

    def __init__(self, path: str | Path, block_size: int):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"token file not found: {self.path}; create it with "
                                    "zerotrain.data.build_token_file(tokenizer, text, path)")
        self.tokens = np.load(self.path, mmap_mode="r")
        self.block_size = int(block_size)
        if self.block_size < 1 or len(self.tokens) < self.block_size + 1:
            raise ValueError(f"block_size={block_size} needs at least block_size + 1 tokens and "
                             f"block_size >= 1; {self.path} has {len(self.tokens)} tokens")

    def __len__(self) -> int:
        return len(self.tokens)

    def windows(self, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape (len(starts), block_size); y is x shifted by one."""
        rows = np.stack([np.asarray(self.tokens[s:s + block_size + 1]) for s in starts])
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _check_batch_args(dataset: TokenDataset, batch_size: int, block_size: int, *, seed: int,
                      step: int, dp_rank: int, dp_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size) with dp_size={dp_size} >= 1")
    if batch_size < 1 or batch_size % dp_size:
        raise ValueError(f"global batch_size={batch_size} is not a positive multiple of "
                         f"dp_size={dp_size}; choose a global batch size divisible by dp_size")
    if seed < 0 or step < 0:
        raise ValueError(f"seed={seed} and step={step} must be non-negative")
    if not 1 <= block_size <= len(dataset) - 1:
        raise ValueError(f"block_size={block_size} must be in [1, {len(dataset) - 1}] for "
                         f"{dataset.path} ({len(dataset)} tokens)")


def batches(dataset: TokenDataset, *, batch_size: int, block_size: int | None = None,
            seed: int, step: int, dp_rank: int = 0, dp_size: int = 1
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of global step ``step``'s batch.

    The global batch is ``batch_size`` windows with start offsets drawn uniformly from
    ``[0, len - block_size - 1]`` by a generator seeded with ``(seed, step)``; rank ``r``
    gets rows ``[r * b, (r + 1) * b)`` with ``b = batch_size // dp_size``.
    Returns (x, y), int64 tensors of shape (b, block_size), with y = x shifted by one.
    """
    block_size = dataset.block_size if block_size is None else int(block_size)
    _check_batch_args(dataset, batch_size, block_size, seed=seed, step=step, dp_rank=dp_rank,
                      dp_size=dp_size)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step])))
    starts = rng.integers(0, len(dataset) - block_size, size=batch_size)
    per_rank = batch_size // dp_size
    return dataset.windows(starts[dp_rank * per_rank:(dp_rank + 1) * per_rank], block_size)


def num_eval_windows(dataset: TokenDataset, block_size: int | None = None) -> int:
    block_size = dataset.block_size if block_size is None else int(block_size)
    return (len(dataset) - 1) // block_size


def eval_windows(dataset: TokenDataset, *, block_size: int | None = None, batch_size: int = 1,
                 max_windows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows in file order: window i predicts tokens
    ``[i * block_size + 1, (i + 1) * block_size]``; a tail shorter than a window is left out.
    Yields (x, y) batches of up to ``batch_size`` windows.
    """
    block_size = dataset.block_size if block_size is None else int(block_size)
    count = num_eval_windows(dataset, block_size)
    if max_windows is not None:
        count = min(count, int(max_windows))
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    starts = np.arange(count, dtype=np.int64) * block_size
    for first in range(0, count, batch_size):
        yield dataset.windows(starts[first:first + batch_size], block_size)
