"""Checkpoint format, atomic commit, integrity and pickle-safety, consolidation (no process group:
a single-rank sharded model)."""
from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import zerotrain
from models import make_batch, make_model
from zerotrain import checkpoint
from zerotrain.checkpoint import format as fmt
from zerotrain.checkpoint.cli import cli_checkpoint
from zerotrain.cli import main
from zerotrain.checkpoint.tensorfile import ShardReader, write_safetensors
from zerotrain.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[2]


def _trained(stage=1, steps=2, seed=0):
    model = make_model("gpt", seed=seed)
    zerotrain.shard_model(model, stage=stage)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, None, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for s in range(steps):
        x, y = make_batch("gpt", 6, s)
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


# ---------------------------------------------------------------- format pieces
def test_json_codec_round_trips_exactly_and_rejects_objects():
    value = {"betas": (0.9, 0.999), "ids": {1: "a", (2, 3): None}, "lr": torch.tensor(0.5),
             "inf": math.inf, "nested": [1, 2.5, True, None, "s"]}
    back = fmt.from_json(json.loads(json.dumps(fmt.to_json(value, "x"), allow_nan=False)))
    assert back["betas"] == (0.9, 0.999) and back["ids"] == {1: "a", (2, 3): None}
    assert back["lr"].dtype == torch.float32 and back["lr"].item() == 0.5 and back["inf"] == math.inf
    assert back["nested"] == [1, 2.5, True, None, "s"]
    with pytest.raises(ValueError, match=r"scheduler\.state_dict\(\)\['fn'\] is a builtins\.function.*no pickle"):
        fmt.to_json({"fn": lambda s: s}, "scheduler.state_dict()")


def test_tensor_file_is_plain_safetensors_and_reads_byte_ranges(tmp_path):
    tensors = {"a": torch.randn(7, dtype=torch.float64), "b": torch.randn(5).to(torch.bfloat16),
               "c": torch.arange(4), "d": torch.tensor([True, False, True]), "e": torch.empty(0)}
    path = tmp_path / "x.safetensors"
    sha, size = write_safetensors(path, [(k, t.dtype, tuple(t.shape), t) for k, t in tensors.items()], {"k": "v"})
    assert size == path.stat().st_size and sha == fmt.sha256_file(path)
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], t) for k, t in tensors.items())
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}
    manifest = {"files": {"x.safetensors": {"sha256": sha, "bytes": size}}}
    with ShardReader(tmp_path, manifest) as reader:
        assert torch.equal(reader.read_into("x.safetensors", "a", 2, torch.empty(4, dtype=torch.float64)),
                           tensors["a"][2:6])
        assert torch.equal(reader.read("x.safetensors", "b"), tensors["b"])
        with pytest.raises(ValueError, match="cannot read elements"):
            reader.read_into("x.safetensors", "a", 5, torch.empty(4, dtype=torch.float64))


def test_save_layout_latest_and_retention(tmp_path):
    model, opt, sched = _trained()
    for step in (2, 4, 6, 8):
        path = checkpoint.save(tmp_path, model=model, optimizer=opt, scheduler=sched, step=step, keep_last=2)
    assert path == tmp_path / "step00000008"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step00000006", "step00000008"]
    assert checkpoint.latest_tag(tmp_path) == "step00000008"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "manifest.sha256", "rank00000.safetensors"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "zerotrain-checkpoint" and manifest["format_version"] == 2
    assert manifest["finite"] is True
    assert (path / "manifest.sha256").read_text() == f"{fmt.sha256_file(path / 'manifest.json')}  manifest.json\n"
    assert manifest["layout"] == {"stage": 1, "dp": 1, "tp": 1, "world": 1, "param_dtype": "float32",
                                  "master_dtype": "float32"}
    assert manifest["aliases"] == {"lm_head.weight": "wte.weight"}
    assert set(manifest["optimizer"]["state"]) == {"exp_avg", "exp_avg_sq"}
    assert manifest["files"]["rank00000.safetensors"]["sha256"] == fmt.sha256_file(path / "rank00000.safetensors")
    keys = set(load_file(path / "rank00000.safetensors"))
    assert "master/wte.weight/0-184" in keys and "state.exp_avg/blocks.1.fc.bias/0-16" in keys
    assert "rng/torch" in keys
    checkpoint.save(tmp_path, model=model, step=9, tag="best", keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "latest"]


def test_bad_arguments_and_missing_checkpoints(tmp_path):
    model, opt, sched = _trained()
    with pytest.raises(ValueError, match="keep_last=0 must be None"):
        checkpoint.save(tmp_path, model=model, step=1, keep_last=0)
    with pytest.raises(ValueError, match="tag='a/b' is not a valid directory name"):
        checkpoint.save(tmp_path, model=model, step=1, tag="a/b")
    with pytest.raises(ValueError, match=r"client_state\['data'\] is a builtins.object"):
        checkpoint.save(tmp_path, model=model, step=1, client_state={"data": object()})
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {tmp_path}"):
        checkpoint.load(tmp_path, model=model)
    checkpoint.save(tmp_path, model=model, step=1)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/nope does not exist"):
        checkpoint.load(tmp_path, model=model, tag="nope")
    with pytest.raises(ValueError, match="has no optimizer state; pass optimizer=None"):
        checkpoint.load(tmp_path, model=model, optimizer=opt)
    plain = make_model("gpt")
    with pytest.raises(ValueError, match="the model is not sharded"):
        checkpoint.load(tmp_path, model=plain)
    other = make_model("uneven")
    zerotrain.shard_model(other, stage=0)
    with pytest.raises(ValueError, match="does not match the model: missing from the checkpoint"):
        checkpoint.load(tmp_path, model=other)


# ---------------------------------------------------------------- integrity and atomicity
def _flip_byte(path: Path, where: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    path.write_bytes(bytes(data))


def test_altered_or_truncated_file_is_named(tmp_path):
    model, opt, sched = _trained()
    path = checkpoint.save(tmp_path, model=model, optimizer=opt, step=2)
    shard = path / "rank00000.safetensors"
    good = shard.read_bytes()
    _flip_byte(shard)
    with pytest.raises(ValueError, match=r"rank00000\.safetensors fails its sha256 check"):
        checkpoint.load(tmp_path, model=model, optimizer=opt)
    with pytest.raises(ValueError, match=r"rank00000\.safetensors fails its sha256 check"):
        checkpoint.consolidate(tmp_path, tmp_path / "out.safetensors")
    assert main(["checkpoint", "inspect", str(tmp_path), "--verify"]) == 3
    assert main(["checkpoint", "inspect", str(tmp_path)]) == 0         # sizes match: only the hash sees it
    shard.write_bytes(good[:-100])
    with pytest.raises(ValueError, match=r"rank00000\.safetensors has \d+ bytes, the manifest says"):
        checkpoint.load(tmp_path, model=model, optimizer=opt)


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    import zerotrain
    from zerotrain import checkpoint
    from models import make_batch, make_model
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = make_model("gpt"); zerotrain.shard_model(model, stage=3)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, None, lr=1e-2)
    def step(s):
        x, y = make_batch("gpt", 6, s); model(x, y).backward(); opt.step(); opt.zero_grad()
    step(0)
    checkpoint.save({root!r}, model=model, optimizer=opt, step=1)
    save_file(model.full_state_dict(), {expect!r})
    step(1)
    os.environ["ZEROTRAIN_CHECKPOINT_FAULT"] = {point!r}
    checkpoint.save({root!r}, model=model, optimizer=opt, step=2)
    print("the save was not interrupted")
""")


@pytest.mark.parametrize("point", ["after_shards", "before_rename", "before_latest"])
def test_save_killed_midway_leaves_previous_checkpoint(tmp_path, point):
    root, expect = tmp_path / "ckpt", tmp_path / "expect.safetensors"
    script = CRASH_SCRIPT.format(tests=str(ROOT / "tests"), root=str(root), expect=str(expect), point=point)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 86, proc.stdout + proc.stderr
    assert checkpoint.latest_tag(root) == "step00000001"
    leftovers = {p.name for p in root.iterdir()}
    assert (".tmp-step00000002" in leftovers) == (point != "before_latest")
    model = make_model("gpt", seed=3)
    zerotrain.shard_model(model, stage=1)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, None, lr=1e-2)
    assert checkpoint.load(root, model=model, optimizer=opt)["step"] == 1
    expected = load_file(expect)
    got = model.full_state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    checkpoint.save(root, model=model, optimizer=opt, step=3)         # cleans the leftovers
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert checkpoint.latest_tag(root) == "step00000003"


# ---------------------------------------------------------------- no pickle, ever
class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))          # unpickling creates the marker file


def test_pickle_payloads_are_never_executed(tmp_path):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload).close()                  # the payload works when unpickled...
    assert marker.exists()
    marker.unlink()
    model, opt, sched = _trained()
    path = checkpoint.save(tmp_path / "ck", model=model, optimizer=opt, scheduler=sched, step=2)
    for name in ("model.pt", "optimizer.bin", "pytorch_model.bin", "rank00000.pt", "scheduler.pkl"):
        (path / name).write_bytes(payload)
    torch.save({"x": _Payload(marker)}, path / "rank00001.safetensors")
    out = tmp_path / "full.safetensors"
    checkpoint.load(tmp_path / "ck", model=model, optimizer=opt, scheduler=sched)
    checkpoint.consolidate(tmp_path / "ck", out)
    assert cli_checkpoint(["inspect", str(tmp_path / "ck"), "--verify"]) == 0
    # a shard replaced by a pickle whose checksum the manifest "agrees" with
    shard = path / "rank00000.safetensors"
    shard.write_bytes(payload)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["rank00000.safetensors"] = {"sha256": fmt.sha256_file(shard), "bytes": len(payload)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    fmt.write_checksum(path)                       # ... and whose checksum covers that manifest
    with pytest.raises(ValueError, match=r"rank00000\.safetensors is not a valid safetensors file"):
        checkpoint.load(tmp_path / "ck", model=model, optimizer=opt)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        checkpoint.consolidate(tmp_path / "ck", out)
    (path / "manifest.json").unlink()              # only pickles left: nothing to load
    with pytest.raises(FileNotFoundError):
        checkpoint.load(path, model=model)
    assert not marker.exists()
    source = "".join(p.read_text() for p in (ROOT / "zerotrain" / "checkpoint").glob("*.py"))
    for banned in ("import pickle", "torch.load", "pickle.load", "np.load", "allow_pickle", "weights_only"):
        assert banned not in source, banned


# ---------------------------------------------------------------- consolidation
def _gpt(seed: int, bias: bool = True) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=bias))


@pytest.mark.parametrize("bias", [True, False])
def test_consolidate_into_plain_gpt_and_huggingface(tmp_path, bias):
    model = _gpt(0, bias)
    zerotrain.shard_model(model, stage=3)
    checkpoint.save(tmp_path / "run" / "checkpoints", model=model, step=5)
    out = tmp_path / "model.safetensors"
    assert cli_checkpoint(["consolidate", str(tmp_path / "run"), "-o", str(out)]) == 0
    plain = checkpoint.load_consolidated_into(_gpt(1, bias), out)
    reference = _gpt(0, bias)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain(idx), reference(idx))
    with safe_open(str(out), "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert json.loads(f.metadata()["zerotrain.aliases"]) == {"lm_head.weight": "wte.weight"}
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=0, eos_token_id=0)).eval()
    if bias:                                       # in memory (tied alias included) ...
        hf_sd = checkpoint.to_hf_gpt2_state_dict(checkpoint.full_state_dict(tmp_path / "run"))
    else:                                          # ... or through the CLI (alias resolved from wte)
        hf_file = tmp_path / "hf.safetensors"
        assert cli_checkpoint(["consolidate", str(tmp_path / "run"), "-o", str(hf_file), "--hf-gpt2"]) == 0
        hf_sd = load_file(hf_file)
    hf.load_state_dict(hf_sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, reference(idx), atol=1e-5, rtol=1e-5)


def test_a_copy_head_model_consolidates_but_is_not_exported_as_gpt2(tmp_path):
    def copy_gpt(seed):
        torch.manual_seed(seed)
        return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, copy_head=True))
    model = copy_gpt(0)
    zerotrain.shard_model(model, stage=3)
    checkpoint.save(tmp_path / "run" / "checkpoints", model=model, step=1)
    out = tmp_path / "model.safetensors"
    assert cli_checkpoint(["consolidate", str(tmp_path / "run"), "-o", str(out)]) == 0
    plain = checkpoint.load_consolidated_into(copy_gpt(1), out)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(idx), copy_gpt(0)(idx))
    with pytest.raises(ValueError, match="copy head"):
        checkpoint.to_hf_gpt2_state_dict(checkpoint.full_state_dict(tmp_path / "run"))


def test_cli_inspect(tmp_path, capsys):
    model, opt, sched = _trained(stage=2)
    checkpoint.save(tmp_path / "run" / "checkpoints", model=model, optimizer=opt, scheduler=sched, step=2,
                    client_state={"data_position": 12})
    assert cli_checkpoint(["inspect", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    for expected in ("tag           step00000002 (latest)", "step          2",
                     "layout        stage 2, dp 1, tp 1, world 1", "parameters    1,384 in 22 tensors",
                     "lm_head.weight -> wte.weight", "AdamW, 1 param group(s); state exp_avg (float32), "
                     "exp_avg_sq (float32), step", "StepLR (last_epoch 2)", "client state  data_position",
                     "file          rank00000.safetensors"):
        assert expected in text, (expected, text)
    assert main(["checkpoint", "inspect", str(tmp_path / "nothing")]) == 6
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- manifest integrity
def _edit(path: Path, change, *, checksum: bool) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    if checksum:
        fmt.write_checksum(path)                   # an edit that also forges the checksum


def test_a_tampered_manifest_is_refused_by_load_and_consolidate(tmp_path, capsys):
    model, opt, sched = _trained()
    path = checkpoint.save(tmp_path, model=model, optimizer=opt, step=2)
    pristine = (path / "manifest.json").read_bytes()
    _edit(path, lambda m: m["params"]["wte.weight"]["shape"].reverse(), checksum=False)    # transposed
    for action in (lambda: checkpoint.load(tmp_path, model=model, optimizer=opt),
                   lambda: checkpoint.consolidate(tmp_path, tmp_path / "out.safetensors")):
        with pytest.raises(fmt.CheckpointError, match="does not match its checksum in manifest.sha256"):
            action()
    assert not (tmp_path / "out.safetensors").exists()
    assert main(["checkpoint", "consolidate", str(tmp_path), "-o", str(tmp_path / "o.safetensors")]) == 3
    assert "does not match its checksum" in capsys.readouterr().err
    # past a forged checksum, the shapes are still held against the slices and the bytes
    (path / "manifest.json").write_bytes(pristine)
    _edit(path, lambda m: m["params"]["wte.weight"].update(shape=[10, 10]), checksum=True)
    with pytest.raises(fmt.CheckpointError, match=r"'wte.weight' has shape \[10, 10\] \(100 elements\).*cover \[0, 184\)"):
        checkpoint.consolidate(tmp_path, tmp_path / "out.safetensors")
    (path / "manifest.json").write_bytes(pristine)
    _edit(path, lambda m: m["params"]["wte.weight"].update(dtype="float16"), checksum=True)
    with pytest.raises(fmt.CheckpointError, match=r"'master/wte.weight/0-184' holds 184 torch.float32 elements"):
        checkpoint.load(tmp_path, model=model, optimizer=opt)
    (path / "manifest.json").write_bytes(pristine)
    fmt.write_checksum(path)
    assert checkpoint.load(tmp_path, model=model, optimizer=opt)["step"] == 2


def test_a_version_1_checkpoint_without_checksum_still_loads(tmp_path):
    model, opt, sched = _trained()
    path = checkpoint.save(tmp_path, model=model, optimizer=opt, step=2)
    (path / "manifest.sha256").unlink()
    with pytest.raises(fmt.CheckpointError, match="has no manifest.sha256"):
        checkpoint.load(tmp_path, model=model, optimizer=opt)
    _edit(path, lambda m: m.update(format_version=1), checksum=False)
    assert checkpoint.load(tmp_path, model=model, optimizer=opt)["step"] == 2
