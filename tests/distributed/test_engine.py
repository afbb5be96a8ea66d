"""The DeepSpeed-style Engine: optimizer hand-over (built, callable, from config), accumulation
boundaries, LR schedule, fp16 from config, and config errors raised before any collective."""
from __future__ import annotations

import pytest
import torch

import zerotrain
from harness import spawn
from models import make_batch, make_model

GLOBAL, STEPS = 8, 4


def _groups(model, lr):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": lr / 3}]


def _reference(opt_factory, accum_lr=None):
    model = make_model("gpt", torch.float64)
    opt = opt_factory(model)
    losses = []
    for step in range(STEPS):
        x, y = make_batch("gpt", GLOBAL, step)
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def _train(mesh, engine, gas):
    micro = GLOBAL // gas // mesh.dp
    losses, boundaries = [], []
    for step in range(STEPS):
        x, y = make_batch("gpt", GLOBAL, step)
        total = torch.zeros((), dtype=torch.float64)
        for k in range(gas):
            lo = k * GLOBAL // gas + mesh.dp_rank * micro
            boundaries.append(engine.is_gradient_accumulation_boundary())
            loss = engine(x[lo:lo + micro], y[lo:lo + micro])
            engine.backward(loss)
            engine.step()
            total += loss.detach() / gas
        zerotrain.distributed.comm.all_reduce(total, mesh.dp_group, op="avg")
        losses.append(total.item())
    return {"losses": losses, "boundaries": boundaries, "params": engine.module.full_state_dict(),
            "steps": engine.global_steps, "lr": engine.get_lr()}


def engine_worker(mesh):
    out = {}
    base = {"train_batch_size": GLOBAL, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2}}
    # 1. a torch optimizer already built over the model: groups and hyper-parameters carry over
    model = make_model("gpt", torch.float64)
    built = torch.optim.AdamW(_groups(model, 1e-2), lr=1e-2, betas=(0.8, 0.95))
    engine, opt, _, _ = zerotrain.initialize(model=model, optimizer=built, config=base, mesh=mesh)
    out["built_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    out["built"] = _train(mesh, engine, 2)
    # 2. a callable taking the parameters
    model = make_model("gpt", torch.float64)
    cfg = dict(base, zero_optimization={"stage": 3})
    engine, _, _, _ = zerotrain.initialize(model=model, model_parameters=model.parameters(), config=cfg, mesh=mesh,
                                           optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    out["callable"] = _train(mesh, engine, 2)
    # 3. optimizer and WarmupLR scheduler from the config, stage 1, micro-batch derived
    model = make_model("gpt", torch.float64)
    cfg = {"train_batch_size": GLOBAL, "train_micro_batch_size_per_gpu": GLOBAL // mesh.dp // 4,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-2}}, "zero_optimization": {"stage": 1},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                        "warmup_num_steps": 10, "warmup_type": "linear"}}}
    engine, _, _, sched = zerotrain.initialize(model=model, config=cfg, mesh=mesh)
    out["sizes"] = (engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(),
                    engine.gradient_accumulation_steps())
    out["scheduled"] = _train(mesh, engine, 4)
    return out


@pytest.fixture(scope="module")
def results():
    return spawn(engine_worker, 2)


def test_built_optimizer_carries_groups_and_trains_like_reference(results):
    groups = results[0]["built_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [g["lr"] for g in groups] == [1e-2, 1e-2 / 3] and groups[0]["betas"] == (0.8, 0.95)
    ref_losses, ref_params = _reference(lambda m: torch.optim.AdamW(_groups(m, 1e-2), lr=1e-2, betas=(0.8, 0.95)))
    for r in results:
        got = r["built"]
        assert got["losses"] == pytest.approx(ref_losses, abs=1e-10)
        for k, v in ref_params.items():
            torch.testing.assert_close(got["params"][k], v, atol=1e-10, rtol=1e-10)
        assert got["boundaries"] == [False, True] * STEPS and got["steps"] == STEPS


def test_callable_optimizer_stage3_matches_reference(results):
    ref_losses, ref_params = _reference(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
    got = results[1]["callable"]
    assert got["losses"] == pytest.approx(ref_losses, abs=1e-10)
    for k, v in ref_params.items():
        torch.testing.assert_close(got["params"][k], v, atol=1e-10, rtol=1e-10)


def test_config_optimizer_and_scheduler(results):
    assert results[0]["sizes"] == (GLOBAL, 1, 4)
    got = results[0]["scheduled"]
    assert got["steps"] == STEPS and got["boundaries"] == [False, False, False, True] * STEPS
    # linear warmup 0 -> 1e-2 over 10 steps, evaluated after 4 optimizer steps
    from zerotrain.train.schedule import WarmupLR
    probe = torch.optim.SGD([torch.zeros(1)], lr=1.0)
    sched = WarmupLR(probe, warmup_min_lr=0.0, warmup_max_lr=1e-2, warmup_num_steps=10, warmup_type="linear")
    for _ in range(STEPS):
        probe.step()
        sched.step()
    assert got["lr"] == [pytest.approx(probe.param_groups[0]["lr"])]
    ref_losses, _ = _reference(lambda m: _ScheduledAdam(m))
    assert got["losses"] == pytest.approx(ref_losses, abs=1e-10)


class _ScheduledAdam(torch.optim.AdamW):
    """The reference for test 3: AdamW (DeepSpeed's Adam with adam_w_mode) under the same WarmupLR."""

    def __init__(self, model):
        super().__init__(model.parameters(), lr=1e-2, weight_decay=0.0)
        from zerotrain.train.schedule import WarmupLR
        self._sched = WarmupLR(self, warmup_min_lr=0.0, warmup_max_lr=1e-2, warmup_num_steps=10,
                               warmup_type="linear")

    def step(self, closure=None):
        super().step(closure)
        self._sched.step()


# ------------------------------------------------------------------------- errors first
BAD_CONFIGS = {
    "zero_optimization.stage": {"train_batch_size": 8, "zero_optimization": {"stage": 4}},
    "partitioned_activations": {"train_batch_size": 8, "zero_optimization": {"partitioned_activations": True}},
    "data-parallel size 2": {"train_batch_size": 6, "train_micro_batch_size_per_gpu": 3,
                             "gradient_accumulation_steps": 2},
    "bf16.enabled": {"train_batch_size": 8, "fp16": {"enabled": True}, "bf16": {"enabled": True}},
}


def bad_config_worker(mesh):
    zerotrain.reset_comm_report()
    messages = {}
    for key, cfg in BAD_CONFIGS.items():
        cfg = dict(cfg, optimizer={"type": "AdamW", "params": {"lr": 1e-3}})
        try:
            zerotrain.initialize(model=make_model("gpt"), config=cfg)
            messages[key] = None
        except zerotrain.config.ConfigError as exc:
            messages[key] = str(exc)
    return messages, zerotrain.comm_report()


def test_config_errors_raised_before_any_collective():
    results = spawn(bad_config_worker, 2, timeout=120)
    for messages, comm in results:
        assert comm == {}, "a config error must come before any collective"
        for key, msg in messages.items():
            assert msg is not None and key in msg, (key, msg)
    assert results[0][0] == results[1][0]
