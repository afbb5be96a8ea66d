"""ZeRO-Offload: master weights and optimizer state in host memory, the step on the CPU. The losses
and weights equal the non-offloaded run (fp32 to 1e-6, bf16 within its rounding) at stages 1-3.

On a CPU-only machine offload moves nothing (the device is the host); these tests make the unit
treat the CPU as a device to move from, so the whole path runs for real: a separate host master,
gradients copied to host buffers as their reductions complete, the step on the host copy, and
the updated values copied back into the parameters."""
from __future__ import annotations

import pytest
import torch

import zerotrain
from harness import spawn
from zerotrain.model import GPT, GPTConfig
from zerotrain.parallel.zero import offload as offload_mod
from zerotrain.parallel.zero.unit import MasterStorage

CFG = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32)


def _train(mesh, stage, precision, offload, accum=2, steps=4):
    torch.manual_seed(0)
    model = zerotrain.shard_model(GPT(CFG), stage=stage, mesh=mesh, mixed_precision=precision)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5,
                                     offload=offload)
    losses = []
    for step in range(steps):
        x = torch.randint(0, CFG.vocab_size, (8, CFG.block_size), generator=torch.Generator().manual_seed(step))
        x = x[mesh.dp_rank::mesh.dp]
        for k in range(accum):
            loss = model(x[k::accum], torch.roll(x[k::accum], -1, 1)) / accum
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    storage = {u.master_storage for u in model.zero_state.units}
    report = zerotrain.memory_report(model, opt)
    return losses, model.full_state_dict(), storage, report


def offload_worker(mesh):
    offload_mod.moves_to_host = lambda device: True      # the CPU stands in for a device
    out = {}
    for stage in (1, 2, 3):
        for precision in (None, "bf16"):
            out[stage, precision] = (_train(mesh, stage, precision, None), _train(mesh, stage, precision, "cpu"))
    return out


def test_offloaded_step_trains_like_the_device_step():
    for rank, res in enumerate(spawn(offload_worker, 2, timeout=300)):
        for (stage, precision), (plain, off) in res.items():
            tol = 1e-6 if precision is None else 2e-2
            assert off[0] == pytest.approx(plain[0], rel=tol, abs=tol), (rank, stage, precision)
            for k, v in plain[1].items():
                torch.testing.assert_close(off[1][k], v, rtol=tol, atol=tol)
            assert off[2] == {MasterStorage.HOST}, "the master lives in its own host buffer"
            report = off[3]
            assert report["host"] == report["master"] + report["optimizer_states"] + report["grads_host"] \
                + (report["total"] - report["model_states"] - report["buffers"] - report["comm_buffers"]
                   - report["grads_host"])
            assert report["master"] > 0 and report["grads_host"] > 0 and plain[3]["host"] == 0


def test_offload_on_a_cpu_run_only_changes_the_accounting():
    torch.manual_seed(0)
    model = zerotrain.shard_model(GPT(CFG), stage=2)
    before = {u: u.master.data_ptr() for u in model.zero_state.units}
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-2, offload="cpu")
    assert all(u.master.data_ptr() == before[u] and u.host.grads is None for u in model.zero_state.units)
    x = torch.randint(0, CFG.vocab_size, (2, CFG.block_size))
    model(x, x).backward()
    opt.step()
    report = zerotrain.memory_report(model, opt)
    assert report["host"] >= report["optimizer_states"] > 0 and report["device"] == report["total"] - report["host"]
    with pytest.raises(ValueError, match="offload='nvme'"):
        zerotrain.ShardedOptimizer(model, torch.optim.AdamW, offload="nvme")
