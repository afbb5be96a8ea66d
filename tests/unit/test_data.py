"""Tests for zerotrain.data: corpus asset, split, tokenizer, token files, batches, evaluation."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from zerotrain.data import (DEFAULT_HELDOUT_BOOKS, ClozePassage, TokenDataset, batches,
                            build_cloze, build_token_file, cloze_accuracy, eval_windows,
                            evaluate_lm, lm_metrics, load_corpus, load_tokenizer, parse_corpus,
                            split, split_books, train_tokenizer, unigram_cloze_baseline,
                            unigram_perplexity)
from zerotrain.data import corpus as corpus_mod
from zerotrain.data.cloze import STOPWORDS

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("build_corpus", ROOT / "scripts/build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def small(corpus):
    """(tokenizer, train slice, held-out text): a fast tokenizer trained on ~300 KB."""
    train_text, test_text = split(corpus)
    sample = train_text[:300_000]
    return train_tokenizer(sample.split("\n"), 1024), sample, test_text


# --------------------------------------------------------------------------- corpus
def test_bundled_corpus_contents(corpus):
    assert len(corpus.books) == 80
    assert corpus.names[0] == "Genesis" and corpus.names[-1] == "Revelation"
    assert {"Psalms", "Tobit", "Sirach", "Matthew", "Jude"} <= set(corpus.names)
    assert "Daniel (Greek)" not in corpus.names  # skipped: duplicates Daniel
    text = corpus.text
    assert 4_500_000 < len(text.encode("utf-8")) < 5_000_000
    assert not re.search(r"[<>&\x00]", text)
    assert "\n\n\n" not in text and all("\n\n" not in b.text for b in corpus.books)
    assert corpus.book("Genesis").text.startswith("In the beginning, God created the heavens")
    assert corpus.book("Revelation").text.endswith("be with all the saints. Amen.")


def test_books_json_matches_text(corpus):
    index = json.loads((corpus_mod.default_corpus_path().parent / "books.json").read_text("utf-8"))
    assert [entry["name"] for entry in index] == corpus.names
    text = corpus.text
    for entry, book in zip(index, corpus.books):
        assert text[entry["start"]:entry["end"]] == book.section


def test_missing_corpus_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="corpus file not found: .*nope.txt"):
        load_corpus(tmp_path / "nope.txt")
    monkeypatch.setattr(corpus_mod, "default_corpus_path", lambda: tmp_path / "web.txt.xz")
    with pytest.raises(FileNotFoundError, match=r"python scripts/build_corpus.py"):
        load_corpus()


def test_parse_corpus_format():
    parsed = parse_corpus("Alpha\nline one\nline two\n\nBeta\nthird\n")
    assert [(b.name, b.text) for b in parsed.books] == [("Alpha", "line one\nline two"),
                                                       ("Beta", "third")]
    with pytest.raises(ValueError, match="appears twice"):
        parse_corpus("A\nx\n\nA\ny")
    with pytest.raises(ValueError, match="section 2"):
        parse_corpus("A\nx\n\nB")


def test_split_holds_out_whole_books(corpus):
    train_text, test_text = split(corpus)
    train_books, test_books = split_books(corpus)
    assert [b.name for b in test_books] == [n for n in corpus.names if n in DEFAULT_HELDOUT_BOOKS]
    assert len(test_books) == len(DEFAULT_HELDOUT_BOOKS)
    assert not {b.name for b in train_books} & {b.name for b in test_books}
    assert len(train_books) + len(test_books) == len(corpus.books)
    assert test_text == "\n\n".join(b.section for b in test_books)
    for book in test_books:
        assert book.section in test_text and book.text not in train_text
    share = len(test_text) / (len(train_text) + len(test_text))
    assert 0.05 < share < 0.08
    with pytest.raises(ValueError, match=r"heldout_books=\['Narnia'\]"):
        split(corpus, ["Narnia"])


# --------------------------------------------------------------------------- build script
def test_markup_to_text_drops_notes_and_breaks_blocks():
    script = _load_script()
    osis = ('<title type="main">The Book</title><div sID="i1" type="introduction"/>Intro.'
            '<div eID="i1" type="introduction"/><div sID="p1" type="x-p"/><w lemma="x">God</w>'
            '<note placement="foot">fn</note><w>created</w> light<note>n</note>. '
            '<l level="1" sID="l1"/>A &amp; B<l eID="l1"/><lb type="x-p"/>“<note>z</note>Yes”')
    assert script.markup_to_text(osis) == "God created light.\nA & B\n“Yes”"


def test_read_testament_recovers_long_entries(tmp_path):
    script = _load_script()
    first, second = b"x" * 70_000, "second é".encode()
    block = first + second
    packed = zlib.compress(block)
    (tmp_path / "ot.bzz").write_bytes(packed)
    (tmp_path / "ot.bzs").write_bytes(struct.pack("<III", 0, len(packed), len(block)))
    records = [(0, 0, 0), (0, 0, len(first) % 65536), (0, len(first), len(second)),
               (0, len(first), len(second))]  # the last one is a linked (repeated) verse
    (tmp_path / "ot.bzv").write_bytes(b"".join(struct.pack("<IIH", *r) for r in records))
    assert script.read_testament(tmp_path, "ot") == ["x" * 70_000, "second é"]


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_roundtrip_and_bytes(small, tmp_path):
    tok, _, test_text = small
    assert tok.vocab_size == 1024 and tok.eot_id == 0
    for text in (test_text[:50_000], "tab\there\n\n\nemoji 🙂 ‘quotes’ — ünïcode  x"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.num_bytes(ids) == len(text.encode("utf-8"))
    assert tok.encode("a<|endoftext|>b")[1] == tok.eot_id
    loaded = load_tokenizer(tok.save(tmp_path / "tok.json"))
    assert loaded.to_str() == tok.to_str()
    assert loaded.encode(test_text[:5000]) == tok.encode(test_text[:5000])


def test_tokenizer_is_deterministic(small):
    tok, sample, _ = small
    again = train_tokenizer(sample.split("\n"), 1024)
    assert again.to_str() == tok.to_str()
    other = train_tokenizer(sample[:100_000].split("\n"), 1024)
    assert other.to_str() != tok.to_str()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 .* use vocab_size >= 257"):
        train_tokenizer(["abc"], 100)
    with pytest.raises(ValueError, match="must include '<|endoftext|>'"):
        train_tokenizer(["abc"], 300, special=("<pad>",))
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")


# --------------------------------------------------------------------------- token files
def _arange_dataset(tmp_path, n=1000, block=16):
    np.save(tmp_path / "ar.npy", np.arange(n, dtype=np.uint16))
    return TokenDataset(tmp_path / "ar.npy", block)


def test_build_token_file(small, tmp_path):
    tok, _, test_text = small
    docs = [test_text[:2000], test_text[2000:4000]]
    path = build_token_file(tok, docs, tmp_path / "t.npy")
    arr = np.load(path, mmap_mode="r")
    assert arr.dtype == np.uint16
    assert arr.tolist() == tok.encode(docs[0]) + [tok.eot_id] + tok.encode(docs[1])
    with pytest.raises(ValueError, match="block_size=100000 needs at least"):
        TokenDataset(path, 100_000)


def test_batches_global_view_is_rank_independent(tmp_path):
    ds = _arange_dataset(tmp_path)
    args = dict(batch_size=8, block_size=16, seed=3, step=5)
    x1, y1 = batches(ds, **args)
    assert x1.shape == (8, 16) and x1.dtype == torch.long
    for dp in (2, 4):
        parts = [batches(ds, **args, dp_rank=r, dp_size=dp) for r in range(dp)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x1)
        assert torch.equal(torch.cat([p[1] for p in parts]), y1)
    assert torch.equal(y1, x1 + 1)  # the file is arange: y is x shifted by one
    assert torch.equal(x1 - x1[:, :1], torch.arange(16).expand(8, 16))
    assert int(x1[:, 0].max()) <= 1000 - 16 - 1
    assert torch.equal(batches(ds, **args)[0], x1)
    assert not torch.equal(batches(ds, **{**args, "step": 6})[0], x1)
    assert not torch.equal(batches(ds, **{**args, "seed": 4})[0], x1)
    with pytest.raises(ValueError, match="global batch_size=6 is not a positive multiple of "
                                         "dp_size=4"):
        batches(ds, batch_size=6, seed=0, step=0, dp_rank=0, dp_size=4)


def test_eval_windows_cover_file_in_order(tmp_path):
    ds = _arange_dataset(tmp_path, n=100, block=16)
    xs, ys = zip(*eval_windows(ds, batch_size=4))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (6, 16)  # (100 - 1) // 16 windows
    assert torch.equal(x.flatten(), torch.arange(96)) and torch.equal(y.flatten(), torch.arange(1, 97))
    assert sum(b[0].shape[0] for b in eval_windows(ds, max_windows=2)) == 2


# --------------------------------------------------------------------------- cloze
@pytest.fixture(scope="module")
def passages(small):
    tok, _, test_text = small
    return build_cloze(test_text, tok, n=60, seed=1)


def test_cloze_passages(small, passages):
    tok, _, test_text = small
    assert len(passages) == 60
    for p in passages:
        assert re.fullmatch(r"[A-Za-z]{3,}", p.target) and p.target.lower() not in STOPWORDS
        assert re.search(rf"\b{p.target}\b", p.context)
        assert 40 <= len(p.context.split()) <= 80
        assert f"{p.context} {p.target}" in test_text
        assert list(p.context_ids) == tok.encode(p.context)
        assert list(p.target_ids) == tok.encode(" " + p.target)
        assert tok.encode(f"{p.context} {p.target}") == list(p.context_ids + p.target_ids)
    assert build_cloze(test_text, tok, n=60, seed=1) == passages
    assert build_cloze(test_text, tok, n=60, seed=2) != passages


def _oracle(passages, vocab, *, miss_last=False):
    """logits_fn that knows every passage; optionally wrong on multi-token targets' last token."""
    table = {}
    for p in passages:
        seq = list(p.context_ids + p.target_ids)
        table[tuple(seq[:-1])] = (seq[1:], len(p.target_ids))

    def logits_fn(idx):
        nxt, n_target = table[tuple(idx[0].tolist())]
        logits = torch.zeros(1, idx.shape[1], vocab)
        logits[0, torch.arange(idx.shape[1]), torch.tensor(nxt)] = 5.0
        if miss_last and n_target > 1:
            logits[0, -1, (nxt[-1] + 1) % vocab] = 9.0
        return logits
    return logits_fn


def test_cloze_accuracy(small, passages):
    tok, _, _ = small
    V = tok.vocab_size
    assert cloze_accuracy(_oracle(passages, V), tok, passages, max_len=256) == 1.0
    single = sum(len(p.target_ids) == 1 for p in passages) / len(passages)
    assert 0 < single < 1
    assert cloze_accuracy(_oracle(passages, V, miss_last=True), tok, passages,
                          max_len=256) == pytest.approx(single)
    uniform = lambda idx: torch.zeros(1, idx.shape[1], V)  # noqa: E731
    assert cloze_accuracy(uniform, tok, passages, max_len=256) == 0.0
    seen = []
    cloze_accuracy(lambda idx: seen.append(idx.shape[1]) or uniform(idx), tok, passages[:5],
                   max_len=20)
    assert max(seen) == 20


def test_unigram_cloze_baseline():
    def passage(context, target):
        return ClozePassage(context, target, (), ())
    train = "lamb lamb lamb goat goat wolf the the the the"
    ps = [passage("the lamb and the goat saw the", "lamb"),
          passage("a goat met a wolf, the wolf", "wolf"),
          passage("zebra yak", "yak")]  # unseen words tie at 0: alphabetical -> "yak"
    assert unigram_cloze_baseline(train, ps) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- LM metrics
def test_lm_metrics_hand_case():
    m = lm_metrics(total_nll=80 * math.log(2), num_tokens=20, num_bytes=40)
    assert m["loss"] == pytest.approx(4 * math.log(2))
    assert m["perplexity"] == pytest.approx(16.0)
    assert m["bits_per_byte"] == pytest.approx(2.0)


def test_evaluate_lm_known_losses(small, tmp_path):
    tok, _, _ = small
    V, block = tok.vocab_size, 8
    text = "The quick brown fox jumps over the lazy dog. " * 30  # ASCII: bytes decode cleanly
    path = build_token_file(tok, text, tmp_path / "e.npy")
    ids = np.load(path).tolist()
    windows = (len(ids) - 1) // block
    targets = ids[1:windows * block + 1]
    nbytes = len(tok.decode(targets).encode("utf-8"))
    uniform = evaluate_lm(lambda x: torch.zeros(*x.shape, V), path, block, tokenizer=tok)
    assert uniform["loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert uniform["bits_per_byte"] == pytest.approx(len(targets) * math.log2(V) / nbytes, rel=1e-6)
    nxt = {tuple(ids[i:i + block]): ids[i + 1:i + block + 1] for i in range(0, len(ids) - block)}

    def peaked(x):  # logit 3 on the true next token: loss = log(1 + (V - 1) e^-3)
        logits = torch.zeros(*x.shape, V)
        for r, row in enumerate(x.tolist()):
            logits[r, torch.arange(block), torch.tensor(nxt[tuple(row)])] = 3.0
        return logits
    got = evaluate_lm(peaked, path, block, tokenizer=tok, max_windows=3, batch_size=2)
    assert got["tokens"] == 3 * block
    assert got["loss"] == pytest.approx(math.log(1 + (V - 1) * math.exp(-3)), rel=1e-5)


def test_unigram_perplexity_hand_case():
    m = unigram_perplexity([0, 0, 1], [0, 2], 3)  # p = (c + 1) / (3 + 3): p0 = 1/2, p2 = 1/6
    assert m["loss"] == pytest.approx((math.log(2) + math.log(6)) / 2)
    assert m["perplexity"] == pytest.approx(math.sqrt(12))
    with pytest.raises(ValueError, match="outside"):
        unigram_perplexity([0, 5], [0], 3)
