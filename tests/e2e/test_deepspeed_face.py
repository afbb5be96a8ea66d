"""A script written for DeepSpeed's API runs unchanged with ``import zerotrain as deepspeed``:
HuggingFace GPT2LMHeadModel at stages 0-3, world size 2 under torchrun (one node, and two
simulated nodes), matching a single-process reference."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import deepspeed_train as script  # noqa: E402

STEPS, WORLD, MICRO, GAS, SEED = 3, 2, 2, 2, 7


def _config(tmp_path, stage):
    cfg = {"train_batch_size": MICRO * GAS * WORLD, "train_micro_batch_size_per_gpu": MICRO,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
           "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "seed": SEED}
    path = tmp_path / f"ds_stage{stage}.json"
    path.write_text(json.dumps(cfg))
    return path


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _torchrun(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finish(procs, timeout=240):
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("torchrun did not finish in time")
        assert p.returncode == 0, out[-4000:]


def _losses(out):
    ranks = [json.loads(open(f"{out}.rank{r}").read()) for r in range(WORLD)]
    per_step = []
    for s in range(STEPS):
        micro = [x for rank in ranks for x in rank["losses"][s * GAS:(s + 1) * GAS]]
        per_step.append(sum(micro) / len(micro))
    return per_step, ranks


def reference_losses():
    """Single process, whole global batch per step, the same samples DistributedSampler deals."""
    from torch.utils.data import DistributedSampler
    data = script.RandomTokens()
    model = script.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    per_rank = [list(DistributedSampler(data, num_replicas=WORLD, rank=r, seed=SEED)) for r in range(WORLD)]
    losses = []
    for s in range(STEPS):
        idx = [i for r in range(WORLD) for i in per_rank[r][s * GAS * MICRO:(s + 1) * GAS * MICRO]]
        x = data.data[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def reference():
    return reference_losses()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_unchanged_deepspeed_script_matches_reference(tmp_path, reference, stage):
    out = tmp_path / "losses"
    p = _torchrun(["--standalone", f"--nproc-per-node={WORLD}", os.path.join(ROOT, "examples/deepspeed_train.py"),
                   "--deepspeed_config", str(_config(tmp_path, stage)), "--steps", str(STEPS), "--out", str(out)])
    _finish([p])
    got, ranks = _losses(out)
    assert got == pytest.approx(reference, rel=1e-5, abs=1e-6), (stage, got, reference)
    assert ranks[0]["grad_norm"] == pytest.approx(ranks[1]["grad_norm"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_simulated_nodes_match_one_node(tmp_path, reference):
    """--nnodes 2 on one host with a c10d rendezvous on 127.0.0.1: the same run as one node."""
    out = tmp_path / "losses"
    port = _free_port()
    cfg = _config(tmp_path, 3)
    procs = [_torchrun(["--nnodes=2", "--nproc-per-node=1", f"--node-rank={n}", "--rdzv-backend=c10d",
                        f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=zt-two-nodes",
                        os.path.join(ROOT, "examples/deepspeed_train.py"), "--deepspeed_config", str(cfg),
                        "--steps", str(STEPS), "--out", str(out)]) for n in range(2)]
    _finish(procs)
    got, ranks = _losses(out)
    assert all(r["world"] == 2 for r in ranks)
    assert got == pytest.approx(reference, rel=1e-5, abs=1e-6)
