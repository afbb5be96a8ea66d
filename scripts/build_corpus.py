#!/usr/bin/env python3
"""Rebuild zerotrain's bundled corpus from Debian's ``sword-text-web`` package.

The package holds the World English Bible (public domain) as a SWORD zText
module.  This script downloads the .deb (``apt-get download``, no install),
unpacks it with ``dpkg-deb -x``, reads the module through its verse index,
strips the OSIS markup and writes, under ``zerotrain/data/assets/``:

* ``web.txt.xz``  - plain text, one book per section: a line with the book's
  name, then its paragraphs / poetry lines one per line; books are separated
  by one blank line and contain no blank lines themselves;
* ``books.json`` - per book: OSIS id, name, long title, char offsets;
* ``PROVENANCE.md`` - where the text came from and how to rebuild it.

The output depends only on the package contents, so reruns are byte-identical.

    python scripts/build_corpus.py [--deb PATH] [--out DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import html
import json
import lzma
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

PACKAGE = "sword-text-web"
MODULE_DIR = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
REBUILD = "python scripts/build_corpus.py"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "zerotrain" / "data" / "assets"
# "Daniel (Greek)" repeats Daniel 1-12 verbatim around the Greek additions, so
# keeping it would put the same text on both sides of a book-level split.
SKIPPED_BOOKS = {"DanGr": "repeats the Hebrew Daniel text verbatim"}
XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]

_BOOK_TAG = re.compile(r'<div\b[^>]*\btype="book"[^>]*/>')
_ATTR = re.compile(r'(\w+)="([^"]*)"')


# --------------------------------------------------------------------------- package
def fetch_deb(workdir: Path) -> Path:
    """``apt-get download`` the package into ``workdir`` (``apt-get update`` on failure)."""
    cmd = ["apt-get", "download", PACKAGE]
    if subprocess.run(cmd, cwd=workdir).returncode != 0:
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(cmd, cwd=workdir, check=True)
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        sys.exit(f"apt-get download {PACKAGE} produced no .deb in {workdir}")
    return debs[-1]


def deb_field(deb: Path, field: str) -> str:
    out = subprocess.run(["dpkg-deb", "-f", str(deb), field], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


# --------------------------------------------------------------------------- zText
def read_testament(module: Path, name: str) -> list[str]:
    """Entries of one testament (``ot``/``nt``) in verse-index order.

    ``.bzs``: 12-byte records (offset, compressed size, size) of zlib blocks in
    ``.bzz``; ``.bzv``: 10-byte records (block u32, offset u32, size u16).
    Entries longer than 65535 bytes have their size truncated to 16 bits; the
    true size is recovered from where the next entry of the same block starts.
    Repeated records (linked verses) are kept once.
    """
    bzs = (module / f"{name}.bzs").read_bytes()
    bzz = (module / f"{name}.bzz").read_bytes()
    bzv = (module / f"{name}.bzv").read_bytes()
    blocks = [zlib.decompress(bzz[off:off + csize])
              for off, csize, _ in struct.iter_unpack("<III", bzs)]
    records = list(struct.iter_unpack("<IIH", bzv))
    starts: dict[int, list[int]] = {}
    for block, off, size in records:
        if size:
            starts.setdefault(block, []).append(off)
    entries, seen = [], set()
    for block, off, size in records:
        if not size or (block, off) in seen:
            continue
        seen.add((block, off))
        data = blocks[block]
        later = [s for s in starts[block] if s > off] + [len(data)]
        end = min(later)
        if off + size < end and (end - off - size) % 65536 == 0:
            size = end - off
        entries.append(data[off:off + size].decode("utf-8"))
    return entries


def split_books(osis: str) -> list[dict]:
    """Cut the concatenated OSIS stream at ``<div type="book" sID/eID>`` markers."""
    books, current, start = [], None, 0
    for match in _BOOK_TAG.finditer(osis):
        attrs = dict(_ATTR.findall(match.group(0)))
        if "sID" in attrs:
            current, start = attrs["osisID"], match.end()
        elif current is not None:
            books.append({"osis": current, "markup": osis[start:match.start()]})
            current = None
    return books


# --------------------------------------------------------------------------- markup
_SENTINEL = "\x00"  # where a footnote was: becomes a space unless punctuation follows
_DROP_SPANS = [
    re.compile(r"<note\b[^>]*>.*?</note>", re.S),
    re.compile(r'<title\b[^>]*type="main"[^>]*>.*?</title>', re.S),
    re.compile(r'<div\b[^>]*sID="([^"]+)"[^>]*type="introduction"[^>]*/>.*?'
               r'<div\b[^>]*eID="\1"[^>]*/>', re.S),
]
_BREAK = re.compile(r"</?(?:title|speaker|item|list|lg|l|lb|chapter)\b[^>]*>"
                    r'|<div\b[^>]*type="x-p"[^>]*/>')
_LABEL = re.compile(r'<milestone\b[^>]*n="([^"]*)"[^>]*type="x-chapterLabel"[^>]*/>')


def markup_to_text(markup: str) -> str:
    """OSIS fragment -> lines of plain text (no blank lines, single spaces)."""
    text = _DROP_SPANS[0].sub(_SENTINEL, markup)
    for pattern in _DROP_SPANS[1:]:
        text = pattern.sub("", text)
    text = _LABEL.sub(lambda m: f"\n{m.group(1)}\n", text)
    text = _BREAK.sub("\n", text)
    text = html.unescape(re.sub(r"<[^>]*>", "", text))
    text = re.sub(r"\s*" + _SENTINEL + r"[\s\x00]*(?=[,.;:!?’”)\]—]|$)", "", text)
    text = re.sub(_SENTINEL + r"+(?=\s)", "", text)
    text = re.sub(r"(?<=[\s“‘(\[—])" + _SENTINEL + "+", "", text)
    text = re.sub(_SENTINEL + "+", " ", text)
    lines = (re.sub(r"\s+", " ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def book_names(markup: str, osis: str) -> tuple[str, str]:
    """(short name, long title) from the book's ``x-usfm-h`` / ``x-usfm-toc1`` milestones."""
    found = {}
    for kind in ("h", "toc1"):
        m = re.search(rf'<milestone\b[^>]*n="([^"]*)"[^>]*type="x-usfm-{kind}"', markup)
        found[kind] = html.unescape(m.group(1)) if m else osis
    return found["h"], found["toc1"]


# --------------------------------------------------------------------------- output
def build_books(module: Path) -> list[dict]:
    books = []
    for testament in ("ot", "nt"):
        for book in split_books(" ".join(read_testament(module, testament))):
            if book["osis"] in SKIPPED_BOOKS:
                continue
            name, title = book_names(book["markup"], book["osis"])
            books.append({"osis": book["osis"], "name": name, "title": title,
                          "body": markup_to_text(book["markup"])})
    return books


def assemble(books: list[dict]) -> tuple[str, list[dict]]:
    """Join books into one text; return it and the index with char offsets."""
    parts, index, pos = [], [], 0
    for book in books:
        section = f"{book['name']}\n{book['body']}"
        index.append({"osis": book["osis"], "name": book["name"], "title": book["title"],
                      "start": pos, "end": pos + len(section)})
        parts.append(section)
        pos += len(section) + 2
    return "\n\n".join(parts) + "\n", index


PROVENANCE = """# Provenance of `web.txt.xz`

* Source: Debian package `{package}` version `{version}` (SWORD module
  `engWEB2015eb`, "World English Bible with Deuterocanon", module version {modver}).
* Text: the World English Bible, which its publisher (eBible.org) has dedicated
  to the public domain: "The World English Bible is in the Public Domain. That
  means that it is not copyrighted." ("World English Bible" is a trademark of
  eBible.org; this file is a plain-text extraction, with footnotes and
  formatting removed, and is called the WEB corpus here only to name its source.)
* Built by `scripts/build_corpus.py`: `apt-get download {package}`,
  `dpkg-deb -x`, read the zText module through its verse index
  (`{{ot,nt}}.bz{{s,v,z}}`), cut books at the OSIS book markers, drop footnotes,
  cross-references, book introductions, front matter (preface) and back matter
  (glossary), turn paragraph / poetry / title tags into line breaks, remove the
  remaining tags.  Skipped: {skipped}.
* Format: UTF-8; one section per book (a line with the book's name, then one
  paragraph or poetry line per line); sections separated by a blank line.
  `books.json` lists each book's OSIS id, name, title and [start, end) character
  offsets into the decompressed text.
* Contents: {nbooks} books, {nchars} characters, {nbytes} bytes of UTF-8,
  sha256 `{sha}`.
* Compression: xz (LZMA2, preset 9e).

Rebuild (needs Debian/Ubuntu apt and network access to the archive):

    {rebuild}
"""


def write_outputs(out: Path, text: str, index: list[dict], deb: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    raw = text.encode("utf-8")
    (out / "web.txt.xz").write_bytes(
        lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=XZ_FILTERS))
    (out / "books.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    conf = (deb.parent / "x" / "usr/share/sword/mods.d/engWEB2015eb.conf").read_text("utf-8")
    modver = re.search(r"^Version=(.*)$", conf, re.M)
    skipped = "; ".join(f"{k} ({v})" for k, v in SKIPPED_BOOKS.items()) or "nothing"
    (out / "PROVENANCE.md").write_text(PROVENANCE.format(
        package=PACKAGE, version=deb_field(deb, "Version"),
        modver=modver.group(1).strip() if modver else "?", skipped=skipped,
        nbooks=len(index), nchars=len(text), nbytes=len(raw),
        sha=hashlib.sha256(raw).hexdigest(), rebuild=REBUILD), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deb", type=Path, help=f"use this {PACKAGE} .deb instead of downloading")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zerotrain-corpus-") as tmp:
        work = Path(tmp)
        deb = work / args.deb.name if args.deb else fetch_deb(work)
        if args.deb:
            deb.write_bytes(args.deb.read_bytes())
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True)
        books = build_books(work / "x" / MODULE_DIR)
        text, index = assemble(books)
        write_outputs(args.out, text, index, deb)
    print(f"{len(index)} books, {len(text):,} chars, {len(text.encode()):,} bytes -> "
          f"{args.out / 'web.txt.xz'} ({(args.out / 'web.txt.xz').stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
