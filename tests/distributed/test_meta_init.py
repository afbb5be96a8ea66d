"""Models built on the meta device: shard_model materialises them unit by unit with bitwise the
dense build's weights (every stage, dp and tp), trains the same losses, and the DeepSpeed face's
zero.Init / GatheredParameters work on top of it."""
from __future__ import annotations

import pytest
import torch

import zerotrain
from harness import spawn
from zerotrain.model import GPT, GPTConfig
from zerotrain.parallel.tensor import apply_tensor_parallel

CFG = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32)


def _build(mesh, *, stage, meta, precision=None):
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            model = GPT(CFG)
    else:
        model = GPT(CFG)
    if mesh.tp > 1:
        apply_tensor_parallel(model, mesh.tp_group)
    return zerotrain.shard_model(model, stage=stage, mesh=mesh, mixed_precision=precision)


def _losses(model, mesh, steps=3):
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-2)
    out = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=g)[mesh.dp_rank::mesh.dp]
        loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def meta_worker(mesh):
    out = {}
    for stage in (0, 1, 2, 3):
        dense, meta = _build(mesh, stage=stage, meta=False), _build(mesh, stage=stage, meta=True)
        a, b = dense.full_state_dict(), meta.full_state_dict()
        same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        units = [(u.master.clone(), (u.shard if u.shard is not None else u.full).clone())
                 for u in meta.zero_state.units]
        same_shards = all(torch.equal(m, d.master) and torch.equal(s, d.shard if d.shard is not None else d.full)
                          for (m, s), d in zip(units, dense.zero_state.units))
        out[stage] = (same, same_shards, meta.lm_head.weight is meta.wte.weight,
                      _losses(dense, mesh) == _losses(meta, mesh))
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_meta_build_equals_dense_build_bitwise(tp):
    for rank, res in enumerate(spawn(meta_worker, 2, tp=tp, timeout=240)):
        for stage, (weights, shards, tied, losses) in res.items():
            assert weights, (tp, rank, stage, "full weights")
            assert shards, (tp, rank, stage, "this rank's shard and master")
            assert tied, (tp, rank, stage, "tied embedding stays one parameter")
            assert losses, (tp, rank, stage, "losses")


def gathered_worker(mesh):
    import zerotrain.zero as zero
    model = _build(mesh, stage=3, meta=True, precision="bf16")
    torch.manual_seed(0)
    dense = GPT(CFG).to(torch.bfloat16)
    w = model.blocks[1].mlp.c_fc.weight
    outside = w.untyped_storage().nbytes()
    with zero.GatheredParameters(w):
        read = torch.equal(w, dense.blocks[1].mlp.c_fc.weight)
    with zero.GatheredParameters([w, model.wte.weight], modifier_rank=1), torch.no_grad():
        if mesh.rank == 1:
            w.fill_(0.5)
    with zero.GatheredParameters(w):
        kept = bool((w == 0.5).all())
    mine = [s.master for s in model.zero_state.owned_slices() if s.param is w]
    return outside, read, kept, bool(mine) and all(bool((m == 0.5).all()) for m in mine)


def test_gathered_parameters_reads_and_writes_back_through_the_modifier_rank():
    for rank, (outside, read, kept, master) in enumerate(spawn(gathered_worker, 2, timeout=120)):
        assert outside == 0, (rank, "stage 3 holds no full copy outside the block")
        assert read, (rank, "gathered values are the dense build's")
        assert kept, (rank, "rank 1's change reached every rank")
        assert master, (rank, "and the fp32 master of this rank's slice")


def test_zero_init_through_initialize_trains_like_a_dense_model():
    import zerotrain.zero as zero
    cfg = {"train_batch_size": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "zero_optimization": {"stage": 3}}
    torch.manual_seed(0)
    with zero.Init():
        model = GPT(CFG)
    assert all(p.is_meta for p in model.parameters())
    engine, *_ = zerotrain.initialize(model=model, config=cfg)
    torch.manual_seed(0)
    ref, *_ = zerotrain.initialize(model=GPT(CFG), config=cfg)
    for step in range(2):
        x = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=torch.Generator().manual_seed(step))
        losses = []
        for e in (engine, ref):
            loss = e(x, torch.roll(x, -1, 1))
            e.backward(loss)
            e.step()
            losses.append(loss.item())
        assert losses[0] == losses[1]


def full_state_worker(mesh, path):
    from zerotrain.parallel.tensor import shard_like
    torch.manual_seed(5)
    trained = GPT(CFG)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)                      # anything but the seed's weights
    dense = {k: v.clone() for k, v in trained.state_dict().items()}
    if mesh.rank == 0:
        from safetensors.torch import save_file
        save_file({k: v for k, v in dense.items() if k != "lm_head.weight"}, path)
    out = {}
    for stage in (1, 3):
        for source in ("dict", "file"):
            model = _build(mesh, stage=stage, meta=True)
            comm_barrier(mesh)
            model.load_full_state_dict(dense if source == "dict" else path)
            got, live = model.full_state_dict(), model.state_dict(keep_vars=True)
            out[stage, source] = all(torch.equal(got[k], shard_like(dense[k], live[k])) for k in got)
    return out


def comm_barrier(mesh):
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


@pytest.mark.parametrize("tp", [1, 2])
def test_full_state_dict_loads_unit_by_unit_at_any_stage_and_tp(tmp_path, tp):
    results = spawn(full_state_worker, 2, str(tmp_path / "model.safetensors"), tp=tp, timeout=180)
    for rank, out in enumerate(results):
        assert all(out.values()), (tp, rank, out)
