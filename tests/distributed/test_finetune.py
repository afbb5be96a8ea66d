"""Fine-tuning (``zerotrain.train.finetune``) gives the same run at every layout, from a base run saved
at another one, and resumes exactly.

A 2-layer, 64-wide GPT (block 96, 512-token tokenizer) is pretrained for 4 steps at ZeRO stage 1 on
2 ranks. Three fine-tuning runs on qa + summarize (6 steps, fp32; copying exercises only in the first
2 steps, then about a quarter of the rows) start from that checkpoint:

* stage 0 on 1 rank and stage 3 on 2 ranks log the same losses (1e-5) and held-out answer losses;
* the first loss equals the loss of the base checkpoint loaded into a plain single-process model on
  step 0's batch (the base weights were really loaded, at both layouts), and differs from an
  untrained model's;
* the fine-tuned model has a copy head the base had not: only its parameters may be missing from the
  base checkpoint, and they keep their initial values (the same on every rank and layout);
* a stage-3 run stopped after 3 steps resumes at step 3 and repeats the uninterrupted losses.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from harness import spawn

from zerotrain.data import load_corpus
from zerotrain.data.corpus import join_books
from zerotrain.train.options import build_options

STEPS, STOP_AFTER, COPY_STEPS = 6, 3, 2


def base_options(root: str, corpus: str):
    return build_options(settings={
        "run.runs_dir": root, "run.name": "base", "data.corpus": corpus, "data.heldout_books": ["Ruth", "Jonah"],
        "data.vocab_size": 512, "model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "model.block_size": 96,
        "parallel.stage": 1, "parallel.nproc": 2, "train.steps": 4, "train.batch_size": 4, "optim.warmup": 2,
        "train.eval_interval": 0, "train.eval_windows": 2, "train.ckpt_interval": 0, "train.cloze_passages": 0,
        "train.sample_tokens": 0})


def summary_cache(run_dir: Path) -> None:
    """A small summarization set, so the test does not depend on this machine's apt lists."""
    corpus = load_corpus()
    lines = [line for book in ("Proverbs", "Psalms") for line in corpus.book(book).text.splitlines()[:60]]
    pairs = [{"source": "docstrings", "family": f"f{i % 7}", "name": str(i), "document": " ".join(lines[i:i + 2]),
              "summary": " ".join(lines[i].split()[:5]), "split": "test" if i % 7 == 0 else "train"}
             for i in range(0, 100)]
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    (run_dir / "data" / "summarize.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))


def ft_run(root: str, base, name: str, *, stage: int, nproc: int):
    from zerotrain.train.finetune_options import FinetuneOptions
    from zerotrain.train.tasks_cli import setup_finetune
    spec = FinetuneOptions.model_validate({
        "base": str(Path(root) / "base"), "tasks": {"names": ["qa", "summarize"], "weights": {"qa": 2.0}},
        "parallel": {"stage": stage, "nproc": nproc}, "optim": {"warmup": 2},
        "train": {"steps": STEPS, "batch_size": 4, "eval_interval": 4, "eval_examples": 8, "ckpt_interval": 0,
                  "copy_steps": COPY_STEPS},
        "run": {"name": name, "runs_dir": root}})
    opts = spec.effective(base)
    summary_cache(spec.run_dir)
    setup_finetune(spec, opts, fresh=False)
    return opts


class StopAfter:
    def __init__(self, n: int):
        self.n, self.reads = n, 0

    @property
    def requested(self) -> bool:
        self.reads += 1
        return self.reads >= self.n


def two_ranks(mesh, root: str, corpus: str, runs: dict):
    from zerotrain.train.finetune import finetune
    from zerotrain.train.trainer import train
    train(mesh, base_options(root, corpus), tensorboard=False)
    state = finetune(mesh, runs["s3"], tensorboard=False)
    first = finetune(mesh, runs["resume"], stop=StopAfter(STOP_AFTER), tensorboard=False)
    second = finetune(mesh, runs["resume"], tensorboard=False)
    return {"s3": (state.losses, state.results["heldout_answer_loss"]),
            "resume": (first.step, first.interrupted, first.losses, second.losses)}


def one_rank(mesh, root: str, runs: dict):
    import torch

    from zerotrain import checkpoint
    from zerotrain.data import load_tokenizer
    from zerotrain.data.tasks.prompts import Encoded
    from zerotrain.train.finetune import finetune
    from zerotrain.train.finetune_data import TaskMix, copy_path, data_path
    from zerotrain.train.trainer import build_model
    opts = runs["s0"]
    tok = load_tokenizer(opts.run_dir / "tokenizer.json")
    mix = TaskMix([Encoded.load(data_path(opts.run_dir, n, "train")) for n in ("qa", "summarize")], [2 / 3, 1 / 3],
                  opts.train.seed, tok.eot_id, copy_text=np.load(copy_path(opts.run_dir)), copy_share=0.25, copy_steps=COPY_STEPS)
    x, y, _ = mix.batch(0, batch_size=4, dp_rank=0, dp_size=1)
    from zerotrain.checkpoint.format import CheckpointError
    losses, new, refused = {}, None, None
    for loaded in (True, False):
        model = build_model(opts, tok.vocab_size, mesh)
        if loaded:
            try:
                checkpoint.load(Path(root) / "base", model=model)
            except CheckpointError as e:
                refused = str(e)
            new = checkpoint.load(Path(root) / "base", model=model, new_params=("copy_head.",))["new"]
        with torch.no_grad():
            losses[loaded] = model(x, y).item()
    exercises = sum(plen == len(ids) // 2 + 1 and (ids[:plen - 1] == ids[plen - 1:]).all()
                    for step in range(STEPS) for ids, plen in mix.rows(step, 4))
    state = finetune(mesh, opts, tensorboard=False)
    return {"s0": (state.losses, state.results["heldout_answer_loss"]), "reference": losses, "exercises": exercises,
            "new": new, "refused": refused}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from zerotrain.train.prepare import prepare_data
    root = tmp_path_factory.mktemp("ft")
    corpus = root / "corpus.txt"
    books = load_corpus()
    corpus.write_text(join_books([books.book(n) for n in ("Genesis", "Ruth", "Jonah", "Mark")]), encoding="utf-8")
    base = base_options(str(root), str(corpus))
    prepare_data(base)
    runs = {name: ft_run(str(root), base, name, stage=stage, nproc=nproc)
            for name, stage, nproc in (("s3", 3, 2), ("resume", 3, 2), ("s0", 0, 1))}
    two = spawn(two_ranks, 2, str(root), str(corpus), runs, timeout=400)
    one = spawn(one_rank, 1, str(root), runs, timeout=300)
    return {**two[0], **one[0], "rank1": two[1]}


def test_stage3_on_two_ranks_equals_stage0_on_one(results):
    ref, ref_heldout = results["s0"]
    got, heldout = results["s3"]
    assert len(ref) == STEPS
    assert got == pytest.approx(ref, abs=1e-5, rel=0)
    assert set(heldout) == {"qa", "summarize"}
    for task in heldout:
        assert heldout[task] == pytest.approx(ref_heldout[task], abs=1e-5)
    assert results["rank1"]["s3"] == results["s3"]


def test_copying_exercises_are_in_the_batches(results):
    assert COPY_STEPS * 4 < results["exercises"] < STEPS * 4


def test_starts_from_the_base_saved_at_another_layout(results):
    loaded, fresh = results["reference"][True], results["reference"][False]
    assert results["s0"][0][0] == pytest.approx(loaded, abs=1e-5)
    assert results["s3"][0][0] == pytest.approx(loaded, abs=1e-5)
    assert abs(loaded - fresh) > 0.05


def test_the_copy_head_is_new_and_only_it_may_be_missing(results):
    assert sorted(results["new"]) == [f"copy_head.{m}.{p}" for m in ("gate", "key", "query") for p in ("bias", "weight")]
    assert "copy_head.query.weight" in results["refused"] and "does not match the model" in results["refused"]


def test_stopped_finetune_resumes_where_it_stopped(results):
    step, interrupted, first, second = results["resume"]
    ref = results["s3"][0]
    assert (step, interrupted) == (STOP_AFTER, True)
    assert first == pytest.approx(ref[:STOP_AFTER], abs=1e-6, rel=0)
    assert second == pytest.approx(ref[STOP_AFTER:], abs=1e-6, rel=0)
