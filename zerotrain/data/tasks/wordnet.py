"""WordNet 3.0 database files (``data.*`` / ``index.*`` of Debian's ``wordnet-base``) -> QA facts.

Only the parts the question builder needs are read: per synset its lemmas, lexicographer file,
pointers and gloss; per lemma its synsets in frequency order and its tagged-sense count. A fact is
one relation written three ways: a question, a full-sentence answer restating the question's
subject, and the prose sentence that the pretraining text holds (see ``zerotrain.data.tasks.qa``).

The selection is a pure function of the database files (sorted, capped per kind by a hash of the
subject), so rebuilding gives the same facts.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
PERSON_LEXFILE = 18                       # noun.person
CAPITAL_CLASSES = ("national_capital", "state_capital")
KIND_CAPS = {"capital": None, "person": 1500, "definition": 3000, "antonym": 1200, "member": 800,
             "part": 1500, "hypernym": 2000}
_LEMMA_OK = re.compile(r"^[A-Za-z][A-Za-z' -]*[A-Za-z]$")


@dataclass(frozen=True)
class Synset:
    key: str                 # "<pos><offset>"
    lexfile: int
    lemmas: tuple[str, ...]
    pointers: tuple[tuple[str, str], ...]   # (symbol, target key)
    gloss: str

    @property
    def name(self) -> str:
        return self.lemmas[0]


def _lemma(raw: str) -> str:
    return re.sub(r"\([a-z]+\)$", "", raw).replace("_", " ")


def parse_data_line(line: str, pos: str) -> Synset | None:
    if line.startswith("  "):                # licence header
        return None
    head, _, gloss = line.partition(" | ")
    f = head.split()
    n_words = int(f[3], 16)
    lemmas = tuple(_lemma(f[4 + 2 * i]) for i in range(n_words))
    at = 4 + 2 * n_words
    n_ptr = int(f[at])
    pointers = tuple((f[at + 1 + 4 * i], POS_FILES[f[at + 3 + 4 * i]][0] + f[at + 2 + 4 * i])
                     for i in range(n_ptr))
    return Synset(POS_FILES[pos][0] + f[0], int(f[1]), lemmas, pointers, gloss.strip())


def read_wordnet(root: str | Path) -> tuple[dict[str, Synset], dict[str, tuple[list[str], int]]]:
    """(synsets by key, index: "<pos>:<lemma>" -> (synset keys most frequent first, tagged count))."""
    root = Path(root)
    synsets: dict[str, Synset] = {}
    index: dict[str, tuple[list[str], int]] = {}
    for pos in ("noun", "verb", "adj"):
        for line in (root / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            s = parse_data_line(line, pos[0])
            if s is not None:
                synsets[s.key] = s
        for line in (root / f"index.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):
                continue
            f = line.split()
            n_senses, n_ptr = int(f[2]), int(f[3])
            tagged = int(f[5 + n_ptr])
            keys = [pos[0] + off for off in f[6 + n_ptr:6 + n_ptr + n_senses]]
            index[f"{pos[0]}:{_lemma(f[0])}"] = (keys, tagged)
    return synsets, index


def clean_gloss(gloss: str) -> str | None:
    """The definition part of a gloss (before examples), without parentheses; None if unusable."""
    text = re.sub(r"\s*\([^()]*\)", "", gloss.split(";")[0]).strip()
    words = text.split()
    if not 2 <= len(words) <= 14 or re.search(r"[.?!\"`:()\[\]]|\d", text):
        return None
    return text


def article(noun: str, capital: bool = False) -> str:
    a = "an" if noun[0].lower() in "aeiou" else "a"
    return f"{a.capitalize() if capital else a} {noun}"


def _ok(lemma: str) -> bool:
    return bool(_LEMMA_OK.match(lemma)) and len(lemma) <= 30


def _stable(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _primary(synsets, index, pos: str):
    """(lemma, synset) for lemmas whose most frequent sense has been seen in tagged text."""
    for key in sorted(index):
        if not key.startswith(pos + ":"):
            continue
        keys, tagged = index[key]
        lemma = key[2:]
        if tagged >= 1 and _ok(lemma) and lemma.islower() and keys[0] in synsets:
            yield lemma, synsets[keys[0]]


def _fact(kind: str, subject: str, question: str, answer: str, prose: str, gloss: str | None) -> dict:
    return {"kind": kind, "subject": subject, "question": question, "answer": answer, "prose": prose,
            "gloss": gloss or ""}


def _targets(s: Synset, symbol: str) -> list[str]:
    return [t for sym, t in s.pointers if sym == symbol]


def capital_facts(synsets, index) -> list[dict]:
    classes = {index[f"n:{c.replace('_', ' ')}"][0][0] for c in CAPITAL_CLASSES}
    out = []
    for s in synsets.values():
        if not classes & set(_targets(s, "@i")) or not _targets(s, "#p"):
            continue
        city, country = s.name, synsets[_targets(s, "#p")[0]].name
        if _ok(city) and _ok(country):
            out.append(_fact("capital", country, f"What is the capital of {country}?",
                             f"The capital of {country} is {city}.", f"{city} is the capital of {country}.",
                             clean_gloss(s.gloss)))
    return out


def person_facts(synsets, index) -> list[dict]:
    out = []
    for s in synsets.values():
        kinds = _targets(s, "@i")
        if s.lexfile != PERSON_LEXFILE or not kinds or not _ok(s.name) or not s.name[0].isupper():
            continue
        kind = synsets[kinds[0]].name
        if _ok(kind):
            sentence = f"{s.name} was {article(kind)}."
            out.append(_fact("person", s.name, f"Who was {s.name}?", sentence, sentence, clean_gloss(s.gloss)))
    return out


def definition_facts(synsets, index) -> list[dict]:
    out = []
    for lemma, s in _primary(synsets, index, "n"):
        gloss = clean_gloss(s.gloss)
        if gloss:
            sentence = f"{article(lemma, True)} is {gloss}."
            out.append(_fact("definition", lemma, f"What is {article(lemma)}?", sentence, sentence, gloss))
    return out


def antonym_facts(synsets, index) -> list[dict]:
    out = []
    for lemma, s in _primary(synsets, index, "a"):
        targets = [synsets[t] for t in _targets(s, "!")]
        if targets and _ok(targets[0].name):
            other = targets[0].name
            out.append(_fact("antonym", lemma, f"What is the opposite of {lemma}?",
                             f"The opposite of {lemma} is {other}.", f"{lemma.capitalize()} is the opposite "
                             f"of {other}.", clean_gloss(s.gloss)))
    return out


def relation_facts(synsets, index, *, kind: str, symbol: str) -> list[dict]:
    """member (``#m``), part (``#p``) and hypernym (``@``) facts of primary noun senses; part
    facts also of named places."""
    out = []
    pairs = list(_primary(synsets, index, "n"))
    if kind == "part":
        pairs += [(s.name, s) for s in synsets.values() if s.key[0] == "n" and s.name[:1].isupper()
                  and _targets(s, "@i") and _ok(s.name)]
    for lemma, s in pairs:
        targets = _targets(s, symbol)
        if not targets or not _ok(synsets[targets[0]].name):
            continue
        other, gloss = synsets[targets[0]].name, clean_gloss(s.gloss)
        subject = lemma if lemma[0].isupper() else article(lemma)
        if kind == "member":
            q, a = f"What is {subject} a member of?", f"{subject[0].upper()}{subject[1:]} is a member of {other}."
        elif kind == "part":
            q, a = f"What is {subject} part of?", f"{subject[0].upper()}{subject[1:]} is part of {other}."
        else:
            q, a = f"What kind of thing is {subject}?", f"{article(lemma, True)} is a kind of {other}."
        out.append(_fact(kind, lemma, q, a, a, gloss))
    return out


def build_facts(root: str | Path, *, test_share: int = 10) -> list[dict]:
    """All facts, each with ``split`` ("train" / "test", by a hash of its subject so a subject's
    facts never straddle), capped per kind, questions unique, in a stable order."""
    synsets, index = read_wordnet(root)
    kinds = {"capital": capital_facts(synsets, index), "person": person_facts(synsets, index),
             "definition": definition_facts(synsets, index), "antonym": antonym_facts(synsets, index),
             "member": relation_facts(synsets, index, kind="member", symbol="#m"),
             "part": relation_facts(synsets, index, kind="part", symbol="#p"),
             "hypernym": relation_facts(synsets, index, kind="hypernym", symbol="@")}
    facts, seen = [], set()
    for kind, found in kinds.items():
        found.sort(key=lambda f: (_stable(f["question"]), f["answer"]))
        kept = 0
        for fact in found:
            if fact["question"] in seen or re.search(r"[.?!]", fact["answer"][:-1]):
                continue
            if KIND_CAPS[kind] is not None and kept >= KIND_CAPS[kind]:
                break
            seen.add(fact["question"])
            fact["split"] = "test" if int(_stable(fact["subject"].lower())[:8], 16) % test_share == 0 else "train"
            facts.append(fact)
            kept += 1
    return facts
