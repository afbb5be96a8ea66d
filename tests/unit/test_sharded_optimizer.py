"""Single-process behaviour of shard_model + ShardedOptimizer (no process group needed)."""
from __future__ import annotations

import pytest
import torch

import zerotrain
from models import TinyGPT, make_batch, make_model


def _train(model, opt, steps, sched=None, start=0):
    losses = []
    for step in range(start, start + steps):
        x, y = make_batch("gpt", 4, step)
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("stage", [0, 3])
def test_torch_lr_scheduler_drives_sharded_optimizer(stage):
    ref = make_model("gpt", torch.float64)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=6)
    model = zerotrain.shard_model(make_model("gpt", torch.float64), stage=stage)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    assert _train(model, opt, 5, sched) == pytest.approx(_train(ref, ref_opt, 5, ref_sched), abs=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_state_dict_round_trip_resumes_exactly(stage):
    straight = zerotrain.shard_model(make_model("gpt", torch.float64), stage=stage)
    opt = zerotrain.ShardedOptimizer(straight, torch.optim.AdamW, lr=1e-2)
    expected = _train(straight, opt, 6)

    first = zerotrain.shard_model(make_model("gpt", torch.float64), stage=stage)
    opt1 = zerotrain.ShardedOptimizer(first, torch.optim.AdamW, lr=1e-2)
    _train(first, opt1, 3)
    saved_model, saved_opt = first.full_state_dict(), opt1.state_dict()

    second = make_model("gpt", torch.float64)
    second.load_state_dict(saved_model)
    second = zerotrain.shard_model(second, stage=stage)
    opt2 = zerotrain.ShardedOptimizer(second, torch.optim.AdamW, lr=1e-2)
    opt2.load_state_dict(saved_opt)
    assert _train(second, opt2, 3, start=3) == expected[3:]


def test_load_state_dict_refuses_another_layout():
    a = zerotrain.shard_model(make_model("gpt"), stage=1)
    b = zerotrain.shard_model(make_model("gpt"), stage=2)
    sd = zerotrain.ShardedOptimizer(a, torch.optim.AdamW).state_dict()
    with pytest.raises(ValueError, match="layout"):
        zerotrain.ShardedOptimizer(b, torch.optim.AdamW).load_state_dict(sd)


def test_eval_forward_at_stage3_equals_dense():
    dense = make_model("gpt", torch.float64)
    model = zerotrain.shard_model(make_model("gpt", torch.float64), stage=3)
    x, _ = make_batch("gpt", 3, 0)
    model.eval()
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got, dense(x).detach())
    assert all(u.full.untyped_storage().nbytes() == 0 for u in model.zero_state.units), "freed after use"


def test_frozen_parameters_stay_replicated_and_untouched():
    model = make_model("gpt", torch.float64)
    model.wpe.weight.requires_grad_(False)
    frozen = model.wpe.weight.detach().clone()
    model = zerotrain.shard_model(model, stage=3)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.5)
    _train(model, opt, 2)
    assert torch.equal(model.wpe.weight, frozen)
    with pytest.raises(ValueError, match="frozen"):
        zerotrain.ShardedOptimizer(model, torch.optim.AdamW, [model.wpe.weight])


def test_bf16_keeps_separate_fp32_master_and_reports_it():
    torch.manual_seed(0)
    model = zerotrain.shard_model(TinyGPT(), stage=2, mixed_precision="bf16")
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-3)
    _train(model, opt, 1)
    psi = sum(u.layout.padded for u in model.zero_state.units)
    numel = sum(u.layout.numel for u in model.zero_state.units)
    rep = zerotrain.memory_report(model, opt)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert rep["params"] == 2 * psi and rep["master"] == 4 * psi
    assert rep["grads"] == 0, "zero_grad() gave the gradient buffers back"
    assert rep["optimizer_states"] == 8 * numel
    x, y = make_batch("gpt", 4, 1)
    model(x, y).backward()
    assert zerotrain.memory_report(model, opt)["grads"] == 4 * psi
    opt.zero_grad(set_to_none=False)
    assert zerotrain.memory_report(model, opt)["grads"] == 4 * psi, "kept, zeroed"


def test_sgd_momentum_and_param_groups_with_lr():
    ref = make_model("gpt", torch.float64)
    groups = lambda m: [{"params": [p for p in m.parameters() if p.dim() > 1], "lr": 0.1},  # noqa: E731
                        {"params": [p for p in m.parameters() if p.dim() <= 1]}]
    ref_opt = torch.optim.SGD(groups(ref), lr=0.05, momentum=0.9, nesterov=True)
    model = zerotrain.shard_model(make_model("gpt", torch.float64), stage=2)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.SGD, groups(model), lr=0.05, momentum=0.9, nesterov=True)
    assert _train(model, opt, 4) == pytest.approx(_train(ref, ref_opt, 4), abs=1e-12)
