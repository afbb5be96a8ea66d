"""Abstractive summarization pairs (document -> one-line summary) from two offline sources.

* ``debian``: Debian package descriptions, long description -> synopsis (~54k pairs on bookworm).
  They come with apt's English translation index, which is fetched at set-up (not bundled: the
  descriptions carry their packages' many licences)::

      apt-get update -o Acquire::Languages=en

  and read with ``/usr/lib/apt/apt-helper cat-file`` (the index is lz4-compressed). A later
  plain ``apt-get update`` deletes the index again; a built data file keeps working.
* ``docstrings``: Python standard-library docstrings (PSF licence), body -> first line, read with
  ``ast`` from the running interpreter's stdlib sources: always available.

Pairs are split train / test by *family*, so near-duplicates never straddle the split: for a
Debian package the family is its source package with version numbers removed (``gcc-12`` and
``gcc-13`` are one family), for a docstring the top-level module it is in. Identical pairs are
kept once. Everything is sorted, so a build is a function of its inputs.
"""
from __future__ import annotations

import ast
import glob
import hashlib
import inspect
import re
import subprocess
import sysconfig
from pathlib import Path

APT_LISTS = "/var/lib/apt/lists"
APT_HELPER = "/usr/lib/apt/apt-helper"
SET_UP = "apt-get update -o Acquire::Languages=en"
SOURCES = ("debian", "docstrings")
TEST_SHARE = 10
_VERSION = re.compile(r"[-.]?\d+(\.\d+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _stable_bucket(text: str, share: int = TEST_SHARE) -> str:
    return "test" if int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % share == 0 else "train"


def _cat(path: str) -> str:
    out = subprocess.run([APT_HELPER, "cat-file", path], check=True, capture_output=True)
    return out.stdout.decode("utf-8", errors="replace")


def _stanzas(text: str):
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.splitlines():
            if line.startswith(" ") and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def translation_files(lists_dir: str = APT_LISTS) -> list[str]:
    return sorted(glob.glob(f"{lists_dir}/*_i18n_Translation-en*"))


def _long_description(body: str) -> str:
    paragraphs, current = [], []
    for line in body.split("\n"):
        line = line[1:] if line.startswith(" ") else line
        if line.strip() == ".":
            paragraphs.append(" ".join(current))
            current = []
        else:
            current.append(line.strip())
    paragraphs.append(" ".join(current))
    return "\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def family_of(source: str) -> str:
    return _VERSION.sub("", source.lower()).strip("-.") or source.lower()


def debian_pairs(lists_dir: str = APT_LISTS) -> list[dict]:
    """Pairs from every English translation index under ``lists_dir`` (empty if there is none)."""
    sources: dict[str, str] = {}
    for path in sorted(glob.glob(f"{lists_dir}/*_binary-*_Packages*")):
        for st in _stanzas(_cat(path)):
            if "Package" in st:
                sources[st["Package"]] = st.get("Source", st["Package"]).split()[0]
    pairs = []
    for path in translation_files(lists_dir):
        for st in _stanzas(_cat(path)):
            synopsis, _, body = st.get("Description-en", "").partition("\n")
            document = _long_description(body)
            if synopsis and len(document.split()) >= 8:
                family = "debian:" + family_of(sources.get(st["Package"], st["Package"]))
                pairs.append({"source": "debian", "family": family, "name": st["Package"],
                              "document": document, "summary": synopsis.strip()})
    return pairs


def _docstring_pair(node, module: str) -> dict | None:
    doc = ast.get_docstring(node, clean=False)
    if not doc:
        return None
    lines = inspect.cleandoc(doc).split("\n")
    summary = lines[0].strip()
    body = " ".join(" ".join(lines[1:]).split())
    if not (3 <= len(summary.split()) <= 20 and summary.endswith(".") and len(body.split()) >= 8):
        return None
    if re.search(r">>>|:param|\.\. ", body):
        return None
    name = getattr(node, "name", module)
    return {"source": "docstrings", "family": "docstrings:" + module.split(".")[0], "name": f"{module}.{name}"
            if name != module else module, "document": body, "summary": summary}


def docstring_pairs(stdlib: str | None = None) -> list[dict]:
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    pairs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3") or "tests" in rel.parts:
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                pair = _docstring_pair(node, module)
                if pair is not None:
                    pairs.append(pair)
    return pairs


def build_pairs(sources=SOURCES, *, lists_dir: str = APT_LISTS, stdlib: str | None = None) -> list[dict]:
    """Unique pairs of ``sources``, each with its ``split``, sorted by (source, family, name)."""
    pairs = []
    if "debian" in sources:
        pairs += debian_pairs(lists_dir)
    if "docstrings" in sources:
        pairs += docstring_pairs(stdlib)
    seen, out = set(), []
    for p in sorted(pairs, key=lambda p: (p["source"], p["family"], p["name"], p["document"])):
        key = (p["document"], p["summary"])
        if key not in seen:
            seen.add(key)
            out.append({**p, "split": _stable_bucket(p["family"])})
    return out


# ------------------------------------------------------------------ baselines and scores
def first_sentence(document: str) -> str:
    return _SENTENCE_END.split(document.strip(), maxsplit=1)[0]


def lead_words(document: str, k: int) -> str:
    return " ".join(document.split()[:k])


def rouge_items(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Each prediction's ROUGE-1/2/L F1 (``rouge-score``, Porter stemming)."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {key: [s[key].fmeasure for s in scores] for key in ("rouge1", "rouge2", "rougeL")}


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (``rouge-score``, Porter stemming)."""
    n = max(len(references), 1)
    means = {k: sum(v) / n for k, v in rouge_items(predictions, references).items()}
    return {**means, "examples": len(references)}
