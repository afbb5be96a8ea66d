"""Direct question answering from WordNet 3.0: examples, the pretraining prose, metrics, baselines.

The bundled ``wordnet_qa.jsonl.xz`` (built by ``scripts/build_qa.py``) holds ~9.9k facts, each a
question, a full-sentence answer that restates the question's subject ("What is the capital of
Afghanistan?" -> "The capital of Afghanistan is Kabul.") and a prose sentence ("Kabul is the
capital of Afghanistan."). Facts are split train / test by subject.

* Pretraining: every fact's prose sentence (test facts included) is part of the bundled corpus'
  training text (:func:`prose_books`), never a question, so zero-shot QA measures what
  pretraining stored.
* Fine-tuning and evaluation: each fact gives two examples, closed-book (question only) and with a
  passage (its prose sentence among two prose sentences of other facts of the same kind and split,
  in a seeded order), so the model must find the fact it is asked about.
* Metrics (SQuAD-style normalisation: lower case, no punctuation, no articles): exact match, token
  F1, and the share of answers that are full sentences restating the subject.
* Baselines: the question itself as the answer, and the nearest WordNet gloss (of all facts' glosses)
  by word overlap with the question.
"""
from __future__ import annotations

import functools
import hashlib
import json
import lzma
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

ASSET = "wordnet_qa.jsonl.xz"
PROSE_SECTION = 300                  # prose sentences per pretraining section
PASSAGE_SENTENCES = 3
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_QUESTION_WORDS = frozenset("what who is was of in to".split())   # ignored by the gloss baseline


@dataclass(frozen=True)
class QAExample:
    question: str
    answer: str
    subject: str
    kind: str
    passage: str | None = None


def asset_path() -> Path:
    return Path(str(resources.files("zerotrain.data").joinpath("assets", ASSET)))


@functools.lru_cache(maxsize=1)
def load_facts() -> tuple[dict, ...]:
    path = asset_path()
    if not path.is_file():
        raise FileNotFoundError(f"QA facts not found: {path}; rebuild them with `python scripts/build_qa.py`")
    return tuple(json.loads(line) for line in lzma.decompress(path.read_bytes()).decode("utf-8").splitlines())


def _seed(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def prose_books():
    """The facts' prose as corpus books ("WordNet facts 1", ...), sentences in a seeded order."""
    from zerotrain.data.corpus import Book
    sentences = [f["prose"] for f in load_facts()]
    random.Random(0).shuffle(sentences)
    return [Book(f"WordNet facts {i // PROSE_SECTION + 1}", "\n".join(sentences[i:i + PROSE_SECTION]))
            for i in range(0, len(sentences), PROSE_SECTION)]


def examples(split: str, *, passages: str = "both") -> list[QAExample]:
    """``split``'s examples; ``passages``: "both" (closed-book and with passage), "none" or "only"."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: use 'train' or 'test'")
    facts = [f for f in load_facts() if f["split"] == split]
    by_kind: dict[str, list[dict]] = {}
    for f in facts:
        by_kind.setdefault(f["kind"], []).append(f)
    out = []
    for f in facts:
        base = QAExample(f["question"], f["answer"], f["subject"], f["kind"])
        if passages in ("both", "none"):
            out.append(base)
        if passages in ("both", "only"):
            rng = random.Random(_seed(f["question"]))
            others = [o["prose"] for o in rng.sample(by_kind[f["kind"]], min(PASSAGE_SENTENCES, len(by_kind[f["kind"]])))
                      if o is not f][:PASSAGE_SENTENCES - 1]
            sentences = others + [f["prose"]]
            rng.shuffle(sentences)
            out.append(QAExample(f["question"], f["answer"], f["subject"], f["kind"], " ".join(sentences)))
    return out


def glosses() -> list[str]:
    """The glosses of every fact's subject (the nearest-gloss baseline's pool), sorted, unique."""
    return sorted({f["gloss"] for f in load_facts() if f["gloss"]})


# ------------------------------------------------------------------ metrics
def normalize(text: str) -> list[str]:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return _ARTICLES.sub(" ", text).split()


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize(prediction) == normalize(answer))


def token_f1(prediction: str, answer: str) -> float:
    pred, gold = normalize(prediction), normalize(answer)
    common = sum((Counter(pred) & Counter(gold)).values())
    if not pred or not gold or not common:
        return float(pred == gold)
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def is_full_sentence(prediction: str, subject: str) -> bool:
    """A full sentence restating the subject: capitalised, at least three words, ending with
    ``.``/``!``, containing the question's subject (case-insensitive) outside the question form."""
    text = prediction.strip()
    return (len(text.split()) >= 3 and text[:1].isupper() and text[-1:] in ".!"
            and subject.lower() in text.lower() and "?" not in text)


def score(predictions: list[str], refs: list[QAExample]) -> dict[str, float]:
    n = max(len(refs), 1)
    return {"exact_match": sum(map(exact_match, predictions, [r.answer for r in refs])) / n,
            "f1": sum(map(token_f1, predictions, [r.answer for r in refs])) / n,
            "full_sentence": sum(is_full_sentence(p, r.subject) for p, r in zip(predictions, refs)) / n,
            "examples": len(refs)}


# ------------------------------------------------------------------ baselines
def copy_question(refs: list[QAExample]) -> list[str]:
    return [r.question for r in refs]


class NearestGloss:
    """Answer with the gloss sharing the most (normalised) words with the question; ties go to
    the shorter gloss, then the alphabetically first."""

    def __init__(self, pool: list[str] | None = None):
        self.pool = pool if pool is not None else glosses()
        self.words = [set(normalize(g)) for g in self.pool]
        self.index: dict[str, list[int]] = {}
        for i, words in enumerate(self.words):
            for w in words:
                self.index.setdefault(w, []).append(i)

    def __call__(self, refs: list[QAExample]) -> list[str]:
        out = []
        for r in refs:
            words = set(normalize(r.question)) - _QUESTION_WORDS
            counts = Counter(i for w in words for i in self.index.get(w, ()))
            if not counts:
                out.append("")
                continue
            best = min(counts, key=lambda i: (-counts[i], len(self.pool[i]), self.pool[i]))
            out.append(self.pool[best])
        return out
