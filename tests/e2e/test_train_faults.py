"""Faults in ``zerotrain train`` (two spawned ranks, a 2-layer GPT, faults from ``ZEROTRAIN_FAULT``):

* nan injected on one rank (fp32, bf16): the step is skipped on every rank and recorded as a
  metric, no checkpoint is written from it (the save is made after the next finite step), every
  checkpoint is finite and the run finishes;
* the diverging run of the issue — the fp32 run resumed with ``optim.lr=1e30`` — stops after
  ``train.max_bad_steps`` with exit status 4 and one line naming the newest finite checkpoint,
  which retention kept, and ``generate`` still works from it;
* the launcher killed in the middle of a (long) step: its ranks are gone within 10 s;
* a rank that dies without a word (exit status 9): the launcher names it.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zerotrain import checkpoint
from zerotrain.cli import main
from zerotrain.data import load_corpus
from zerotrain.data.corpus import join_books

SMALL = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "data.vocab_size=300",
         'data.heldout_books=["Ruth"]', "train.batch_size=4", "train.cloze_passages=0", "train.sample_tokens=4",
         "train.eval_windows=2", "train.eval_interval=0", "optim.warmup=1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    corpus = load_corpus()
    (root / "corpus.txt").write_text(join_books([corpus.book(n) for n in ("Ruth", "Jonah", "Mark")]),
                                     encoding="utf-8")
    return root


def train(workdir: Path, name: str, steps: int, *extra: str) -> list[str]:
    return ["train", "--corpus", str(workdir / "corpus.txt"), "--runs-dir", str(workdir / "runs"),
            "--run-name", name, "--steps", str(steps), *SMALL, *extra]


def records(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == "train"}


def finite(ckpt_dir: Path) -> bool:
    return all(bool(t.isfinite().all()) for t in checkpoint.full_state_dict(ckpt_dir).values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_on_one_rank_skips_the_step_and_never_reaches_a_checkpoint(workdir, precision, capfd, monkeypatch):
    monkeypatch.setenv("ZEROTRAIN_FAULT", "nan:1:2")
    name = f"nan-{precision}"
    args = train(workdir, name, 4, "--precision", precision, "train.ckpt_interval=2", "train.keep_last=2")
    assert main(args) == 0
    out = capfd.readouterr().out
    run = workdir / "runs" / name
    steps = records(run)
    assert steps[2]["skipped"] is True and math.isnan(steps[2]["loss"]) and math.isnan(steps[2]["grad_norm"])
    assert [steps[s]["skipped"] for s in (1, 3, 4)] == [False] * 3 and steps[4]["skipped_total"] == 1
    assert "step 2: not saving a checkpoint: the loss is nan" in out
    assert f"{name}/checkpoints/step00000003 (step 3)" in out                       # the owed save
    root = run / "checkpoints"
    assert sorted(p.name for p in root.glob("step*")) == ["step00000003", "step00000004"]
    assert all(finite(p) for p in root.glob("step*"))
    if precision == "fp32":
        _diverge(args, root, capfd, monkeypatch)


def _diverge(args: list[str], root, capfd, monkeypatch) -> None:
    """The issue's run: resumed with optim.lr=1e30 it used to write nan checkpoints and let retention
    delete the finite ones."""
    monkeypatch.delenv("ZEROTRAIN_FAULT")
    at = args.index("--steps")
    resume = args[:at] + args[at + 2:] + ["--steps", "10", "optim.lr=1e30", "train.max_bad_steps=3"]
    assert main(resume) == 4
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("zerotrain train: error: training diverged: 3 steps in a row had a non-finite loss")
    assert f"The newest checkpoint is {root / 'step00000004'}" in err[0] and "optim.lr=1e+29" in err[0]
    assert sorted(p.name for p in root.glob("step*")) == ["step00000003", "step00000004"]
    assert all(finite(p) for p in root.glob("step*")) and checkpoint.latest_tag(root) == "step00000004"
    assert main(["generate", str(root.parent), "--prompt", "In the beginning", "--max-new-tokens", "3"]) == 0
    assert capfd.readouterr().out.startswith("In the beginning")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def _start(workdir: Path, args: list[str], fault: str, **extra) -> subprocess.Popen:
    env = dict(os.environ, ZEROTRAIN_FAULT=fault, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return subprocess.Popen([sys.executable, "-m", "zerotrain.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_killing_the_launcher_mid_step_ends_its_ranks(workdir):
    proc = _start(workdir, train(workdir, "orphans", 5), "sleep:0:2:300,sleep:1:2:300")
    ranks = []
    try:
        for line in proc.stdout:                        # rank 0 logs the injected fault as it begins
            if "fault injection" in line:
                break
        ranks = _children(proc.pid)
        assert len(ranks) >= 2, ranks
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while _alive(ranks) and time.monotonic() - killed < 30:
            time.sleep(0.1)
        gone_after = time.monotonic() - killed
        assert not _alive(ranks) and gone_after < 10, gone_after
    finally:
        proc.kill()
        proc.wait()
        for pid in _alive(ranks):
            os.kill(pid, signal.SIGKILL)


def test_a_rank_that_dies_is_named(workdir):
    start = time.monotonic()
    # a 5 s heartbeat limit instead of 15 s keeps the test short; the mechanism is the same
    proc = _start(workdir, train(workdir, "died", 5), "exit:1:2:9", ZEROTRAIN_DEAD_AFTER="5")
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 5, out[-3000:]
    assert "zerotrain train: error: rank 1 exited with status 9 without reporting an error" in out, out[-3000:]
    assert "Traceback" not in out
    assert time.monotonic() - start < 60


def test_the_newest_finite_checkpoint_survives_retention(tmp_path):
    import zerotrain
    from models import make_batch, make_model
    model = make_model("gpt", seed=0)
    zerotrain.shard_model(model, stage=1)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, None, lr=1e-2)
    x, y = make_batch("gpt", 6, 0)
    model(x, y).backward()
    opt.step()
    checkpoint.save(tmp_path, model=model, optimizer=opt, step=1, keep_last=1)
    with torch.no_grad():
        model.zero_state.units[0].master[0] = float("nan")
    with pytest.raises(ValueError, match="holds inf or nan: refusing to write.*step00000001 stays the latest"):
        checkpoint.save(tmp_path, model=model, optimizer=opt, step=2, keep_last=1)
    for step in (3, 4):
        checkpoint.save(tmp_path, model=model, optimizer=opt, step=step, keep_last=1, allow_nonfinite=True)
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step00000001", "step00000004"]
    assert main(["checkpoint", "inspect", str(tmp_path)]) == 0
