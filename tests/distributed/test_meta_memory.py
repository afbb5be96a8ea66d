"""Meta construction's memory: building a GPT whose fp32 weights are over 2 GB at ZeRO stage 3,
each rank's peak RSS stays within 1.2× of (its runtime before sharding + its own shard of the
model states + two units), at world 2 and 4 — never the whole model."""
from __future__ import annotations


import pytest
import torch

import zerotrain
from harness import peak_rss_bytes, spawn, status_bytes
from zerotrain.model import GPT, GPTConfig

# 10 blocks of 50.3M parameters + a 16.9M root: 520M parameters, 2.08 GB in fp32
BIG = GPTConfig(vocab_size=8192, block_size=64, n_layer=10, n_head=16, n_embd=2048)


def memory_worker(mesh):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(BIG)
    before = status_bytes("VmRSS")
    zerotrain.shard_model(model, stage=3, mesh=mesh)
    peak = peak_rss_bytes()
    zs = model.zero_state
    kept = zerotrain.memory_report(model)["total"]
    unit = max(u.layout.padded for u in zs.units) * 4
    x = torch.randint(0, BIG.vocab_size, (1, 8))
    with torch.no_grad():
        finite = bool(torch.isfinite(model(x)).all())
    numel = sum(u.layout.numel for u in zs.units)
    return {"before": before, "peak": peak, "kept": kept, "unit": unit, "numel": numel, "finite": finite}


@pytest.mark.parametrize("world", [2, 4])
def test_meta_build_holds_one_shard_and_two_units_not_the_model(world):
    for rank, r in enumerate(spawn(memory_worker, world, timeout=300)):
        assert r["numel"] * 4 > 2e9, "the model's fp32 weights are over 2 GB"
        budget = r["before"] + r["kept"] + 2 * r["unit"]
        assert r["peak"] <= 1.2 * budget, (rank, {k: round(v / 2**20) for k, v in r.items() if k != "finite"})
        assert r["kept"] < 8.5 * r["numel"] / world, "params + grads shards (fp32): 8 bytes / N per parameter"
        assert r["finite"]
