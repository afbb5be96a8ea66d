"""Fine-tuning tasks: the bundled QA facts and their prose, summarization pairs and their split,
prompt encoding with answer-only labels, the task mix, metrics, baselines and answer generation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zerotrain.data import train_tokenizer
from zerotrain.data.tasks import check_tasks, prompts, qa, summaries
from zerotrain.data.tasks.wordnet import clean_gloss, parse_data_line
from zerotrain.model import GPT, get_config
from zerotrain.train.answer import _finish, generate_answers
from zerotrain.train.finetune_data import COPY_SPAN, TaskMix, copy_example, prepare_copy_data


@pytest.fixture(scope="module")
def tokenizer():
    text = " ".join(f["prose"] + " " + f["question"] for f in qa.load_facts()[:3000])
    return train_tokenizer([text], 400)


def test_facts_are_full_sentences_and_split_by_subject():
    facts = qa.load_facts()
    assert len(facts) > 9000 and {f["kind"] for f in facts} >= {"capital", "definition", "antonym", "part"}
    assert all(qa.is_full_sentence(f["answer"], f["subject"]) for f in facts)
    splits = {}
    for f in facts:
        splits.setdefault(f["subject"].lower(), set()).add(f["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert 0.05 < sum(f["split"] == "test" for f in facts) / len(facts) < 0.15
    kabul = [f for f in facts if f["question"] == "What is the capital of Afghanistan?"]
    assert kabul and kabul[0]["answer"] == "The capital of Afghanistan is Kabul."


def test_pretraining_text_holds_every_fact_as_prose_never_as_a_question():
    from zerotrain.train.options import build_options
    from zerotrain.train.prepare import split_corpus
    train, held = split_corpus(build_options())
    text = "\n".join(b.text for b in train if b.name.startswith("WordNet facts"))
    lines = set(text.splitlines())
    assert all(f["prose"] in lines for f in qa.load_facts())
    assert "?" not in text and not any(b.name.startswith("WordNet") for b in held)
    plain, _ = split_corpus(build_options(settings={"data.facts": False}))
    assert not any(b.name.startswith("WordNet") for b in plain)


def test_examples_closed_book_and_with_passage():
    items = qa.examples("test")
    facts = [f for f in qa.load_facts() if f["split"] == "test"]
    assert len(items) == 2 * len(facts)
    with_passage = [e for e in items if e.passage]
    fact = {f["question"]: f for f in facts}
    assert all(fact[e.question]["prose"] in e.passage for e in with_passage)
    assert all(e.passage.count(". ") >= 1 for e in with_passage)          # distractors beside it
    assert items == qa.examples("test")                                   # seeded


def test_metrics():
    assert qa.normalize("The Capital, of Peru!") == ["capital", "of", "peru"]
    assert qa.exact_match("the capital of Peru is Lima", "The capital of Peru is Lima.") == 1.0
    assert qa.token_f1("capital of Peru is Cusco", "The capital of Peru is Lima.") == pytest.approx(0.8)
    assert qa.token_f1("", "Lima") == 0.0
    assert qa.is_full_sentence("The capital of Peru is Lima.", "Peru")
    assert not qa.is_full_sentence("Lima.", "Peru") and not qa.is_full_sentence("The capital of Chile is Lima.", "Peru")
    ex = [qa.QAExample("What is the capital of Peru?", "The capital of Peru is Lima.", "Peru", "capital")]
    assert qa.copy_question(ex) == ["What is the capital of Peru?"]
    gloss = qa.NearestGloss(["a city in Chile", "the capital and largest city of Peru", "a large body of water"])
    assert gloss(ex) == ["the capital and largest city of Peru"]


def test_wordnet_lines_and_glosses():
    line = ("08704237 15 n 02 Kabul 0 capital_of_Afghanistan 0 002 @i 08691669 n 0000 #p 08703454 n 0000 "
            "| the capital and largest city of Afghanistan; located in eastern Afghanistan  ")
    s = parse_data_line(line, "n")
    assert (s.key, s.lemmas, s.pointers) == ("n08704237", ("Kabul", "capital of Afghanistan"),
                                             (("@i", "n08691669"), ("#p", "n08703454")))
    assert clean_gloss(s.gloss) == "the capital and largest city of Afghanistan"
    assert clean_gloss('a dog (not a cat); "a good dog"') == "a dog"
    assert clean_gloss("x") is None


def test_debian_pairs_split_by_family(tmp_path):
    packages, translations = [], []
    for i, (pkg, src) in enumerate([("gcc-12", "gcc-12"), ("gcc-13", "gcc-13"), ("libfoo1", "foo"),
                                    ("libfoo-dev", "foo"), ("bar", None)] * 1):
        packages.append(f"Package: {pkg}\n" + (f"Source: {src} (1.0)\n" if src else "") + "Version: 1\n")
        translations.append(f"Package: {pkg}\nDescription-md5: {i}\nDescription-en: summary of {pkg}\n"
                            f" {pkg} is a package with a long description of what it does.\n .\n"
                            " A second paragraph says more.\n")
    (tmp_path / "x_binary-amd64_Packages").write_text("\n".join(packages))
    (tmp_path / "x_i18n_Translation-en").write_text("\n".join(translations))
    pairs = summaries.debian_pairs(str(tmp_path))
    assert [p["family"] for p in pairs] == ["debian:gcc", "debian:gcc", "debian:foo", "debian:foo", "debian:bar"]
    assert pairs[0]["summary"] == "summary of gcc-12"
    assert pairs[0]["document"] == ("gcc-12 is a package with a long description of what it does.\n"
                                    "A second paragraph says more.")
    built = summaries.build_pairs(["debian"], lists_dir=str(tmp_path))
    by_family = {}
    for p in built:
        by_family.setdefault(p["family"], set()).add(p["split"])
    assert all(len(s) == 1 for s in by_family.values())
    assert built == summaries.build_pairs(["debian"], lists_dir=str(tmp_path))


def test_docstring_pairs(tmp_path):
    (tmp_path / "mod.py").write_text('def f():\n    """Add two numbers together.\n\n    The numbers are read '
                                     'from the arguments and their sum\n    is returned to the caller."""\n')
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text('"""Skipped module docstring here.\n\nbecause tests are left out of it."""')
    pairs = summaries.docstring_pairs(str(tmp_path))
    assert pairs == [{"source": "docstrings", "family": "docstrings:mod", "name": "mod.f",
                      "summary": "Add two numbers together.",
                      "document": "The numbers are read from the arguments and their sum is returned to the caller."}]
    doc = "Alpha beta gamma. Delta epsilon."
    assert summaries.first_sentence(doc) == "Alpha beta gamma." and summaries.lead_words(doc, 2) == "Alpha beta"
    assert summaries.rouge(["alpha beta"], ["alpha beta"])["rougeL"] == pytest.approx(1.0)


def test_encoding_masks_the_prompt(tokenizer):
    pairs = [(prompts.qa_prompt("What is a dog?"), prompts.target_text("A dog is an animal.")),
             (prompts.qa_prompt("What is a cat?", "A cat is a pet. " * 40), prompts.target_text("A cat is a pet."))]
    enc, dropped = prompts.encode_pairs(tokenizer, pairs, block_size=48)
    assert (len(enc), dropped) == (1, 1)
    ids, plen = enc.example(0)
    assert tokenizer.decode(ids[:plen]) == "Question: What is a dog?\nAnswer:"
    assert tokenizer.decode(ids[plen:]) == " A dog is an animal.<|endoftext|>"
    x, y = prompts.pad_batch([(ids, plen)], length=len(ids) + 2, pad_id=0)
    assert (y[0, :plen - 1] == -100).all() and (y[0, len(ids) - 1:] == -100).all()
    assert y[0, plen - 1:len(ids) - 1].tolist() == ids[plen:].tolist()
    assert x[0, :len(ids) - 1].tolist() == ids[:-1].tolist()


def test_task_mix_is_a_function_of_the_step_and_ranks_split_it(tokenizer):
    enc = [prompts.encode_pairs(tokenizer, [(prompts.qa_prompt(f"What is {w}?"), f" {w} is {w}.") for w in words],
                                block_size=64)[0] for words in (["a", "bb", "ccc"], ["dddd", "eeeee"])]
    mix = TaskMix(enc, [0.5, 0.5], seed=3, pad_id=0)
    x, y, n = mix.batch(5, batch_size=4, dp_rank=0, dp_size=1)
    parts = [mix.batch(5, batch_size=4, dp_rank=r, dp_size=2) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert parts[0][2] == parts[1][2] == n == int((y != -100).sum())
    again = TaskMix(enc, [0.5, 0.5], seed=3, pad_id=0).batch(5, batch_size=4, dp_rank=0, dp_size=1)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)


def test_copying_exercises_repeat_a_span_and_label_the_repeat(tokenizer):
    text = np.arange(1000, 1400, dtype=np.uint16)                  # every token distinct
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids, plen = copy_example(text, rng)
        n = plen - 1
        assert COPY_SPAN[0] <= n <= COPY_SPAN[1] and len(ids) == 2 * n
        assert (ids[:n] == ids[n:]).all() and (np.diff(ids[:n]) == 1).all() and ids[0] in text
        x, y = prompts.pad_batch([(ids, plen)], length=len(ids) - 1, pad_id=0)
        assert y[0].tolist() == [-100] * n + ids[n + 1:].tolist()    # the repeat, from its second token
    enc = [prompts.encode_pairs(tokenizer, [(prompts.qa_prompt(f"What is {w}?"), f" {w} is {w}.") for w in words],
                                block_size=64)[0] for words in (["a", "bb", "ccc"], ["dddd", "eeeee"])]
    plain = TaskMix(enc, [0.5, 0.5], seed=3, pad_id=0)
    off = TaskMix(enc, [0.5, 0.5], seed=3, pad_id=0, copy_text=text, copy_share=0.0)
    mixed = TaskMix(enc, [0.5, 0.5], seed=3, pad_id=0, copy_text=text, copy_share=0.25)
    for step in range(3):
        assert all(torch.equal(a, b) for a, b in zip(plain.batch(step, batch_size=8, dp_rank=0, dp_size=1)[:2],
                                                     off.batch(step, batch_size=8, dp_rank=0, dp_size=1)[:2]))
    warm = TaskMix(enc, [0.5, 0.5], seed=3, pad_id=0, copy_text=text, copy_share=0.25, copy_steps=2)
    assert all(int(ids[0]) >= 1000 for step in range(2) for ids, _ in warm.rows(step, 8))   # exercises only
    assert all(torch.equal(a, b) for a, b in zip(warm.batch(2, batch_size=8, dp_rank=0, dp_size=1)[:2],
                                                 mixed.batch(2, batch_size=8, dp_rank=0, dp_size=1)[:2]))
    rows = [r for step in range(40) for r in mixed.rows(step, 8)]
    share = sum(int(ids[0]) >= 1000 for ids, _ in rows) / len(rows)
    assert 0.15 < share < 0.35
    assert all(torch.equal(a, b) for a, b in zip(mixed.batch(7, batch_size=8, dp_rank=0, dp_size=1)[:2],
                                                 mixed.batch(7, batch_size=8, dp_rank=0, dp_size=1)[:2]))


def test_copy_data_comes_from_the_base_run(tmp_path):
    base, run = tmp_path / "base", tmp_path / "run"
    with pytest.raises(ValueError, match="train.npy is missing; pass --copy-steps 0 --copy 0"):
        prepare_copy_data(run, base)
    (base / "data").mkdir(parents=True)
    np.save(base / "data" / "train.npy", np.arange(50, dtype=np.uint16))
    prepare_copy_data(run, base)
    assert np.load(run / "data" / "copy.npy").tolist() == list(range(50))


def test_finish_stops_at_the_sentence_end():
    assert _finish(" The capital is Kabul. And more", sentence=True) == (" The capital is Kabul.", True)
    assert _finish("\n A line\nnext", sentence=False) == ("\n A line", True)
    assert _finish(" x<|endoftext|> y", sentence=False) == (" x", True)
    assert _finish(" 3.5 is not", sentence=True) == (" 3.5 is not", False)


def test_batched_answers_equal_one_by_one_and_uncached_greedy(tokenizer):
    from zerotrain.model import generate
    torch.manual_seed(0)
    model = GPT(get_config("tiny", vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=32, n_head=2, block_size=64))
    texts = ["Question: What is a dog?\nAnswer:", "Question: What is a cat?\nAnswer:",
             "Question: Who was Kern?\nAnswer:"]
    for no_repeat in (3, 0):
        batched = generate_answers(model, tokenizer, texts, sentence=True, max_new_tokens=12, no_repeat=no_repeat)
        single = [generate_answers(model, tokenizer, [t], sentence=True, max_new_tokens=12, no_repeat=no_repeat)[0]
                  for t in texts]
        assert batched == single
    ids = tokenizer.encode(texts[0])
    out = generate(model, torch.tensor([ids]), 12, greedy=True, use_cache=False)
    plain = tokenizer.decode(out[0, len(ids):].tolist())
    assert plain.strip().startswith(batched[0]) or _finish(plain, sentence=True)[0].strip() == batched[0]


def test_no_generated_ngram_repeats(tokenizer):
    """A random model loops under plain greedy decoding; with no_repeat=n no generated n-gram occurs
    twice, while an n-gram of the prompt may still be generated once."""
    from zerotrain.train.answer import Stopper, decode_tokens, repeating_tokens
    torch.manual_seed(0)
    model = GPT(get_config("tiny", vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=16, n_head=2, block_size=96))
    stopper = Stopper(tokenizer)
    stopper.may_stop[:] = False                                      # run every row to max_new
    ids = [tokenizer.encode("Document: the cat sat on the mat\nSummary:"), tokenizer.encode("Document: a dog is\nSum:")]
    ids[1] = ids[1][:len(ids[0])] + [0] * (len(ids[0]) - len(ids[1]))  # same length: one batch

    def repeats(tokens, n):
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        return len(grams) - len(set(grams))
    plain = decode_tokens(model, ids, max_new=40, stopper=stopper, sentence=False, no_repeat=0)
    assert all(repeats(t, 3) > 0 for t in plain)                        # plain greedy repeats itself
    for n in (2, 3):
        out = decode_tokens(model, ids, max_new=40, stopper=stopper, sentence=False, no_repeat=n)
        assert all(len(t) == 40 and repeats(t, n) == 0 for t in out), n
    assert repeating_tokens([5, 6, 7, 5, 6], 3) == [7]                 # (5, 6) was followed by 7
    assert repeating_tokens([5, 6, 7, 5, 6], 0) == [] and repeating_tokens([5], 3) == []
    assert sorted(repeating_tokens([1, 2, 1, 3, 1], 2)) == [2, 3]


def _reference_beam(model, ids, *, beams, max_new, stopper, sentence, no_repeat, length_penalty):
    """Beam search written plainly: every step recomputes each hypothesis from its whole sequence
    (no KV cache), one prompt at a time."""
    from zerotrain.train.answer import repeating_tokens
    live, done = [(0.0, [])], []
    for _ in range(max_new):
        cand = []
        for s, g in live:
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids + g]))[0, -1].float(), -1)
            logp[repeating_tokens(g, no_repeat)] = float("-inf")
            cand += [(s + v, g + [i]) for v, i in zip(*map(torch.Tensor.tolist, logp.topk(2 * beams)))]
        cand.sort(key=lambda c: -c[0])
        live = []
        for s, g in cand[:2 * beams]:
            if len(live) == beams or s == float("-inf"):
                break
            if stopper.may_stop[g[-1]] and _finish(stopper.tokenizer.decode(g), sentence=sentence)[1]:
                done.append((s / len(g) ** length_penalty, g))
            else:
                live.append((s, g))
        if len(done) >= beams or not live:
            break
    pool = done or [(s / len(g) ** length_penalty, g) for s, g in live]
    return max(pool, key=lambda c: c[0])[1]


def test_beam_search_equals_plain_beam_search_and_greedy_at_one_beam(tokenizer):
    """Batched beam search over one reordered KV cache gives, per prompt, the hypothesis a plain
    uncached beam search finds; one beam is greedy decoding."""
    from zerotrain.train.answer import Stopper, beam_tokens, decode_tokens
    torch.manual_seed(0)
    model = GPT(get_config("tiny", vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=32, n_head=2, block_size=96))
    model.eval()
    stopper = Stopper(tokenizer)
    texts = ["Question: What is a dog?\nAnswer:", "Question: What is a cat?\nAnswer:",
             "Question: Who was Kern?\nAnswer:"]
    ids = [tokenizer.encode(t) for t in texts]
    width = min(map(len, ids))
    ids = [i[:width] for i in ids]                                        # one batch: equal lengths
    for sentence, no_repeat in ((True, 3), (False, 2)):
        greedy = decode_tokens(model, ids, max_new=24, stopper=stopper, sentence=sentence, no_repeat=no_repeat)
        one = beam_tokens(model, ids, beams=1, max_new=24, stopper=stopper, sentence=sentence, no_repeat=no_repeat)
        assert one == greedy
        for beams, lp in ((3, 1.0), (4, 0.5)):
            got = beam_tokens(model, ids, beams=beams, max_new=24, stopper=stopper, sentence=sentence,
                              no_repeat=no_repeat, length_penalty=lp)
            want = [_reference_beam(model, i, beams=beams, max_new=24, stopper=stopper, sentence=sentence,
                                    no_repeat=no_repeat, length_penalty=lp) for i in ids]
            assert got == want, (beams, lp)
            assert got != greedy                         # the search finds other answers than greedy
    with pytest.raises(ValueError, match="beams must be a positive int"):
        generate_answers(model, tokenizer, texts[:1], sentence=True, beams=0)


def test_task_names():
    assert check_tasks("qa,summarize") == ["qa", "summarize"]
    with pytest.raises(ValueError, match="unknown task 'summarise' in --tasks; did you mean 'summarize'"):
        check_tasks("qa,summarise")
    with pytest.raises(ValueError, match="names no task"):
        check_tasks("")
    with pytest.raises(ValueError, match="named twice"):
        check_tasks(["qa", "qa"])


def _script(name: str):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_bootstrap_interval():
    interval = _script("paired_eval").paired_interval
    assert interval([0.5, 0.2, 0.9], [0.5, 0.2, 0.9]) == (0.0, 0.0, 0.0)
    assert interval([1.0, 2.0, 3.0, 7.0], [0.75, 1.75, 2.75, 6.75]) == pytest.approx((0.25, 0.25, 0.25))
    mean, low, high = interval([1, 0, 1, 1, 0, 1, 1, 1] * 25, [0] * 200)
    assert mean == pytest.approx(0.75) and 0.65 < low < 0.75 < high < 0.85
    with pytest.raises(ValueError, match="equal, non-empty"):
        interval([], [])


def test_subject_tokens_script_finds_the_subject_as_the_answer_writes_it():
    module = _script("subject_tokens")

    class Chars:                        # one token per character
        def encode(self, text):
            return [ord(c) for c in text]

    tok = Chars()
    answer = tok.encode(" A windowsill is the sill of a window.")
    assert module.subject_span(answer, tok, "windowsill") == range(2, 13)      # " windowsill"
    capital = tok.encode(" Magdalena is part of Colombia.")
    assert module.subject_span(capital, tok, "magdalena") == range(0, 10)     # capitalised form
    assert module.subject_span(answer, tok, "doorsill") is None
