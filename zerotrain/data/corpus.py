"""The bundled pretraining corpus: the World English Bible as plain text, one book per section.

File format (see ``assets/PROVENANCE.md``): UTF-8 text, sections separated by one blank
line; each section is a line with the book's name followed by the book's paragraphs and
poetry lines, one per line, with no blank lines inside a section.  ``.xz`` files are
decompressed transparently.
"""
from __future__ import annotations

import functools
import lzma
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

REBUILD_COMMAND = "python scripts/build_corpus.py"
ASSET_NAME = "web.txt.xz"
SECTION_SEP = "\n\n"

# Whole books held out for testing: narrative, wisdom, prophecy, gospel and letters from
# both testaments, chosen to have few near-verbatim parallels elsewhere in the corpus
# (no synoptic gospel, no Kings/Chronicles pair).  About 6.3% of the text.
DEFAULT_HELDOUT_BOOKS: tuple[str, ...] = (
    "Ruth", "Ecclesiastes", "Hosea", "Jonah", "Tobit", "John", "Romans", "Hebrews", "James",
)


@dataclass(frozen=True)
class Book:
    name: str
    text: str  # the book's body, without the name line

    @property
    def section(self) -> str:
        """The book as it appears in the corpus file: name line, then body."""
        return f"{self.name}\n{self.text}"


@dataclass(frozen=True)
class Corpus:
    books: tuple[Book, ...]
    path: str

    @property
    def names(self) -> list[str]:
        return [book.name for book in self.books]

    @property
    def text(self) -> str:
        return join_books(self.books)

    def book(self, name: str) -> Book:
        for book in self.books:
            if book.name == name:
                return book
        raise KeyError(f"book {name!r} is not in the corpus {self.path}; "
                       f"known books: {', '.join(self.names)}")


def default_corpus_path() -> Path:
    """Where the bundled asset lives inside the installed package."""
    return Path(str(resources.files("zerotrain.data").joinpath("assets", ASSET_NAME)))


def join_books(books: Iterable[Book]) -> str:
    return SECTION_SEP.join(book.section for book in books)


def parse_corpus(text: str, *, source: str = "<string>") -> Corpus:
    """Split corpus text into books (see the module docstring for the format)."""
    books, seen = [], set()
    for number, section in enumerate(text.strip("\n").split(SECTION_SEP), start=1):
        name, _, body = section.partition("\n")
        name, body = name.strip(), body.strip("\n")
        if not name or not body:
            raise ValueError(f"corpus {source}: section {number} ({name or 'no name'!r}) "
                             "has no name line or no text; expected a name line then its text, "
                             "sections separated by one blank line")
        if name in seen:
            raise ValueError(f"corpus {source}: book name {name!r} appears twice")
        seen.add(name)
        books.append(Book(name, body))
    return Corpus(tuple(books), source)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> Corpus:
    raw = Path(path).read_bytes()
    if path.endswith(".xz"):
        raw = lzma.decompress(raw)
    return parse_corpus(raw.decode("utf-8"), source=path)


def load_corpus(path: str | Path | None = None) -> Corpus:
    """Load the corpus at ``path`` (default: the bundled World English Bible asset)."""
    resolved = Path(path) if path is not None else default_corpus_path()
    if not resolved.is_file():
        hint = (f"rebuild it with `{REBUILD_COMMAND}`" if path is None
                else "pass an existing corpus file, or None for the bundled corpus")
        raise FileNotFoundError(f"corpus file not found: {resolved}; {hint}")
    return _load_cached(str(resolved.resolve()))


def split_books(corpus: Corpus, heldout_books: Iterable[str] = DEFAULT_HELDOUT_BOOKS
                ) -> tuple[list[Book], list[Book]]:
    """(train books, held-out books), both in corpus order."""
    heldout = list(heldout_books)
    unknown = [name for name in heldout if name not in corpus.names]
    if unknown:
        raise ValueError(f"heldout_books={unknown} are not books of {corpus.path}; "
                         f"choose from: {', '.join(corpus.names)}")
    if not heldout or len(set(heldout)) == len(corpus.books):
        raise ValueError(f"heldout_books={heldout} must name at least one book and leave "
                         "at least one book for training")
    chosen = set(heldout)
    train = [book for book in corpus.books if book.name not in chosen]
    test = [book for book in corpus.books if book.name in chosen]
    return train, test


def split(corpus: Corpus, heldout_books: Iterable[str] = DEFAULT_HELDOUT_BOOKS
          ) -> tuple[str, str]:
    """(train_text, test_text): whole books held out, each side in corpus format."""
    train, test = split_books(corpus, heldout_books)
    return join_books(train), join_books(test)
