"""Bad input, table-driven: every row is one mistake a user makes on the command line, in a config
file, with a checkpoint or through the API. Each must give one line naming the problem (no
traceback) and a non-zero exit status of the right kind (``zerotrain.cli.EXIT_CODES``). CLI rows
run ``zerotrain.cli.main`` in this process; API rows raise, and ``zerotrain.cli.report`` — what
every command does with an error — must turn the exception into one line and a non-zero status.
None of these starts a rank or trains a tokenizer on more than a small corpus.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import zerotrain
from models import make_batch, make_model
from zerotrain import checkpoint
from zerotrain.cli import main, report
from zerotrain.data import load_corpus
from zerotrain.data.corpus import join_books

USAGE, CKPT, OS = 2, 3, 6


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Inputs shared by the rows: config files, a corpus, a saved checkpoint."""
    d = tmp_path_factory.mktemp("bad")
    (d / "dup.json").write_text('{"optim": {"lr": 1e-3, "lr": 2e-3}}')
    (d / "latin1.json").write_bytes('{"run": {"name": "café"}}'.encode("latin-1"))
    (d / "broken.json").write_text('{"optim": {"lr": }')
    (d / "list.json").write_text("[1, 2]")
    (d / "section.json").write_text('{"optimiser": {"lr": 1e-3}}')
    (d / "ds_dup.json").write_text('{"train_batch_size": 8, "train_batch_size": 16}')
    (d / "ds_latin1.json").write_bytes('{"train_batch_size": 8, "x": "é"}'.encode("latin-1"))
    (d / "ds_typo.json").write_text('{"train_batch_size": 8, "zero_optimisation": {"stage": 2}}')
    (d / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (d / "nul.txt").write_text("Genesis\nIn the beginning\x00\x00\n\nExodus\nthese are the names")
    (d / "a_file").write_text("not a directory")
    corpus = load_corpus()
    (d / "corpus.txt").write_text(join_books([corpus.book(n) for n in ("Ruth", "Jonah")]), encoding="utf-8")
    (d / "notarun").mkdir()
    (d / "notarun" / "keep.txt").write_text("precious")
    model = make_model("gpt", seed=0)
    zerotrain.shard_model(model, stage=1)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, None, lr=1e-2)
    x, y = make_batch("gpt", 6, 0)
    model(x, y).backward()
    opt.step()
    checkpoint.save(d / "ckpt", model=model, optimizer=opt, step=1)
    return d


def _ckpt_copy(files: Path, tmp: Path) -> Path:
    shutil.copytree(files / "ckpt", tmp / "ckpt")
    return tmp / "ckpt" / "step00000001"


def _edit_manifest(files, tmp, change):
    path = _ckpt_copy(files, tmp)
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _transpose(m):
    m["params"]["blocks.0.attn.weight"]["shape"].reverse()


def _shrink(m):
    m["params"]["wte.weight"]["shape"] = [10, 10]


def _truncate(files, tmp):
    shard = _ckpt_copy(files, tmp) / "rank00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])


def _delete(files, tmp):
    (_ckpt_copy(files, tmp) / "rank00000.safetensors").unlink()


def _pickle_in_place(files, tmp):
    import pickle
    (_ckpt_copy(files, tmp) / "rank00000.safetensors").write_bytes(pickle.dumps({"x": 1}))


TRAIN = ["train", "--runs-dir", "{tmp}/runs"]
S = ["--corpus", "{files}/corpus.txt", 'data.heldout_books=["Jonah"]', "data.vocab_size=300", "--nproc", "1",
     "--batch-size", "2", "model.n_layer=1", "model.n_embd=16", "model.n_head=2"]

# (id, argv, setup, expected text, exit status)
CLI = [
    ("preset typo", TRAIN + ["--preset", "tinny"], None, "did you mean 'tiny'", USAGE),
    ("corpus missing", TRAIN + ["--corpus", "/no/such/corpus.txt"], None, "corpus file not found", USAGE),
    ("batch not divisible", TRAIN + ["--nproc", "3", "--batch-size", "8"], None, "not divisible by 3", USAGE),
    ("more ranks than batch", TRAIN + ["--nproc", "4", "--batch-size", "2"], None, "larger than the global batch", USAGE),
    ("absurd nproc", TRAIN + ["--nproc", "100000"], None, "more than 4 x the", USAGE),
    ("override typo", TRAIN + ["optim.lrr=0.1"], None, "did you mean 'optim.lr'", USAGE),
    ("bare override typo", TRAIN + ["stpes=5"], None, "did you mean 'steps'", USAGE),
    ("zero steps", TRAIN + ["--steps", "0"], None, "train.steps", USAGE),
    ("tp not dividing nproc", TRAIN + ["--tp", "3"], None, "--tp 3 does not divide the 2 processes", USAGE),
    ("tp not dividing heads", TRAIN + ["--nproc", "3", "--tp", "3"], None, "4 attention heads", USAGE),
    ("stage 7", TRAIN + ["--stage", "7"], None, "parallel.stage", USAGE),
    ("precision fp8", TRAIN + ["--precision", "fp8"], None, "parallel.precision", USAGE),
    ("steps not a number", TRAIN + ["--steps", "abc"], None, "argument --steps: invalid int value: 'abc'", USAGE),
    ("unknown flag", TRAIN + ["--frobnicate"], None, "unrecognized arguments: --frobnicate", USAGE),
    ("negative lr", TRAIN + ["optim.lr=-1"], None, "optim.lr", USAGE),
    ("nan lr", TRAIN + ["optim.lr=NaN"], None, "optim.lr", USAGE),
    ("min_lr above lr", TRAIN + ["optim.lr=0.1", "optim.min_lr=1"], None, "min_lr is where the cosine", USAGE),
    ("override without =", TRAIN + ["lr"], None, "is not key=value", USAGE),
    ("keep_last 0", TRAIN + ["train.keep_last=0"], None, "train.keep_last", USAGE),
    ("n_layer 0", TRAIN + ["model.n_layer=0"], None, "model.n_layer", USAGE),
    ("config missing", TRAIN + ["--config", "{tmp}/none.json"], None, "config file not found", USAGE),
    ("config not JSON", TRAIN + ["--config", "{files}/broken.json"], None, "not valid JSON", USAGE),
    ("config duplicate key", TRAIN + ["--config", "{files}/dup.json"], None, "key 'lr' appears twice", USAGE),
    ("config not UTF-8", TRAIN + ["--config", "{files}/latin1.json"], None, "latin1.json: not UTF-8 text", USAGE),
    ("config top level list", TRAIN + ["--config", "{files}/list.json"], None, "top level must be an object", USAGE),
    ("config section typo", TRAIN + ["--config", "{files}/section.json"], None, "did you mean 'optim", USAGE),
    ("does not fit memory", TRAIN + ["--preset", "tnlg-17b"], None, "GB are free", USAGE),
    ("runs dir is a file", ["train", "--runs-dir", "{files}/a_file"], None, "is a file, not a directory", USAGE),
    ("binary corpus", TRAIN + S[2:] + ["--corpus", "{files}/binary.txt"], None, "is not UTF-8 text", USAGE),
    ("NUL corpus", TRAIN + S[2:] + ["--corpus", "{files}/nul.txt"], None, "looks like a binary file", USAGE),
    ("held-out book missing", TRAIN + S + ['data.heldout_books=["Nope"]'], None, "['Nope'] are not sections", USAGE),
    ("block longer than data", TRAIN + S + ["model.block_size=100000"], None, "model.block_size=100000 is longer than the training text", USAGE),
    ("fresh on a non-run", ["train", "--runs-dir", "{files}", "--run-name", "notarun", "--fresh"], None,
     "is not a zerotrain run", USAGE),
    ("eval unknown run", ["eval", "nosuchrun", "--runs-dir", "{tmp}"], None, "run 'nosuchrun' not found", USAGE),
    ("eval negative samples", ["eval", "x", "--samples", "-1"], None, "--samples -1: must be >= 0", USAGE),
    ("eval negative cloze", ["eval", "x", "--cloze", "-2"], None, "--cloze -2: must be >= 0", USAGE),
    ("generate empty prompt", ["generate", "x", "--prompt", ""], None, "--prompt is empty", USAGE),
    ("generate negative samples", ["generate", "x", "--prompt", "a", "--num-samples", "-3"], None,
     "--num-samples -3: must be >= 1", USAGE),
    ("generate top-p 2", ["generate", "x", "--prompt", "a", "--top-p", "2"], None, "--top-p 2.0", USAGE),
    ("generate negative temperature", ["generate", "x", "--prompt", "a", "--temperature", "-1"], None,
     "--temperature -1.0", USAGE),
    ("generate prompt not UTF-8", ["generate", "x", "--prompt", "caf\udce9"], None, "is not valid UTF-8", USAGE),
    ("generate without prompt", ["generate", "x"], None, "the following arguments are required: --prompt", USAGE),
    ("generate unknown run", ["generate", "nosuchrun", "--runs-dir", "{tmp}", "--prompt", "a"], None,
     "run 'nosuchrun' not found", USAGE),
    ("estimate dp 0", ["estimate", "--preset", "tiny", "--dp", "0"], None, "--dp: 0 is not a count >= 1", USAGE),
    ("estimate micro-batch 0", ["estimate", "--preset", "tiny", "--micro-batch", "0"], None,
     "--micro-batch: 0 is not a count >= 1", USAGE),
    ("estimate unknown preset", ["estimate", "--preset", "nope"], None, "nope", USAGE),
    ("estimate without model", ["estimate"], None, "one of the arguments --preset --params is required", USAGE),
    ("estimate negative params", ["estimate", "--params", "-3"], None, "positive parameter count", USAGE),
    ("config file missing", ["config", "validate", "{tmp}/none.json"], None, "config file not found", USAGE),
    ("ds config duplicate key", ["config", "validate", "{files}/ds_dup.json"], None, "appears twice", USAGE),
    ("ds config not UTF-8", ["config", "explain", "{files}/ds_latin1.json"], None, "not UTF-8 text", USAGE),
    ("ds config typo", ["config", "validate", "{files}/ds_typo.json"], None, "did you mean 'zero_optimization'", USAGE),
    ("unknown command", ["trian"], None, "unknown command 'trian'; did you mean 'train'", USAGE),
    ("checkpoint nowhere", ["checkpoint", "inspect", "{tmp}/nowhere"], None, "no checkpoint in", OS),
    ("manifest shape transposed", ["checkpoint", "consolidate", "{tmp}/ckpt", "-o", "{tmp}/o.safetensors"],
     lambda f, t: _edit_manifest(f, t, _transpose), "does not match its checksum", CKPT),
    ("manifest shape shrunk", ["checkpoint", "inspect", "{tmp}/ckpt"], lambda f, t: _edit_manifest(f, t, _shrink),
     "does not match its checksum", CKPT),
    ("shard truncated", ["checkpoint", "inspect", "{tmp}/ckpt"], _truncate, "the file is truncated or altered", CKPT),
    ("shard deleted", ["checkpoint", "inspect", "{tmp}/ckpt"], _delete, "rank00000.safetensors is missing", OS),
    ("pickle for a shard", ["checkpoint", "inspect", "{tmp}/ckpt"], _pickle_in_place, "truncated or altered", CKPT),
    ("checksum file deleted", ["checkpoint", "inspect", "{tmp}/ckpt"],
     lambda f, t: (_ckpt_copy(f, t) / "manifest.sha256").unlink(), "has no manifest.sha256", CKPT),
]


@pytest.mark.parametrize("argv,setup,expected,code", [r[1:] for r in CLI], ids=[r[0] for r in CLI])
def test_cli_bad_input_is_one_line(argv, setup, expected, code, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        setup(files, tmp_path)
    argv = [a.format(tmp=tmp_path, files=files) for a in argv]
    assert main(argv) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("zerotrain") and ": error: " in err[0] and expected in err[0], err


def _unsharded_optimizer():
    zerotrain.ShardedOptimizer(make_model("gpt"), torch.optim.AdamW, None, lr=1e-3)


def _sharded(stage=1):
    model = make_model("gpt")
    return zerotrain.shard_model(model, stage=stage)


def _load_tampered(files, tmp):
    _edit_manifest(files, tmp, _transpose)
    model = _sharded()
    checkpoint.load(tmp / "ckpt", model=model)


API = [
    ("init tp 0", lambda f, t: zerotrain.init_distributed(tp=0), "tp must be >= 1"),
    ("init tp 2 alone", lambda f, t: zerotrain.init_distributed(tp=2), "needs several processes"),
    ("shard stage 5", lambda f, t: zerotrain.shard_model(make_model("gpt"), stage=5), "stage"),
    ("optimizer of an unsharded model", lambda f, t: _unsharded_optimizer(), "the model is not sharded"),
    ("clip norm 0", lambda f, t: zerotrain.ShardedOptimizer(_sharded(), torch.optim.AdamW, None, lr=1e-3,
                                                             max_grad_norm=0), "max_grad_norm=0 must be > 0"),
    ("ds config typo", lambda f, t: zerotrain.config.load_config({"zero_optimisation": {}}),
     "did you mean 'zero_optimization'"),
    ("ds config type", lambda f, t: zerotrain.config.load_config({"train_batch_size": "x"}), "expected an integer"),
    ("ds config file duplicate", lambda f, t: zerotrain.config.load_config(str(f / "ds_dup.json")), "appears twice"),
    ("preset typo", lambda f, t: zerotrain.model.get_config("tinny"), "did you mean 'tiny'"),
    ("save step -1", lambda f, t: checkpoint.save(t, model=_sharded(), step=-1), "step=-1 must be an int >= 0"),
    ("load tampered manifest", _load_tampered, "does not match its checksum"),
    ("all_reduce op prod", lambda f, t: zerotrain.distributed.comm.all_reduce(torch.ones(1), None, op="prod"),
     "all_reduce op must be"),
]


@pytest.mark.parametrize("call,expected", [r[1:] for r in API], ids=[r[0] for r in API])
def test_api_bad_input_is_one_line(call, expected, files, tmp_path, capsys):
    with pytest.raises(Exception) as info:
        call(files, tmp_path)
    code = report("api", info.value, verbose=False)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code not in (0, 1) and len(err) == 1 and "Traceback" not in err[0], (code, err)
    assert expected in err[0], err


def test_verbose_adds_the_traceback(files, tmp_path, capsys):
    assert main(["checkpoint", "inspect", str(tmp_path / "nowhere"), "--verbose"]) == OS
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("zerotrain checkpoint: error: no checkpoint")


def test_overrides_may_sit_between_flags(tmp_path):
    from zerotrain.train.cli import parse_train_args, resolve_options
    args = parse_train_args(["--nproc", "1", "steps=7", "--stage", "0", "optim.lr=2e-3", "--runs-dir", str(tmp_path)])
    opts = resolve_options(args)
    assert (opts.parallel.nproc, opts.train.steps, opts.parallel.stage, opts.optim.lr) == (1, 7, 0, 2e-3)


def test_absurd_shapes_warn_before_launch(tmp_path, caplog):
    from zerotrain.train.options import build_options
    from zerotrain.train.preflight import preflight
    opts = build_options(overrides=["model.block_size=100000", f"run.runs_dir={tmp_path}"])
    logging.getLogger("zerotrain").propagate = True
    with caplog.at_level(logging.WARNING, logger="zerotrain"):
        preflight(opts)
    assert "model.block_size=100000 is 781x the tiny preset's 128: is that intended?" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zerotrain"):
        preflight(build_options(overrides=["model.block_size=100000", "run.preflight=false"]))
    assert caplog.text == ""
