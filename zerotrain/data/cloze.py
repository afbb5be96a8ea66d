"""Evaluation helpers: LAMBADA-style cloze accuracy and language-model perplexity.

Cloze: a passage of 40-80 words from held-out text is cut just before a target word (3+
letters, not a function word) that already occurs earlier in the passage; the model must produce the whole word.  Scores
are greedy: the passage is correct only if every token of `` <word>`` (with its leading
space) is the argmax prediction.

LM metrics: mean next-token loss (nats), perplexity ``exp(loss)`` and bits per byte
``total NLL / ln 2 / UTF-8 bytes of the predicted tokens``; the add-one unigram model is
the baseline for all three.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .corpus import SECTION_SEP
from .dataset import TokenDataset, eval_windows
from .tokenizer import Tokenizer

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (B, T) int64 -> (B, T, V) logits

_WORD = re.compile(r"[A-Za-z]{3,}")
# Function words never serve as targets (as in LAMBADA, the target should need the
# passage, not grammar); case-insensitive.
STOPWORDS = frozenset("""
about above after again against all also among and any are because been before being below
between both but can could did does doing down during each even ever every few for from
further had has have having her here hers herself him himself his how into its itself just
let may might more most much must myself nor not now off once one only other our ours
ourselves out over own same shall she should some such than that the their theirs them
themselves then there these they this those through too under until upon very was were what
when where which while who whom whose why will with would yes yet you your yours yourself
yourselves
""".split())
# a target: letters after exactly one space, not continued by a letter, apostrophe or hyphen
_TARGET = re.compile(r"(?<=[^\s] )[A-Za-z]{3,}(?![A-Za-z’'\-])")


@dataclass(frozen=True)
class ClozePassage:
    context: str            # passage text up to (not including) the space before the target
    target: str             # the word to predict, without the leading space
    context_ids: tuple[int, ...]
    target_ids: tuple[int, ...]  # tokens of " " + target


def _section_bodies(text: str) -> list[str]:
    """Section bodies (name line dropped) of text in corpus format."""
    return [section.partition("\n")[2] for section in text.strip("\n").split(SECTION_SEP)]


def _candidates(bodies: list[str], context_words: tuple[int, int], rng: random.Random
                ) -> list[tuple[int, int, int]]:
    """(body index, passage start, target start) for each target with enough words before it."""
    low, high = context_words
    found = []
    for number, body in enumerate(bodies):
        word_starts = [m.start() for m in re.finditer(r"\S+", body)]
        index_of = {start: i for i, start in enumerate(word_starts)}
        for match in _TARGET.finditer(body):
            if match.group(0).lower() in STOPWORDS:
                continue
            i = index_of.get(match.start())
            k = rng.randint(low, high)
            if i is not None and i >= k:
                found.append((number, word_starts[i - k], match.start()))
    return found


def build_cloze(text: str, tokenizer: Tokenizer, *, n: int,
                context_words: tuple[int, int] = (40, 80), seed: int = 0) -> list[ClozePassage]:
    """``n`` non-overlapping cloze passages from ``text`` (held-out books, corpus format)."""
    low, high = context_words
    if not 1 <= low <= high:
        raise ValueError(f"context_words={context_words} must be (low, high) with 1 <= low <= high")
    rng = random.Random(seed)
    bodies = _section_bodies(text)
    candidates = _candidates(bodies, (low, high), rng)
    rng.shuffle(candidates)
    passages: list[ClozePassage] = []
    used: dict[int, list[tuple[int, int]]] = {}
    for number, start, target_start in candidates:
        body = bodies[number]
        context = body[start:target_start - 1]
        target = _TARGET.match(body, target_start).group(0)
        end = target_start + len(target)
        spans = used.setdefault(number, [])
        if not re.search(rf"\b{target}\b", context) or any(
                start < other_end and other_start < end for other_start, other_end in spans):
            continue
        spans.append((start, end))
        passages.append(ClozePassage(context, target, tuple(tokenizer.encode(context)),
                                     tuple(tokenizer.encode(" " + target))))
        if len(passages) == n:
            return passages
    raise ValueError(f"only {len(passages)} cloze passages found for n={n} with "
                     f"context_words={context_words}; lower n or pass more text")


@torch.no_grad()
def cloze_accuracy(logits_fn: LogitsFn, tokenizer: Tokenizer,
                   passages: Sequence[ClozePassage], *, max_len: int) -> float:
    """Fraction of passages whose whole target word is the greedy prediction.

    One forward pass per passage over ``context + target[:-1]`` (context truncated on the
    left to fit ``max_len``): greedy decoding reproduces the target exactly iff the argmax
    at each of the last ``len(target)`` positions equals the next target token.
    """
    if not passages:
        raise ValueError("passages is empty; build some with build_cloze(...)")
    correct = 0
    for passage in passages:
        target = list(passage.target_ids)
        keep = max_len - len(target) + 1
        if keep < 1:
            raise ValueError(f"max_len={max_len} is too short for target {passage.target!r} "
                             f"({len(target)} tokens); raise max_len")
        ids = (list(passage.context_ids)[-keep:] + target)[:-1]
        logits = logits_fn(torch.tensor([ids], dtype=torch.long))
        predicted = logits[0, -len(target):].argmax(dim=-1).tolist()
        correct += predicted == target
    return correct / len(passages)


def unigram_cloze_baseline(train_text: str, passages: Sequence[ClozePassage]) -> float:
    """Accuracy of predicting, for each passage, the word (3+ ASCII letters, case-sensitive)
    of the passage's context, other than ``STOPWORDS``, that is most frequent in
    ``train_text`` (ties: alphabetical first; words absent from training count 0).  The
    target always is such a word, so this is the "frequent word already in the passage"
    baseline, which knows how targets are chosen; it is not a random guess.
    """
    if not passages:
        raise ValueError("passages is empty; build some with build_cloze(...)")
    counts = Counter(_WORD.findall(train_text))
    correct = 0
    for passage in passages:
        words = {w for w in re.findall(r"\b[A-Za-z]{3,}\b", passage.context)
                 if w.lower() not in STOPWORDS}
        guess = min(words, key=lambda w: (-counts[w], w))
        correct += guess == passage.target
    return correct / len(passages)


@torch.no_grad()
def evaluate_lm(logits_fn: LogitsFn, token_file: str | TokenDataset, block_size: int, *,
                tokenizer: Tokenizer, max_windows: int | None = None,
                batch_size: int = 8) -> dict[str, float]:
    """Loss / perplexity / bits-per-byte over non-overlapping windows of a token file."""
    dataset = token_file if isinstance(token_file, TokenDataset) else TokenDataset(
        token_file, block_size)
    nll, tokens, nbytes = 0.0, 0, 0
    for x, y in eval_windows(dataset, block_size=block_size, batch_size=batch_size,
                             max_windows=max_windows):
        logits = logits_fn(x).float()
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                               reduction="sum").item()
        tokens += y.numel()
        nbytes += tokenizer.num_bytes(y.reshape(-1).tolist())
    return lm_metrics(nll, tokens, nbytes)


def lm_metrics(total_nll: float, num_tokens: int, num_bytes: int) -> dict[str, float]:
    """Metrics from a summed NLL in nats over ``num_tokens`` tokens of ``num_bytes`` bytes."""
    if num_tokens < 1:
        raise ValueError("no tokens were evaluated; the token file is shorter than one window")
    loss = total_nll / num_tokens
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": total_nll / math.log(2) / max(num_bytes, 1),
            "tokens": float(num_tokens), "bytes": float(num_bytes)}


def unigram_perplexity(train_ids: Sequence[int] | np.ndarray, test_ids: Sequence[int] | np.ndarray,
                       vocab_size: int, *, tokenizer: Tokenizer | None = None) -> dict[str, float]:
    """Add-one smoothed unigram model fit on ``train_ids``, scored on ``test_ids``:
    p(t) = (count(t) + 1) / (len(train) + vocab_size).  Returns the same keys as
    ``evaluate_lm`` (bits_per_byte needs ``tokenizer``; else it is NaN).
    """
    train = np.asarray(train_ids, dtype=np.int64)
    test = np.asarray(test_ids, dtype=np.int64)
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    if len(counts) > vocab_size or (test.size and not 0 <= test.min() <= test.max() < vocab_size):
        raise ValueError(f"train_ids / test_ids hold ids outside [0, vocab_size={vocab_size})")
    log_p = np.log(counts + 1.0) - math.log(len(train) + vocab_size)
    total_nll = float(-log_p[test].sum())
    if tokenizer is None:
        metrics = lm_metrics(total_nll, len(test), 1)
        metrics["bits_per_byte"], metrics["bytes"] = float("nan"), float("nan")
        return metrics
    return lm_metrics(total_nll, len(test), tokenizer.num_bytes(test.tolist()))
