"""The planner against real runs: world size 2, a 13.8M-parameter GPT, every ZeRO stage.

Each stage runs in a fresh pair of spawned ranks, so ``ru_maxrss`` is that run's own peak. The
planner's model-state bytes must be within 5% of the bytes counted from live tensors
(``memory_report``), its peak RSS within 20% of ``ru_maxrss``, and its communication volume within
1% of ``comm_report()`` (the extra is the grad-norm scalars).

The peak RSS includes what the process holds besides tensors; the planner's
``DEFAULT_RUNTIME_OVERHEAD_BYTES`` stands for it. Measured here (torch 2.13 CPU): 237 MiB after
``import torch`` in a spawned rank, 327 MiB once that rank has run one forward of a tiny GPT
(kernel code pages and lazily built CPU kernels), whatever the model size.
"""
from __future__ import annotations

import resource

import pytest
import torch

import zerotrain
from harness import spawn
from zerotrain.model import GPT, GPTConfig
from zerotrain.planner import ModelSpec, plan

CONFIG = GPTConfig(vocab_size=8192, block_size=64, n_layer=6, n_head=6, n_embd=384)
MICRO_BATCH = 4
STEPS = 2


def _train(mesh, mixed_precision, steps):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    zerotrain.shard_model(model, stage=_train.stage, mesh=mesh, mixed_precision=mixed_precision)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-3)
    g = torch.Generator().manual_seed(mesh.rank)
    for step in range(steps):
        x = torch.randint(0, CONFIG.vocab_size, (MICRO_BATCH, CONFIG.block_size + 1), generator=g)
        zerotrain.reset_comm_report()
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        if step == steps - 1:      # after the update, before zero_grad gives the gradients back
            states = zerotrain.memory_report(model, opt)["model_states"]
        opt.zero_grad()
    comm = sum(v["bytes"] for k, v in zerotrain.comm_report().items() if k != "all_gather_object")
    return states, comm


def measure(mesh, stage):
    """fp32 first (its peak RSS is this fresh process's), then a bf16 model for its model states."""
    _train.stage = stage
    fp32_states, fp32_comm = _train(mesh, None, STEPS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bf16_states, bf16_comm = _train(mesh, "bf16", 1)
    return {"fp32": (fp32_states, fp32_comm), "bf16": (bf16_states, bf16_comm), "peak_rss": peak}


@pytest.fixture(scope="module")
def spec():
    with torch.device("meta"):
        model = GPT(CONFIG)
    return ModelSpec.from_module(model, n_layer=CONFIG.n_layer, n_embd=CONFIG.n_embd,
                                 n_head=CONFIG.n_head, vocab_size=CONFIG.vocab_size,
                                 block_size=CONFIG.block_size)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_planner_matches_measured(stage, spec, monkeypatch):
    # freed multi-MB tensors go back to the OS, so peak RSS follows the live tensors (DESIGN §4)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    results = spawn(measure, 2, stage, timeout=120)
    assert 13_000_000 < spec.numel() < 15_000_000
    for rank, res in enumerate(results):
        for dtype in ("fp32", "bf16"):
            p = plan(spec, stage=stage, dp=2, param_dtype=dtype, micro_batch=MICRO_BATCH,
                     seq_len=CONFIG.block_size)
            states, comm = res[dtype]
            assert states == pytest.approx(p.model_states_bytes, rel=0.05), (rank, dtype, states, p)
            assert comm == pytest.approx(p.comm.dp_bytes, rel=0.01), (rank, dtype, comm, p.comm)
        p = plan(spec, stage=stage, dp=2, param_dtype="fp32", micro_batch=MICRO_BATCH,
                 seq_len=CONFIG.block_size)
        assert res["peak_rss"] == pytest.approx(p.peak_rss_bytes, rel=0.20), (
            f"rank {rank} stage {stage}: measured peak RSS {res['peak_rss'] / 2**20:.0f} MiB, planned "
            f"{p.peak_rss_bytes / 2**20:.0f} MiB = model states {p.model_states_bytes / 2**20:.0f} + buffers "
            f"{p.comm_buffers_bytes / 2**20:.0f} + activations {p.activations_bytes / 2**20:.0f} + runtime "
            f"{p.runtime_overhead_bytes / 2**20:.0f}")
