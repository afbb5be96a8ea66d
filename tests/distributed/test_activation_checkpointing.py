"""Activation checkpointing per unit: the GPT trains bitwise the same losses and gradient norms with
and without it — fp32 at stages 0 and 3, over dp and over tp, bf16 with gradient accumulation.
It adds no ZeRO collective (stage 3 gathers a unit for its backward anyway); with tensor
parallelism the recompute repeats each block's two forward all-reduces, and comm_report counts
exactly those."""
from __future__ import annotations

import pytest
import torch

import zerotrain
from harness import spawn
from zerotrain.model import GPT, GPTConfig
from zerotrain.parallel.tensor import apply_tensor_parallel

CFG = dict(vocab_size=37, block_size=16, n_layer=3, n_head=4, n_embd=32, dropout=0.1)
GLOBAL, STEPS = 8, 3


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, CFG["vocab_size"], (GLOBAL, CFG["block_size"]), generator=g)
    return x, torch.roll(x, -1, dims=1)


def _run(mesh, *, stage, recompute, precision=None, accum=1):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG))
    if mesh.tp > 1:
        apply_tensor_parallel(model, mesh.tp_group)
    zerotrain.shard_model(model, stage=stage, mesh=mesh, mixed_precision=precision,
                          activation_checkpointing=recompute)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=3e-3, max_grad_norm=1.0)
    torch.manual_seed(1 + mesh.dp_rank)          # dropout masks: per dp rank, equal over tp
    per, micro = GLOBAL // mesh.dp, GLOBAL // mesh.dp // accum
    losses, norms = [], []
    zerotrain.reset_comm_report()
    for step in range(STEPS):
        x, y = _batch(step)
        x, y = x[mesh.dp_rank * per:(mesh.dp_rank + 1) * per], y[mesh.dp_rank * per:(mesh.dp_rank + 1) * per]
        for k in range(accum):
            loss = model(x[k * micro:(k + 1) * micro], y[k * micro:(k + 1) * micro]) / accum
            loss.backward()
            losses.append(loss.item())
        norms.append(opt.step().grad_norm)
        opt.zero_grad()
    comm = {k: (v["calls"], v["bytes"]) for k, v in zerotrain.comm_report().items()}
    return losses, norms, comm, len(model.zero_state.recomputed)


def worker(mesh, settings):
    return {name: (_run(mesh, recompute=False, **kw), _run(mesh, recompute=True, **kw))
            for name, kw in settings.items()}


SETTINGS = {
    "s0": dict(stage=0), "s3": dict(stage=3),
    "s3-bf16-accum2": dict(stage=3, precision="bf16", accum=2),
    "s1-accum2": dict(stage=1, accum=2),
}


@pytest.mark.parametrize("tp", [1, 2])
def test_recompute_per_unit_is_bitwise_invisible(tp):
    settings = SETTINGS if tp == 1 else {k: SETTINGS[k] for k in ("s0", "s3")}
    for rank, result in enumerate(spawn(worker, 2, settings, tp=tp, timeout=300)):
        for name, (plain, recomputed) in result.items():
            assert recomputed[3] == CFG["n_layer"] and plain[3] == 0, "every block, and only blocks"
            assert recomputed[0] == plain[0], (tp, rank, name, "losses")
            assert recomputed[1] == plain[1], (tp, rank, name, "gradient norms")
            extra = {k: (c - plain[2][k][0], b - plain[2][k][1]) for k, (c, b) in recomputed[2].items()}
            if tp == 1:
                assert extra == {k: (0, 0) for k in plain[2]}, (rank, name, extra)
            else:         # per block and step: 2 all-reduces of the (B, T, C) activations, fp32
                calls = 2 * CFG["n_layer"] * STEPS
                act_bytes = GLOBAL * CFG["block_size"] * CFG["n_embd"] * 4
                assert extra == {"all_reduce": (calls, calls * 2 * act_bytes)}, (rank, name, extra)
