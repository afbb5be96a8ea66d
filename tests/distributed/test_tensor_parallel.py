"""Tensor-parallel layers, loss and GPT plan equal their dense counterparts (fp64, tp ∈ {1, 2, 4}).

One 4-rank spawn runs the whole grid at tp=4 and then on a dp=2 × tp=2 mesh (two tp groups side by
side); tp=1 runs in-process with ``group=None``. Every rank rebuilds the dense reference from the
same seed and compares its own shard with the dense slice.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import spawn

from zerotrain.distributed import comm
from zerotrain.distributed.mesh import Mesh
from zerotrain.model import GPT, GPTConfig
from zerotrain.parallel.tensor import (ColumnParallelLinear, RowParallelLinear,
                                       VocabParallelCrossEntropy, VocabParallelEmbedding,
                                       apply_tensor_parallel, gather_logits, shard_like,
                                       shard_tensor, unshard_tensors)

F64 = torch.float64


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12,
                               msg=lambda m: f"{what}: {m}")


def _tp_slice(full, mesh, chunks=1):
    return shard_tensor(full, dim=-1, size=mesh.tp, rank=mesh.tp_rank, chunks=chunks)


# ---------------------------------------------------------------- layers

def _check_column(mesh, in_f, out_f, *, bias, gather_output, chunks=1):
    torch.manual_seed(out_f * 7 + chunks)
    dense = nn.Linear(in_f, out_f, bias=bias, dtype=F64)
    x = torch.randn(2, 3, in_f, dtype=F64, requires_grad=True)
    gy = torch.randn(2, 3, out_f, dtype=F64)
    layer = ColumnParallelLinear.from_dense(dense, group=mesh.tp_group, gather_output=gather_output,
                                            chunks=chunks)
    xt = x.detach().clone().requires_grad_()
    (dense(x) * gy).sum().backward()
    yt = layer(xt)
    name = f"column(out={out_f}, bias={bias}, gather={gather_output}, chunks={chunks})"
    expected = dense(x).detach()
    if not gather_output:                       # own shard, padding columns are zero
        expected, gy = _tp_slice(expected, mesh, chunks), _tp_slice(gy, mesh, chunks)
    _close(yt, expected, f"{name} output")
    (yt * gy).sum().backward()
    _close(xt.grad, x.grad, f"{name} input grad")
    _close(layer.weight.grad, shard_like(dense.weight.grad, layer.weight), f"{name} weight grad")
    if bias:
        _close(layer.bias.grad, shard_like(dense.bias.grad, layer.bias), f"{name} bias grad")
    assert layer.out_features == (out_f if gather_output else layer.weight.shape[0])
    return name


def _check_row(mesh, in_f, out_f, *, bias, input_is_parallel):
    torch.manual_seed(in_f * 3 + out_f)
    dense = nn.Linear(in_f, out_f, bias=bias, dtype=F64)
    x = torch.randn(2, 3, in_f, dtype=F64, requires_grad=True)
    gy = torch.randn(2, 3, out_f, dtype=F64)
    layer = RowParallelLinear.from_dense(dense, group=mesh.tp_group, input_is_parallel=input_is_parallel)
    xt = (_tp_slice(x.detach(), mesh) if input_is_parallel else x.detach().clone()).requires_grad_()
    (dense(x) * gy).sum().backward()
    yt = layer(xt)
    name = f"row(in={in_f}, bias={bias}, input_is_parallel={input_is_parallel})"
    _close(yt, dense(x).detach(), f"{name} output")
    (yt * gy).sum().backward()
    gx = _tp_slice(x.grad, mesh) if input_is_parallel else x.grad
    _close(xt.grad, gx, f"{name} input grad")
    _close(layer.weight.grad, shard_like(dense.weight.grad, layer.weight), f"{name} weight grad")
    if bias:
        assert not hasattr(layer.bias, "_zt_tp_dim"), "row bias must be replicated"
        _close(layer.bias.grad, dense.bias.grad, f"{name} bias grad")
    return name


def _check_embedding(mesh, vocab, dim=6):
    torch.manual_seed(vocab)
    dense = nn.Embedding(vocab, dim, dtype=F64)
    idx = torch.cat([torch.arange(vocab), torch.randint(0, vocab, (vocab,))]).view(2, vocab)
    g = torch.randn(2, vocab, dim, dtype=F64)
    layer = VocabParallelEmbedding.from_dense(dense, group=mesh.tp_group)
    (dense(idx) * g).sum().backward()
    out = layer(idx)
    _close(out, dense(idx).detach(), f"embedding(vocab={vocab}) output")
    (out * g).sum().backward()
    _close(layer.weight.grad, shard_like(dense.weight.grad, layer.weight),
           f"embedding(vocab={vocab}) weight grad")
    real = layer.vocab_end - layer.vocab_start
    assert layer.weight.shape[0] * mesh.tp >= vocab and not layer.weight[real:].any()
    return f"embedding(vocab={vocab})"


def _check_unshard(mesh):
    full = torch.arange(37 * 6, dtype=F64).view(37, 6)
    shards = [shard_tensor(full, dim=0, size=mesh.tp, rank=r) for r in range(mesh.tp)]
    assert torch.equal(unshard_tensors(shards, dim=0, full=37), full)
    fused = torch.arange(24 * 5, dtype=F64).view(24, 5)
    shards = [shard_tensor(fused, dim=0, size=mesh.tp, rank=r, chunks=3) for r in range(mesh.tp)]
    assert torch.equal(unshard_tensors(shards, dim=0, full=24, chunks=3), fused)
    return "unshard"


def _layer_grid(mesh):
    done = [_check_unshard(mesh)]
    for out_f, bias, gather in [(12, True, False), (12, False, True), (37, True, False), (37, True, True)]:
        done.append(_check_column(mesh, 8, out_f, bias=bias, gather_output=gather))
    done.append(_check_column(mesh, 8, 24, bias=True, gather_output=False, chunks=3))
    for bias, parallel in [(True, True), (False, True), (True, False)]:
        done.append(_check_row(mesh, 12, 7, bias=bias, input_is_parallel=parallel))
    for vocab in (37, 40, 5):
        done.append(_check_embedding(mesh, vocab))
    return done


# ---------------------------------------------------------------- loss

def _check_loss(mesh, vocab, ignore_index):
    torch.manual_seed(vocab + 1000)
    logits = (3 * torch.randn(3, 5, vocab, dtype=F64)).requires_grad_()
    targets = torch.randint(0, vocab, (3, 5))
    targets[0, :2] = ignore_index
    targets[1, 0], targets[1, 1] = 0, vocab - 1
    expected = F.cross_entropy(logits.view(-1, vocab), targets.view(-1), ignore_index=ignore_index)
    expected.backward()
    loss_fn = VocabParallelCrossEntropy(vocab, group=mesh.tp_group, ignore_index=ignore_index)
    shard = _tp_slice(logits.detach(), mesh)
    shard[..., loss_fn.vocab_end - loss_fn.vocab_start:] = 50.0     # padding must not count
    shard.requires_grad_()
    loss = loss_fn(shard, targets)
    name = f"vocab_parallel_ce(vocab={vocab}, ignore_index={ignore_index})"
    _close(loss, expected.detach(), f"{name} value")
    loss.backward()
    _close(shard.grad, _tp_slice(logits.grad, mesh), f"{name} grad")
    return name


def _check_loss_per_target(mesh, vocab=37):
    """reduction="none": each target's loss, and the gradient of any weighting of them."""
    torch.manual_seed(7)
    logits = (3 * torch.randn(3, 5, vocab, dtype=F64)).requires_grad_()
    targets = torch.randint(0, vocab, (3, 5))
    targets[0, :2] = -100
    weights = torch.rand(15, dtype=F64)
    expected = F.cross_entropy(logits.view(-1, vocab), targets.view(-1), reduction="none")
    (expected * weights).sum().backward()
    loss_fn = VocabParallelCrossEntropy(vocab, group=mesh.tp_group)
    shard = _tp_slice(logits.detach(), mesh).requires_grad_()
    loss = loss_fn(shard, targets, reduction="none")
    assert loss.shape == (15,)
    _close(loss, expected.detach(), "per-target vocab_parallel_ce value")
    (loss * weights).sum().backward()
    _close(shard.grad, _tp_slice(logits.grad, mesh), "per-target vocab_parallel_ce grad")
    return "per-target loss"


def _loss_grid(mesh):
    return [_check_loss(mesh, v, ii) for v, ii in [(37, -100), (40, -100), (5, -100), (37, 3)]] + \
        [_check_loss_per_target(mesh)]


# ---------------------------------------------------------------- GPT

def _tiny_gpt(n_head=4, n_embd=32, vocab=37, copy_head=False):
    torch.manual_seed(1234)
    cfg = GPTConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=n_head, n_embd=n_embd, copy_head=copy_head)
    return GPT(cfg).to(F64)


def _gpt_batch(vocab=37):
    gen = torch.Generator().manual_seed(99)
    idx = torch.randint(0, vocab, (2, 16), generator=gen)
    targets = torch.randint(0, vocab, (2, 16), generator=gen)
    targets[0, :3] = -100
    return idx, targets


def _collectives_per_step(mesh, n_layer, tokens, d):
    """all-reduces of one forward + backward: expected (calls, bytes) at this tp degree."""
    if mesh.tp == 1:
        return 0, 0
    act = tokens * d * 8 * 2                 # fp64, all-reduce volume factor 2
    # forward: embedding 1 + 2 per block (row outputs) + loss 2 (max of N, sums of 2N)
    # backward: 2 per block (column inputs) + lm_head input 1; embedding and loss add none
    calls = 1 + 2 * n_layer + 2 + 2 * n_layer + 1
    nbytes = (1 + 4 * n_layer + 1) * act + tokens * 8 * 2 + 2 * tokens * 8 * 2
    return calls, nbytes


def _check_gpt_grads(mesh, dense, model, idx, targets):
    for name, p in model.named_parameters():
        _close(p.detach(), shard_like(dense.get_parameter(name).detach(), p), f"init {name}")
    assert model.lm_head.weight is model.wte.weight, "tie lost"
    clone = copy.deepcopy(model)
    assert clone.lm_head.weight is clone.wte.weight, "tie lost by deepcopy"
    assert (clone.wte.weight._zt_tp_dim, clone.blocks[0].attn.c_proj.weight._zt_tp_dim) == (0, 1)
    assert clone.blocks[0].attn.c_attn.weight._zt_tp_chunks == 3
    assert not hasattr(clone.blocks[0].attn.c_proj.bias, "_zt_tp_dim")
    (dense_loss := dense(idx, targets)).backward()
    comm.reset_comm_report()
    loss = model(idx, targets)
    loss.backward()
    report = comm.comm_report()
    _close(loss, dense_loss.detach(), "gpt loss")
    for name, p in model.named_parameters():
        _close(p.grad, shard_like(dense.get_parameter(name).grad, p), f"gpt grad {name}")
    calls, nbytes = _collectives_per_step(mesh, 2, idx.numel(), 32)
    got = report.get("all_reduce", {"calls": 0, "bytes": 0})
    assert (got["calls"], got["bytes"]) == (calls, nbytes), f"collectives {report}"
    assert set(report) <= {"all_reduce"}, f"unexpected collectives {report}"
    with torch.no_grad():
        full = gather_logits(model(idx), mesh.tp_group, vocab_size=37)
        _close(full, dense(idx), "gathered logits")


def _check_gpt_training(dense, model, idx, targets, steps=3):
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.5)
    opt_t = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(steps):
        for m, opt in ((dense, opt_d), (model, opt_t)):
            opt.zero_grad(set_to_none=True)
            m(idx, targets).backward()
            opt.step()
        with torch.no_grad():
            _close(model(idx, targets), dense(idx, targets), f"loss after step {step + 1}")
    for name, p in model.named_parameters():
        _close(p.detach(), shard_like(dense.get_parameter(name).detach(), p), f"trained {name}")


def _gpt_grid(mesh):
    idx, targets = _gpt_batch()
    dense = _tiny_gpt()
    model = apply_tensor_parallel(copy.deepcopy(dense), mesh.tp_group)
    _check_gpt_grads(mesh, dense, model, idx, targets)
    dense, model = _tiny_gpt(), apply_tensor_parallel(_tiny_gpt(), mesh.tp_group)
    _check_gpt_training(dense, model, idx, targets)
    done = ["gpt grads", "gpt training", _check_copy_head(mesh, idx, targets)]
    if mesh.tp > 1:
        bad = _tiny_gpt(n_head=mesh.tp + 1, n_embd=8 * (mesh.tp + 1))
        with pytest.raises(ValueError, match=f"n_head={mesh.tp + 1} is not divisible by tp={mesh.tp}"):
            apply_tensor_parallel(bad, mesh.tp_group)
        assert isinstance(bad.wte, nn.Embedding) and not isinstance(bad.wte, VocabParallelEmbedding)
        done.append("heads not divisible")
    return done


def _check_copy_head(mesh, idx, targets):
    """A GPT with a copy head: tp gives the dense loss and gradients (the copy head replicated, its
    mixture fed by the vocabulary-parallel per-target loss), also when training; the full output
    distribution needs tp=1 and says so."""
    dense = _tiny_gpt(copy_head=True)
    model = apply_tensor_parallel(copy.deepcopy(dense), mesh.tp_group)
    for labelled_only in (False, True):
        dense.zero_grad(set_to_none=True), model.zero_grad(set_to_none=True)
        (dense_loss := dense(idx, targets, labelled_only=labelled_only)).backward()
        (loss := model(idx, targets, labelled_only=labelled_only)).backward()
        _close(loss, dense_loss.detach(), f"copy-head loss (labelled_only={labelled_only})")
        for name, p in model.named_parameters():
            _close(p.grad, shard_like(dense.get_parameter(name).grad, p), f"copy-head grad {name}")
    assert dense.copy_head.gate.weight.grad.abs().sum() > 0
    _check_gpt_training(dense, model, idx, targets)
    with torch.no_grad():
        if mesh.tp > 1:
            with pytest.raises(NotImplementedError, match="tp=1"):
                model(idx)
        else:
            _close(model(idx), dense(idx), "copy-head output")
    return "copy head"


def _grid(mesh):
    return _layer_grid(mesh) + _loss_grid(mesh) + _gpt_grid(mesh)


EXPECTED = 1 + 5 + 3 + 3 + 5 + 3       # unshard, column, row, embedding, loss, gpt


def _grid_tp4_then_dp2_tp2(mesh):
    """tp=4 over the world, then a dp=2 × tp=2 mesh: two tp groups run the grid side by side."""
    results = {"tp4": _grid(mesh)}
    results["dp2xtp2"] = _grid(Mesh.build(tp=2))
    return results


def test_tensor_parallel_tp1_in_process():
    done = _grid(Mesh.single())
    assert len(done) == EXPECTED, done


def test_tensor_parallel_equals_dense_tp2_tp4():
    for rank, results in enumerate(spawn(_grid_tp4_then_dp2_tp2, 4, tp=4)):
        for mesh_name, done in results.items():
            assert len(done) == EXPECTED + 1 and done[-1] == "heads not divisible", (rank, mesh_name, done)
