"""Prompt templates and the encoding of (prompt, target) pairs for answer-only loss.

One template per task, used alike for fine-tuning, for zero-shot prompting of a pretrained model
and by ``zerotrain ask`` / ``summarize``::

    qa           "Question: {question}\\nAnswer:"                       -> " {answer}<|endoftext|>"
    qa + passage "Passage: {passage}\\nQuestion: {question}\\nAnswer:"   -> " {answer}<|endoftext|>"
    summarize    "Document: {document}\\nSummary:"                      -> " {summary}<|endoftext|>"

An encoded example is the prompt's tokens followed by the target's; the labels are -100 (ignored by
the loss) on every prompt token, so the loss counts answer tokens only, end-of-text included.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100


def qa_prompt(question: str, passage: str | None = None) -> str:
    head = f"Passage: {' '.join(passage.split())}\n" if passage else ""
    return f"{head}Question: {' '.join(question.split())}\nAnswer:"


def summary_prompt(document: str) -> str:
    return f"Document: {document.strip()}\nSummary:"


def target_text(answer: str) -> str:
    return " " + " ".join(answer.split())


@dataclass
class Encoded:
    """Variable-length examples stored flat: example i is ``tokens[offsets[i]:offsets[i + 1]]``,
    of which the first ``prompt_len[i]`` tokens are the prompt."""
    tokens: np.ndarray
    offsets: np.ndarray
    prompt_len: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt_len)

    def example(self, i: int) -> tuple[np.ndarray, int]:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]], int(self.prompt_len[i])

    def save(self, path) -> None:
        np.savez(path, tokens=self.tokens, offsets=self.offsets, prompt_len=self.prompt_len)

    @classmethod
    def load(cls, path) -> "Encoded":
        with np.load(path) as z:
            return cls(z["tokens"], z["offsets"], z["prompt_len"])


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], *, block_size: int) -> tuple[Encoded, int]:
    """Encode (prompt, target text) pairs; those longer than ``block_size + 1`` tokens are left
    out. Returns (encoded, number left out)."""
    prompts = tokenizer.encode_batch([p for p, _ in pairs])
    targets = tokenizer.encode_batch([t for _, t in pairs])
    tokens, offsets, lengths, dropped = [], [0], [], 0
    for p, t in zip(prompts, targets):
        ids = p + t + [tokenizer.eot_id]
        if len(ids) > block_size + 1:
            dropped += 1
            continue
        tokens.extend(ids)
        offsets.append(len(tokens))
        lengths.append(len(p))
    return Encoded(np.asarray(tokens, dtype=np.int32), np.asarray(offsets, dtype=np.int64),
                   np.asarray(lengths, dtype=np.int32)), dropped


def pad_batch(rows: list[tuple[np.ndarray, int]], *, length: int, pad_id: int):
    """(x, y) int64 tensors (len(rows), length): x the inputs, y the next tokens with prompt
    positions and padding set to -100."""
    import torch
    x = np.full((len(rows), length), pad_id, dtype=np.int64)
    y = np.full((len(rows), length), IGNORE, dtype=np.int64)
    for r, (ids, prompt_len) in enumerate(rows):
        n = len(ids) - 1
        x[r, :n] = ids[:-1]
        y[r, prompt_len - 1:n] = ids[prompt_len:]
    return torch.from_numpy(x), torch.from_numpy(y)
