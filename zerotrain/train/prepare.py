"""Data for a run: corpus split, tokenizer (trained once, cached) and token files (memory-mapped).

Everything lands in the run directory: ``tokenizer.json`` and ``data/{train,heldout}.npy`` with
``data/meta.json`` recording what they were built from; a later start with the same inputs reuses
them. Files are written under a temporary name and renamed, so an interrupted build leaves no
half-written file behind.

A corpus given with ``--corpus`` is read in the bundled corpus' format (a name line, then text;
sections separated by one blank line); it must be UTF-8 text. When none of the default held-out
books are in it (or it is plain text), the last sections holding about 5% of the text are held
out instead, with a warning; held-out books named explicitly (``data.heldout_books``) must all
be in the corpus.

With ``data.facts`` (the default) the bundled corpus' training side also holds the prose of the
WordNet facts that ``zerotrain finetune --tasks qa`` asks about (``zerotrain.data.tasks.qa``);
a corpus given with ``--corpus`` is used as it is.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from zerotrain.data import (DEFAULT_HELDOUT_BOOKS, Book, Corpus, build_token_file, load_corpus,
                            load_tokenizer, split_books, train_tokenizer)
from zerotrain.data.corpus import join_books

from .options import Options, UsageError

log = logging.getLogger("zerotrain")
HELDOUT_FRACTION = 0.05


@dataclass(frozen=True)
class RunData:
    train_text: str
    heldout_text: str
    heldout_names: tuple[str, ...]
    tokenizer_path: Path
    train_path: Path
    heldout_path: Path


def _load(opts: Options) -> Corpus:
    corpus = _read(opts)
    if any("\x00" in b.text or "\x00" in b.name for b in corpus.books):
        raise UsageError(f"corpus {opts.data.corpus} holds NUL characters: it looks like a binary file, not "
                         "text; pass a UTF-8 text file")
    return corpus


def _read(opts: Options) -> Corpus:
    try:
        return load_corpus(opts.data.corpus)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    except UnicodeDecodeError as e:
        raise UsageError(f"corpus {opts.data.corpus} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                         f"offset {e.start:,}); pass a UTF-8 text file (convert it with iconv)") from None
    except ValueError:
        text = Path(opts.data.corpus).read_text(encoding="utf-8")
        chunks = [c for c in text.split("\n\n") if c.strip()]
        books = tuple(Book(f"part {i + 1}", c.strip("\n")) for i, c in enumerate(chunks))
        return Corpus(books, str(opts.data.corpus))


def split_corpus(opts: Options) -> tuple[list[Book], list[Book]]:
    """(train books, held-out books) following ``data.heldout_books`` (see the module docstring)."""
    train, held = _split_books(opts)
    if opts.data.facts and opts.data.corpus is None:
        from zerotrain.data.tasks.qa import prose_books
        train = train + prose_books()
    return train, held


def _split_books(opts: Options) -> tuple[list[Book], list[Book]]:
    corpus = _load(opts)
    asked = list(opts.data.heldout_books)
    wanted = [b for b in asked if b in corpus.names]
    explicit = asked != list(DEFAULT_HELDOUT_BOOKS)
    if explicit and len(wanted) < len(asked):
        missing = [b for b in asked if b not in corpus.names]
        shown = ", ".join(corpus.names[:12]) + (", ..." if len(corpus.names) > 12 else "")
        raise UsageError(f"data.heldout_books: {missing} are not sections of {corpus.path} (it has: {shown}); "
                         "name sections of this corpus, or leave data.heldout_books out to hold out its last 5%")
    if wanted:
        try:
            return split_books(corpus, wanted)
        except ValueError as e:
            raise UsageError(f"data.heldout_books: {e}") from None
    log.warning("none of the default held-out books are in %s: holding out its last sections (about %d%% "
                "of the text) instead", corpus.path, round(100 * HELDOUT_FRACTION))
    if len(corpus.books) < 2:
        raise UsageError(f"corpus {corpus.path} has a single section; separate it into sections "
                         "with blank lines so some can be held out for evaluation")
    total, held = sum(len(b.text) for b in corpus.books), 0
    cut = len(corpus.books)
    while cut > 1 and held < HELDOUT_FRACTION * total:
        cut -= 1
        held += len(corpus.books[cut].text)
    return list(corpus.books[:cut]), list(corpus.books[cut:])


def _fingerprint(opts: Options) -> dict:
    path = Path(opts.data.corpus) if opts.data.corpus else None
    stat = path.stat() if path else None
    return {"corpus": str(path.resolve()) if path else "bundled",
            "corpus_size": stat.st_size if stat else None,
            "corpus_mtime": int(stat.st_mtime) if stat else None,
            "vocab_size": opts.data.vocab_size, "tokenizer_chars": opts.data.tokenizer_chars,
            "heldout_books": list(opts.data.heldout_books), "facts": opts.data.facts and path is None}


def _replace_atomically(build, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        build(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_data(opts: Options, *, build: bool = True) -> RunData:
    """Split, tokenizer and token files for ``opts``'s run; built when missing or stale.

    With ``build=False`` the cached files must exist (ranks other than the builder use this)."""
    run_dir = opts.run_dir
    data_dir = run_dir / "data"
    meta_path = data_dir / "meta.json"
    tok_path, train_path, held_path = run_dir / "tokenizer.json", data_dir / "train.npy", data_dir / "heldout.npy"
    train_books, held_books = split_corpus(opts)
    result = RunData(join_books(train_books), join_books(held_books),
                     tuple(b.name for b in held_books), tok_path, train_path, held_path)
    fingerprint = _fingerprint(opts)
    fresh = (meta_path.is_file() and json.loads(meta_path.read_text()) == fingerprint
             and all(p.is_file() for p in (tok_path, train_path, held_path)))
    if fresh or not build:
        return result
    data_dir.mkdir(parents=True, exist_ok=True)
    source = result.train_text[:opts.data.tokenizer_chars] if opts.data.tokenizer_chars else None
    texts = [source] if source is not None else [b.text for b in train_books]
    log.info("training a %d-token BPE tokenizer on %s characters", opts.data.vocab_size,
             f"{sum(map(len, texts)):,}")
    tokenizer = train_tokenizer(texts, opts.data.vocab_size)
    _replace_atomically(tokenizer.save, tok_path)
    tokenizer = load_tokenizer(tok_path)
    for books, path in ((train_books, train_path), (held_books, held_path)):
        _replace_atomically(lambda tmp, b=books: build_token_file(tokenizer, [x.section for x in b], tmp), path)
    meta_path.write_text(json.dumps(fingerprint, indent=1))
    log.info("tokenised %s: %s training books, %d held out (%s)", fingerprint["corpus"],
             len(train_books), len(held_books), ", ".join(result.heldout_names))
    return result
