"""The collective-order checker (debug mode) and the bookkeeping behind it (``zerotrain.distributed.calls``).

* every rank issuing the same collectives passes, and the data is what it would be without the check;
* ranks issuing different collectives at the same position — another unit's gather, another op,
  shape or dtype — raise the same CollectiveMismatch on every rank naming, per rank, the step,
  op, label, dtype and shape; without debug mode a same-size mismatch goes unnoticed (what the
  checker is for);
* steps are counted by ShardedOptimizer.step(), and units label their collectives with their
  module's name.
"""
from __future__ import annotations

import torch

import zerotrain
from harness import spawn
from models import TinyGPT, make_batch


def _issue(mesh, kind: str):
    from zerotrain.distributed import comm
    n, me = mesh.world_size, mesh.rank
    shard = torch.full((4,), float(me))
    out = torch.empty(4 * n)
    if kind == "same":
        comm.all_gather(out, shard, mesh.world_group, label="blocks.0")
        return out
    if kind == "label":
        comm.all_gather(out, shard, mesh.world_group, label=f"blocks.{me}")
        return out
    if kind == "op":
        if me == 0:
            comm.all_gather(out, shard, mesh.world_group, label="blocks.0")
        else:
            comm.all_reduce(torch.zeros(4 * n), mesh.world_group, label="blocks.0")
        return out
    if kind == "dtype":
        comm.all_reduce(torch.zeros(4, dtype=torch.float32 if me == 0 else torch.float64), mesh.world_group)
        return out


def checker_worker(mesh):
    from zerotrain.distributed import CollectiveMismatch, calls, comm
    out = {}
    for debug in (True, False):
        calls.set_debug(debug)
        comm.set_step(7)
        for kind in ("same", "label", "op", "dtype"):
            if not debug and kind in ("op", "dtype"):
                continue                         # without the check these would exchange garbage or hang
            try:
                out[debug, kind] = _issue(mesh, kind)
            except CollectiveMismatch as exc:
                out[debug, kind] = str(exc)
    calls.set_debug(False)
    torch.manual_seed(0)
    model = zerotrain.shard_model(TinyGPT(vocab=23, d=16, n_layer=2, ctx=8), stage=3, mesh=mesh)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-3)
    comm.set_step(1)
    for step in range(2):
        x, y = make_batch("gpt", 4, step)
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    out["step"] = calls.current_step()
    out["labels"] = sorted(u.label for u in model.zero_state.units)
    return out


def test_the_checker_names_the_first_divergence():
    results = spawn(checker_worker, 2)
    gathered = torch.tensor([0.0] * 4 + [1.0] * 4)
    for r in results:
        torch.testing.assert_close(r[True, "same"], gathered, rtol=0, atol=0)
        torch.testing.assert_close(r[False, "same"], gathered, rtol=0, atol=0)
        torch.testing.assert_close(r[False, "label"], gathered, rtol=0, atol=0)   # unnoticed without debug
        assert r["step"] == 3 and r["labels"] == ["blocks.0", "blocks.1", "root"]
    for kind, rank0, rank1 in [
        ("label", "(all_gather 'blocks.0' float32[8]) at step 7", "(all_gather 'blocks.1' float32[8]) at step 7"),
        ("op", "(all_gather 'blocks.0' float32[8])", "(all_reduce 'blocks.0' float32[8])"),
        ("dtype", "(all_reduce float32[4])", "(all_reduce float64[4])"),
    ]:
        messages = {r[True, kind] for r in results}
        assert len(messages) == 1, messages                  # the same words on every rank
        message = messages.pop()
        assert message.startswith("collective order diverged at position") and "of the group of ranks [0, 1]" in message
        assert "rank 0: collective #" in message and rank0 in message and rank1 in message, message
