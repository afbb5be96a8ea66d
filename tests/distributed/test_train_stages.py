"""The trainer gives the same run at every ZeRO stage, and a resumed run continues it exactly.

Two ranks run ``zerotrain.train.trainer.train`` in-process on a small corpus (two books to train
on, two held out) with a 2-layer, 64-wide GPT, block 32, a 512-token tokenizer, 8 steps, fp32:

* stages 0, 1, 2 and 3 log the same loss at every step (within 1e-5) and the same held-out loss;
* a stage-3 run stopped after 5 steps (as Ctrl-C would) saves a checkpoint; starting it again
  resumes at step 5 and its steps 6-8 repeat the uninterrupted run's losses;
* samples are generated in lockstep, so both ranks print the same text;
* with tensor parallelism (tp=2, one replica) at stages 0 and 3 the losses are the same again.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from harness import spawn

from zerotrain.data import load_corpus
from zerotrain.data.corpus import join_books
from zerotrain.train.options import build_options
from zerotrain.train.prepare import prepare_data

STEPS = 8
STOP_AFTER = 5


def small_corpus(path: Path) -> Path:
    corpus = load_corpus()
    books = [corpus.book(name) for name in ("Genesis", "Ruth", "Jonah", "Mark")]
    path.write_text(join_books(books), encoding="utf-8")
    return path


def options(root: str, corpus: str, name: str, stage: int, *, tp: int = 1):
    return build_options(settings={"parallel.tp": tp,
        "run.runs_dir": root, "run.name": name, "data.corpus": corpus, "data.heldout_books": ["Ruth", "Jonah"],
        "data.vocab_size": 512, "model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4,
        "model.block_size": 32, "parallel.stage": stage, "parallel.nproc": 2, "train.steps": STEPS,
        "train.batch_size": 8, "optim.warmup": 2, "train.eval_interval": 4, "train.eval_windows": 6,
        "train.ckpt_interval": 0, "train.cloze_passages": 6, "train.sample_tokens": 8})


class StopAfter:
    """A stop flag that is on when step ``n`` reads it (what Ctrl-C does, on cue)."""

    def __init__(self, n: int):
        self.n, self.reads = n, 0

    @property
    def requested(self) -> bool:
        self.reads += 1
        return self.reads >= self.n


def run_cases(mesh, root: str, corpus: str):
    from zerotrain.train.trainer import train
    out = {}
    for stage in (0, 1, 2, 3):
        state = train(mesh, options(root, corpus, f"s{stage}", stage), tensorboard=False)
        out[f"s{stage}"] = {"losses": state.losses, "heldout": state.results["model"]["loss"],
                            "samples": state.results["samples"]}
    opts = options(root, corpus, "resume", 3)
    first = train(mesh, opts, stop=StopAfter(STOP_AFTER), tensorboard=False)
    second = train(mesh, opts, tensorboard=False)
    out["resume"] = {"first": (first.step, first.interrupted, first.losses, first.results),
                     "second": (second.losses, second.results["model"]["loss"])}
    return out


def run_tp_cases(mesh, root: str, corpus: str):
    from zerotrain.train.trainer import train
    out = {}
    for stage in (0, 3):
        state = train(mesh, options(root, corpus, f"tp-s{stage}", stage, tp=2), tensorboard=False)
        out[f"tp-s{stage}"] = {"losses": state.losses, "heldout": state.results["model"]["loss"],
                               "samples": state.results["samples"]}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    corpus = small_corpus(root / "corpus.txt")
    cases = (("s0", 0, 1), ("s1", 1, 1), ("s2", 2, 1), ("s3", 3, 1), ("resume", 3, 1), ("tp-s0", 0, 2),
             ("tp-s3", 3, 2))
    for name, stage, tp in cases:
        prepare_data(options(str(root), str(corpus), name, stage, tp=tp))
    dp = spawn(run_cases, 2, str(root), str(corpus), timeout=400)
    tp = spawn(run_tp_cases, 2, str(root), str(corpus), tp=2, timeout=400)
    return [{**a, **b} for a, b in zip(dp, tp)]


def test_every_stage_trains_the_same_losses(results):
    ref = results[0]["s0"]["losses"]
    assert len(ref) == STEPS and ref[-1] < ref[0] - 0.3          # it does learn
    for case in ("s1", "s2", "s3", "tp-s0", "tp-s3"):
        got = results[0][case]["losses"]
        assert got == pytest.approx(ref, abs=1e-5, rel=0), case
        assert results[0][case]["heldout"] == pytest.approx(results[0]["s0"]["heldout"], abs=1e-5), case


def test_ranks_agree_on_losses_and_samples(results):
    for case in ("s0", "s3", "tp-s3"):
        assert results[0][case]["losses"] == results[1][case]["losses"]
        assert results[0][case]["samples"] == results[1][case]["samples"]
        assert all(len(text) > len(prompt) for prompt, text in results[0][case]["samples"].items())


def test_stopped_run_saves_and_resumes_where_it_stopped(results):
    step, interrupted, losses, final = results[0]["resume"]["first"]
    assert (step, interrupted, final) == (STOP_AFTER, True, None)
    ref = results[0]["s3"]["losses"]
    assert losses == pytest.approx(ref[:STOP_AFTER], abs=1e-6, rel=0)
    later, heldout = results[0]["resume"]["second"]
    assert len(later) == STEPS - STOP_AFTER
    assert later == pytest.approx(ref[STOP_AFTER:], abs=1e-6, rel=0)
    assert heldout == pytest.approx(results[0]["s3"]["heldout"], abs=1e-6)
