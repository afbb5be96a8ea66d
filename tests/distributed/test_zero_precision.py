"""Mixed precision tracks fp32; an inf on one rank skips the step everywhere and halves the fp16
scale; bad input fails with a clear error on every rank before any collective (never a hang)."""
from __future__ import annotations

import pytest
import torch

import zerotrain
from harness import spawn
from models import TinyGPT, make_batch

STEPS = 20


def _gpt():
    torch.manual_seed(0)
    return TinyGPT(vocab=23, d=16, n_layer=2, ctx=8)


def _train(mesh, stage, precision, inject_at=None, poison=float("inf")):
    model = _gpt()
    zerotrain.shard_model(model, stage=stage, mesh=mesh, mixed_precision=precision)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=3e-3)
    losses, infos, params_at = [], [], {}
    for step in range(STEPS):
        x, y = make_batch("gpt", 8, step)
        per = 8 // mesh.dp
        x, y = x[mesh.dp_rank * per:(mesh.dp_rank + 1) * per], y[mesh.dp_rank * per:(mesh.dp_rank + 1) * per]
        loss = model(x, y)
        if step == inject_at and mesh.dp_rank == mesh.dp - 1:
            loss = loss * poison                         # this rank's gradients become inf/nan
        opt.scale_loss(loss).backward()
        before = [u.master.clone() for u in model.zero_state.units]
        info = opt.step()
        opt.zero_grad()
        if step == inject_at:
            params_at = {"unchanged": all(torch.equal(b, u.master) for b, u in zip(before, model.zero_state.units))}
        t = loss.detach().float().reshape(1)
        zerotrain.distributed.comm.all_reduce(t, mesh.dp_group, op="avg")
        losses.append(t.item())
        infos.append((info.skipped, info.loss_scale))
    return {"losses": losses, "infos": infos, **params_at}


def precision_worker(mesh):
    out = {}
    for stage in (0, 3):
        out[(stage, "fp32")] = _train(mesh, stage, None)
        out[(stage, "bf16")] = _train(mesh, stage, "bf16")
        # 2**10 initial scale: the default 2**16 overflows on this model's first two steps, which
        # are then (correctly) skipped and shift the curve by two steps
        fp16 = zerotrain.MixedPrecision(torch.float16, loss_scale=zerotrain.LossScaleConfig(initial_scale=2.0 ** 10))
        out[(stage, "fp16")] = _train(mesh, stage, fp16)
    out["inject"] = _train(mesh, 2, fp16, inject_at=5)
    for stage in (0, 3):                  # no loss scaler: the non-finite guard alone
        out[("nan", stage, "fp32")] = _train(mesh, stage, None, inject_at=5, poison=float("nan"))
        out[("nan", stage, "bf16")] = _train(mesh, stage, "bf16", inject_at=5, poison=float("nan"))
    return out


@pytest.fixture(scope="module")
def results():
    return spawn(precision_worker, 2)


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("precision,tol", [("bf16", 0.05), ("fp16", 0.01)])
def test_mixed_precision_tracks_fp32(results, stage, precision, tol):
    ref = results[0][(stage, "fp32")]["losses"]
    got = results[0][(stage, precision)]["losses"]
    assert ref[-1] < ref[0] - 0.3, "the reference must actually learn for the comparison to mean something"
    assert not any(skipped for skipped, _ in results[0][(stage, precision)]["infos"])
    for a, b in zip(ref, got):
        assert abs(a - b) <= tol * abs(a), (precision, ref, got)


def test_injected_inf_skips_step_on_every_rank_and_halves_scale(results):
    for rank_result in results:
        r = rank_result["inject"]
        skipped = [s for s, _ in r["infos"]]
        scales = [sc for _, sc in r["infos"]]
        assert skipped == [i == 5 for i in range(STEPS)]
        assert scales[5] == scales[4] / 2 == 2.0 ** 9
        assert r["unchanged"], "the master weights must not move on a skipped step"


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_on_one_rank_skips_the_step_everywhere_without_loss_scaling(results, stage, precision):
    clean = results[0][(stage, precision)]["losses"]
    for rank_result in results:
        r = rank_result[("nan", stage, precision)]
        assert [s for s, _ in r["infos"]] == [i == 5 for i in range(STEPS)]
        assert r["unchanged"], "the master weights must not move on a skipped step"
        # the skipped step leaves the run where it was: step 6 sees the weights of step 5
        assert r["losses"][:5] == clean[:5]
        assert all(abs(x) < 1e9 for x in r["losses"][6:]), "no nan may leak into the weights"


# ---------------------------------------------------------------------------------- bad input
def _error_of(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the message is what is being tested
        return f"{type(exc).__name__}: {exc}"
    return None


def bad_input_worker(mesh):
    zerotrain.reset_comm_report()
    errors = {
        "stage": _error_of(lambda: zerotrain.shard_model(_gpt(), stage=4, mesh=mesh)),
        "no_params": _error_of(lambda: zerotrain.shard_model(torch.nn.ReLU(), stage=1, mesh=mesh)),
        "precision": _error_of(lambda: zerotrain.shard_model(_gpt(), stage=1, mesh=mesh, mixed_precision="fp8")),
    }
    sharded = zerotrain.shard_model(_gpt(), stage=1, mesh=mesh)
    errors["optimizer"] = _error_of(lambda: zerotrain.ShardedOptimizer(sharded, torch.optim.LBFGS, lr=1))
    errors["not_sharded"] = _error_of(lambda: zerotrain.ShardedOptimizer(_gpt(), torch.optim.AdamW))
    before = zerotrain.comm_report()
    errors["mismatch"] = _error_of(lambda: zerotrain.shard_model(_gpt(), stage=2 + mesh.rank, mesh=mesh))
    return errors, before


def test_bad_input_raises_before_any_collective():
    results = spawn(bad_input_worker, 2, timeout=120)
    for rank, (errors, comm_before) in enumerate(results):
        assert "stage=4" in errors["stage"] and "use one of 0" in errors["stage"]
        assert "no trainable parameters" in errors["no_params"]
        assert "mixed_precision" in errors["precision"] and "fp8" in errors["precision"]
        assert "LBFGS" in errors["optimizer"] and "element-wise" in errors["optimizer"]
        assert "call zerotrain.shard_model" in errors["not_sharded"]
        assert "ranks disagree on stage" in errors["mismatch"] and "rank 0: 2, rank 1: 3" in errors["mismatch"]
        # the first five errors happened before any data collective: only the agreement check
        # of the one successful shard_model ran (an all_gather_object) plus its broadcasts
        assert set(comm_before) <= {"all_gather_object", "broadcast"}, comm_before
        assert comm_before["all_gather_object"]["calls"] == 1
    assert results[0][0] == results[1][0], "every rank must raise the same errors"
