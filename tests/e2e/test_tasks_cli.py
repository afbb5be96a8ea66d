"""``zerotrain ask | summarize | finetune | eval --task`` on a small run made in place: answers come
back, and each bad input (empty question, a document longer than the context, a run without a
tokenizer, an unknown task name) gets one clear message and exit status 2, never a traceback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from zerotrain.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run with options, tokenizer and a step-0 checkpoint of a 1-layer GPT (block 64)."""
    from zerotrain import checkpoint
    from zerotrain.data import load_corpus, train_tokenizer
    from zerotrain.data.corpus import join_books
    from zerotrain.distributed import Mesh
    from zerotrain.train.options import build_options
    from zerotrain.train.trainer import build_model
    root = tmp_path_factory.mktemp("tasks")
    books = load_corpus()
    (root / "corpus.txt").write_text(join_books([books.book(n) for n in ("Ruth", "Jonah", "Obadiah")]))
    opts = build_options(settings={"run.runs_dir": str(root / "runs"), "run.name": "r", "data.corpus": str(root / "corpus.txt"),
                                   "data.heldout_books": ["Jonah"], "data.vocab_size": 300, "model.n_layer": 1,
                                   "model.n_embd": 32, "model.n_head": 2, "model.block_size": 64,
                                   "parallel.stage": 0, "parallel.nproc": 1})
    opts.run_dir.mkdir(parents=True)
    (opts.run_dir / "options.json").write_text(opts.model_dump_json())
    tok = train_tokenizer([books.book("Ruth").text], 300)
    tok.save(opts.run_dir / "tokenizer.json")
    (opts.run_dir / "data").mkdir()
    model = build_model(opts, tok.vocab_size, Mesh.single())
    checkpoint.save(opts.run_dir / "checkpoints", model=model, step=0)
    bare = opts.run_dir.parent / "bare"
    bare.mkdir()
    shutil.copy(opts.run_dir / "options.json", bare / "options.json")
    (bare / "options.json").write_text(json.dumps({**json.loads(opts.model_dump_json()), "run": {"name": "bare"}}))
    return opts.run_dir


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Fine-tuning runs go to ./runs by default: never the repository's."""
    monkeypatch.chdir(tmp_path)


def test_ask_and_summarize_answer(run, capsys, tmp_path, monkeypatch):
    assert main(["ask", str(run), "What is the capital of Peru?", "Who was Kern?", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("Q: ") == 2 and out.count("A: ") == 2
    doc = tmp_path / "doc.txt"
    doc.write_text("Naomi went home.")
    monkeypatch.setattr("sys.stdin", open(doc))
    assert main(["summarize", str(run), "-", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().err == ""
    for beams in ("1", "3"):                                   # greedy and beam search, either command
        assert main(["ask", str(run), "Who was Kern?", "--max-new-tokens", "4", "--beams", beams]) == 0
        monkeypatch.setattr("sys.stdin", open(doc))
        assert main(["summarize", str(run), "-", "--max-new-tokens", "3", "--beams", beams,
                     "--length-penalty", "0.5"]) == 0
        assert capsys.readouterr().err == ""


def _long(tmp_path) -> str:
    path = tmp_path / "long.txt"
    path.write_text("Ruth said, Entreat me not to leave you. " * 20)
    return str(path)


BAD = [
    (lambda run, tmp: ["ask", str(run), "  "], "the question is empty; ask something"),
    (lambda run, tmp: ["summarize", str(run), _long(tmp)], "but the model's context is 64 tokens"),
    (lambda run, tmp: ["ask", str(run), "What is a dog?", "--passage", _long(tmp)], "with its passage takes"),
    (lambda run, tmp: ["ask", str(run.parent / "bare"), "What is a dog?"], "has no tokenizer.json"),
    (lambda run, tmp: ["finetune", str(run.parent / "bare")], "has no tokenizer.json"),
    (lambda run, tmp: ["finetune", str(run), "--tasks", "qa,summarise"],
     "unknown task 'summarise' in --tasks; did you mean 'summarize'?"),
    (lambda run, tmp: ["finetune", str(run), "--tasks", "qa", "--weights", "summarize=2"],
     "--weights names summarize, which --tasks qa does not train"),
    (lambda run, tmp: ["finetune", str(run), "--steps", "100", "--copy-steps", "1000"],
     "train.copy_steps=1000 leaves none of the 100 steps"),
    (lambda run, tmp: ["finetune", str(run), "--copy", "1.5"], "train.copy_share"),
    (lambda run, tmp: ["finetune", str(run), "--tasks", "qa"], "train.npy is missing; pass --copy-steps 0 --copy 0"),
    (lambda run, tmp: ["eval", str(run), "--task", "q&a"], "unknown task 'q&a' in --task"),
    (lambda run, tmp: ["summarize", str(run), str(tmp / "missing.txt")], "document file not found"),
    (lambda run, tmp: ["ask", str(run), "What is a dog?", "--beams", "0"], "--beams 0: must be >= 1 (1 is greedy)"),
    (lambda run, tmp: ["eval", str(run), "--task", "qa", "--length-penalty", "-1"], "--length-penalty -1.0: must be >= 0"),
]


@pytest.mark.parametrize("make,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_clear_message(run, make, message, capsys, tmp_path):
    assert main(make(run, tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("error:") == 1


def test_a_run_fine_tuned_from_one_base_is_not_continued_from_another(run, capsys, tmp_path):
    """The same run name from another base (here a copy elsewhere) is refused, not silently
    continued from the base it was started from."""
    other = tmp_path / "elsewhere" / run.name
    shutil.copytree(run, other)
    assert main(["finetune", str(run), "--tasks", "qa"]) == 2            # setup written, then no train.npy
    assert (tmp_path / "runs" / "r-ft" / "finetune.json").is_file()
    capsys.readouterr()
    assert main(["finetune", str(other), "--tasks", "qa"]) == 2
    err = capsys.readouterr().err
    assert f"was fine-tuned from {run.resolve()}" in err and "--fresh" in err and err.count("error:") == 1


def test_the_copy_head_is_kept_as_the_run_was_started(run, capsys, tmp_path):
    """A run started with the copy head (the default) is not resumed without it, and a run whose
    finetune.json predates the copy head reads as one without it."""
    from zerotrain.train.finetune_options import read_finetune
    assert main(["finetune", str(run), "--tasks", "qa", "--run-name", "c"]) == 2     # setup written
    run_dir = tmp_path / "runs" / "c"
    assert read_finetune(run_dir).train.copy_head
    assert json.loads((run_dir / "options.json").read_text())["model"]["copy_head"] is True
    capsys.readouterr()
    assert main(["finetune", str(run), "--tasks", "qa", "--run-name", "c", "--no-copy-head"]) == 2
    err = capsys.readouterr().err
    assert "was fine-tuned with a copy head" in err and "--fresh" in err and err.count("error:") == 1
    saved = json.loads((run_dir / "finetune.json").read_text())
    del saved["train"]["copy_head"]
    (run_dir / "finetune.json").write_text(json.dumps(saved))
    assert not read_finetune(run_dir).train.copy_head
