"""``zerotrain train | eval | generate`` end to end, on a small corpus and a 2-layer GPT.

* a 6-step run on 2 spawned ranks writes metrics.jsonl, loss.png, tokenizer, checkpoint and
  results, and prints the report; ``eval`` reproduces its held-out loss, ``generate`` continues a prompt;
* SIGINT to the launcher mid-training exits 130 with a loadable checkpoint, and running the same
  command again resumes from that step;
* bad input gets one clear message and exit status 2, never a traceback.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zerotrain.cli import main
from zerotrain.data import load_corpus
from zerotrain.data.corpus import join_books

SMALL = ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.block_size=32", "data.vocab_size=512",
         'data.heldout_books=["Ruth","Jonah"]', "train.batch_size=8", "train.cloze_passages=10",
         "train.sample_tokens=8", "train.eval_windows=4"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    corpus = load_corpus()
    books = [corpus.book(name) for name in ("Genesis", "Ruth", "Jonah", "Mark")]
    (root / "corpus.txt").write_text(join_books(books), encoding="utf-8")
    return root


def zt(workdir: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "zerotrain.cli", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=180, **kw)


def train_args(name: str, steps: int, *extra: str) -> list[str]:
    return ["train", "--corpus", "corpus.txt", "--runs-dir", "runs", "--run-name", name,
            "--steps", str(steps), *SMALL, *extra]


def records(run: Path, split: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def trained(workdir) -> tuple[Path, subprocess.CompletedProcess]:
    done = zt(workdir, *train_args("x", 6, "train.eval_interval=3", "train.ckpt_interval=3", "optim.warmup=2"))
    assert done.returncode == 0, done.stderr
    return workdir / "runs" / "x", done


def test_train_writes_the_run(trained):
    run, done = trained
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records(run, "eval")] == [3, 6]
    assert all(k in records(run)[0] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "elapsed"))
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000006"
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000003", "step00000006"]
    assert any((run / "tb").iterdir())
    results = json.loads((run / "results.json").read_text())
    assert results["training"]["step"] == 6 and results["model"]["perplexity"] > 1
    for text in ("trained 6 steps, 1,536 tokens", "held-out text (Ruth, Jonah", "unigram",
                 "cloze (LAMBADA-style", "In the beginning"):
        assert text in done.stdout, text


def test_eval_and_generate_load_the_checkpoint(trained, capsys):
    run, _ = trained
    assert main(["eval", str(run), "--cloze", "0", "--samples", "0"]) == 0
    out = capsys.readouterr().out
    loss = json.loads((run / "results.json").read_text())["model"]["loss"]
    assert "at step 6" in out and f"loss {loss:6.3f}" in out
    assert main(["generate", "x", "--runs-dir", str(run.parent), "--prompt", "In the beginning",
                 "--max-new-tokens", "5", "--greedy"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("In the beginning") and len(text.strip()) > len("In the beginning")


def _wait_for_step(run: Path, step: int, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(records(run)) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"training did not reach step {step} (exit {proc.poll()})")


def test_sigint_saves_and_rerun_resumes(workdir, capsys):
    run = workdir / "runs" / "y"
    args = train_args("y", 100000, "train.eval_interval=0", "train.ckpt_interval=0")
    proc = subprocess.Popen([sys.executable, "-m", "zerotrain.cli", *args], cwd=workdir, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_step(run, 3, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    step = records(run)[-1]["step"]
    assert f"interrupted at step {step}" in err and "Traceback" not in err
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step{step:08d}"
    assert main(["eval", str(run), "--cloze", "0", "--samples", "0"]) == 0     # loadable
    assert f"at step {step}" in capsys.readouterr().out
    again = zt(workdir, *train_args("y", step + 2, "train.cloze_passages=0", "train.sample_tokens=0"))
    assert again.returncode == 0, again.stderr
    assert f"resumed from" in again.stdout and f"at step {step}" in again.stdout
    assert [r["step"] for r in records(run)] == list(range(1, step + 3))


BAD = [
    (["train", "--preset", "tinny"], "unknown model preset 'tinny'; did you mean 'tiny'"),
    (["train", "--corpus", "/no/such/corpus.txt"], "corpus file not found: /no/such/corpus.txt"),
    (["train", "--nproc", "3", "--batch-size", "8"], "global batch size 8 is not divisible by 3 processes"),
    (["train", "--nproc", "4", "--batch-size", "2"], "--nproc 4 is larger than the global batch size 2"),
    (["train", "--nproc", "100000"], "--nproc 100000 is more than 4 x the"),
    (["train", "optim.lrr=0.1"], "unknown option 'optim.lrr'; did you mean 'optim.lr'?"),
    (["train", "stpes=5"], "unknown option 'stpes'; did you mean 'steps'?"),
    (["train", "--steps", "0"], "train.steps: Input should be greater than or equal to 1"),
    (["train", "--tp", "3"], "--tp 3 does not divide the 2 processes"),
    (["train", "--nproc", "3", "--tp", "3"], "--tp 3 does not divide the model's 4 attention heads"),
    (["eval", "nosuchrun", "--runs-dir", "nowhere"], "run 'nosuchrun' not found"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_a_clear_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_prompt_longer_than_the_context(trained, capsys):
    run, _ = trained
    assert main(["generate", str(run), "--prompt", "In the beginning " * 40]) == 2
    err = capsys.readouterr().err
    assert "the prompt is" in err and "model's context is 32 tokens" in err


def test_error_exit_status_from_the_shell(workdir):
    done = zt(workdir, "train", "--preset", "tinny")
    assert done.returncode == 2 and "did you mean 'tiny'" in done.stderr and "Traceback" not in done.stderr


def test_option_layers_and_resume_rules(tmp_path):
    from zerotrain.train.cli import _train_parser, resolve_options
    from zerotrain.train.options import UsageError
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"optim": {"lr": 1e-3, "warmup": 7}, "steps": 50, "model.n_layer": 3}))
    argv = ["--config", str(config), "--runs-dir", str(tmp_path), "--steps", "60", "warmup=9", "optim.lr=2e-3"]
    opts = resolve_options(_train_parser().parse_args(argv))
    assert (opts.optim.lr, opts.optim.warmup, opts.train.steps, opts.model.n_layer) == (2e-3, 9, 60, 3)
    assert opts.run_name == "tiny-zero3" and opts.optim.min_lr == 3e-4
    opts.run_dir.mkdir()
    (opts.run_dir / "options.json").write_text(opts.model_dump_json())
    again = resolve_options(_train_parser().parse_args(["--runs-dir", str(tmp_path), "--steps", "80"]))
    assert (again.model.n_layer, again.optim.warmup, again.train.steps) == (3, 9, 80)   # saved options
    with pytest.raises(UsageError, match=r"other settings \(model.n_layer: 3 -> 4\); pass --fresh"):
        resolve_options(_train_parser().parse_args(["--runs-dir", str(tmp_path), "model.n_layer=4"]))
    fresh = resolve_options(_train_parser().parse_args(["--runs-dir", str(tmp_path), "--fresh"]))
    assert fresh.model.n_layer is None


def test_activation_checkpointing_flag_reaches_shard_model(tmp_path):
    from zerotrain.train.cli import _train_parser, resolve_options
    from zerotrain.train.trainer import build_model
    from zerotrain.distributed.mesh import Mesh
    argv = ["--runs-dir", str(tmp_path), "--activation-checkpointing", "model.n_layer=2", "model.n_embd=16",
            "model.n_head=2", "model.block_size=8"]
    opts = resolve_options(_train_parser().parse_args(argv))
    assert opts.parallel.activation_checkpointing
    model = build_model(opts, 300, Mesh.single())
    assert len(model.zero_state.recomputed) == 2
