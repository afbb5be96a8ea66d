#!/usr/bin/env python3
"""Rebuild zerotrain's question-answering facts from Debian's ``wordnet-base`` (WordNet 3.0).

Downloads the .deb (``apt-get download``, no install), unpacks it with ``dpkg-deb -x`` and writes
``zerotrain/data/assets/wordnet_qa.jsonl.xz``: one JSON object per fact (kind, subject, question,
full-sentence answer, prose sentence, gloss, split), plus ``WORDNET_LICENSE`` (the licence that must
travel with the data). The output depends only on the package contents: reruns are byte-identical.

    python scripts/build_qa.py [--deb PATH] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import lzma
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from zerotrain.data.tasks.wordnet import build_facts  # noqa: E402

PACKAGE = "wordnet-base"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "zerotrain" / "data" / "assets"
XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def fetch_deb(workdir: Path) -> Path:
    if subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir).returncode != 0:
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True)
    return sorted(workdir.glob(f"{PACKAGE}_*.deb"))[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deb", type=Path, help="a wordnet-base .deb already downloaded")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deb = args.deb or fetch_deb(tmp)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True)
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        facts = build_facts(tmp / "x/usr/share/wordnet")
        licence = (tmp / "x/usr/share/doc/wordnet-base/copyright").read_text(encoding="utf-8")
    lines = "".join(json.dumps(f, ensure_ascii=False, sort_keys=True) + "\n" for f in facts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wordnet_qa.jsonl.xz").write_bytes(lzma.compress(lines.encode("utf-8"), filters=XZ_FILTERS))
    start = licence.index("License: WordNet3.0")
    end = licence.index("Files: debian/*")
    (args.out / "WORDNET_LICENSE").write_text(f"WordNet 3.0 (Debian {PACKAGE} {version})\n\n"
                                              + licence[start:end].strip() + "\n", encoding="utf-8")
    print(f"{len(facts)} facts from {PACKAGE} {version} -> {args.out / 'wordnet_qa.jsonl.xz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
