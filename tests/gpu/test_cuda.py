"""The GPU path, on one CUDA device (skipped without one): placement, GPU-vs-CPU parity, no host
sync in the step, device-agnostic checkpoints, offload and meta construction on CUDA. Multi-rank
behaviour is proven by the CPU suite (NCCL refuses two ranks on one GPU); these run world 1."""
from __future__ import annotations

import pytest
import torch

import zerotrain
from zerotrain.model import GPT, GPTConfig

pytestmark = pytest.mark.cuda
CFG = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=64)


def _losses(device, stage, *, steps=5, precision=None, offload=None, meta=False):
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            model = GPT(CFG)
    else:
        model = GPT(CFG)                              # built on the CPU, moved by shard_model
    zerotrain.shard_model(model, stage=stage, mesh=zerotrain.Mesh.single(device), mixed_precision=precision)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-2, max_grad_norm=1.0, offload=offload)
    out = []
    for step in range(steps):
        x = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=torch.Generator().manual_seed(step))
        x = x.pin_memory().to(device, non_blocking=True) if device != "cpu" else x
        loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out, model, opt


@pytest.mark.parametrize("stage", [0, 3])
def test_gpu_matches_cpu_for_the_first_five_losses(stage):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu, _, _ = _losses("cpu", stage)
    gpu, model, _ = _losses("cuda", stage)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert gpu == pytest.approx(cpu, abs=1e-4, rel=1e-4)


def test_step_has_no_host_sync():
    _, model, opt = _losses("cuda", 3, steps=1, precision="bf16")
    x = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), device="cuda")
    model(x, x).backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        info = opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert info.grad_norm > 0


def test_offload_keeps_master_on_pinned_host_and_trains_the_same():
    plain, _, _ = _losses("cuda", 3)
    off, model, opt = _losses("cuda", 3, offload="cpu")
    assert off == pytest.approx(plain, abs=1e-6, rel=1e-6)
    units = model.zero_state.units
    assert all(u.master.device.type == "cpu" and u.master.is_pinned() for u in units)
    report = zerotrain.memory_report(model, opt)
    assert report["host"] >= report["master"] + report["optimizer_states"] > 0


def test_meta_build_on_cuda_equals_the_dense_cuda_build():
    torch.manual_seed(0)
    with torch.device("cuda"):
        dense = GPT(CFG)
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = GPT(CFG)
    zerotrain.shard_model(meta, stage=3, mesh=zerotrain.Mesh.single("cuda"))
    got = meta.full_state_dict()
    assert all(torch.equal(got[k], v) for k, v in dense.state_dict().items())


def test_checkpoint_saved_on_gpu_loads_on_cpu_and_back(tmp_path):
    from zerotrain import checkpoint
    gpu, model, opt = _losses("cuda", 3, steps=2)
    checkpoint.save(tmp_path, model=model, optimizer=opt, step=2)
    for device in ("cpu", "cuda"):
        torch.manual_seed(1)
        other = zerotrain.shard_model(GPT(CFG), stage=1, mesh=zerotrain.Mesh.single(device))
        checkpoint.load(tmp_path, model=other)
        a, b = model.full_state_dict(), other.full_state_dict()
        assert all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a), device


def test_initialize_puts_the_module_on_the_local_gpu():
    cfg = {"train_batch_size": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    engine, *_ = zerotrain.initialize(model=GPT(CFG), config=cfg)
    assert engine.device == torch.device("cuda", 0) and engine.local_rank == 0
    assert all(p.device == engine.device for p in engine.module.parameters())
    x = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), device=engine.device)
    loss = engine(x, x)
    engine.backward(loss)
    engine.step()
