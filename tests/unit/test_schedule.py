"""zerotrain.train.schedule: DeepSpeed-named LR schedules against hand-computed values."""
import math

import pytest
import torch

from zerotrain.config import ConfigError, parse_config
from zerotrain.train.schedule import WarmupCosineLR, WarmupDecayLR, WarmupLR, build_scheduler


class PlainOptimizer(torch.optim.Optimizer):
    """A minimal Optimizer subclass (plain SGD), standing in for a sharded optimizer."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def _optimizer(lr=1.0, groups=1, cls=PlainOptimizer):
    return cls([{"params": [torch.nn.Parameter(torch.ones(2))]} for _ in range(groups)], lr=lr)


def _lrs(scheduler, steps):
    """The lr used by optimizer steps 0 .. steps-1 (step, then advance the schedule)."""
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_warmup_lr_log():
    sched = WarmupLR(_optimizer(), warmup_min_lr=0.1, warmup_max_lr=1.1, warmup_num_steps=10)
    lrs = _lrs(sched, 13)
    expected = [0.1 + math.log(t + 1) / math.log(10) for t in range(10)] + [1.1] * 3
    assert lrs == pytest.approx(expected, abs=1e-15)
    assert lrs[1] == pytest.approx(0.1 + 0.30102999566398120, abs=1e-15)
    assert lrs[9] == pytest.approx(1.1, abs=1e-15)


def test_warmup_lr_linear_and_default_max_is_optimizer_lr():
    sched = WarmupLR(_optimizer(lr=2.0), warmup_num_steps=4, warmup_type="linear")
    assert _lrs(sched, 7) == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0], abs=1e-15)


def test_warmup_of_one_step_counts_as_two():
    sched = WarmupLR(_optimizer(), warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=1,
                     warmup_type="linear")
    assert _lrs(sched, 4) == [0.0, 0.5, 1.0, 1.0]


def test_warmup_decay_lr():
    sched = WarmupDecayLR(_optimizer(), 12, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=4,
                          warmup_type="linear")
    lrs = _lrs(sched, 16)
    assert lrs[:4] == pytest.approx([0.0, 0.25, 0.5, 0.75], abs=1e-15)
    # after warmup: (T - t) / (T - W) = (12 - t) / 8, floored at 0
    assert lrs[4:] == pytest.approx([(12 - t) / 8 for t in range(4, 12)] + [0.0] * 4, abs=1e-15)
    assert lrs[8] == 0.5


def test_warmup_decay_lr_log_warmup_and_default_max():
    sched = WarmupDecayLR(_optimizer(lr=5.0), 100, warmup_num_steps=10)
    lrs = _lrs(sched, 12)
    assert lrs[3] == pytest.approx(0.001 * math.log(4) / math.log(10), abs=1e-18)
    assert lrs[10] == pytest.approx(0.001 * 90 / 90, abs=1e-18)
    assert lrs[11] == pytest.approx(0.001 * 89 / 90, abs=1e-18)


def test_warmup_cosine_lr():
    sched = WarmupCosineLR(_optimizer(lr=2.0), 12, warmup_min_ratio=0.2, warmup_num_steps=4,
                           cos_min_ratio=0.1, warmup_type="linear")
    lrs = _lrs(sched, 14)
    assert lrs[:4] == pytest.approx([0.4, 0.8, 1.2, 1.6], abs=1e-15)    # 2 × (0.2 + 0.8 t / 4)
    assert lrs[4] == pytest.approx(2.0 * (0.1 + 0.9 * (1 + math.cos(math.pi / 8)) / 2), abs=1e-15)
    assert lrs[4] == pytest.approx(1.9314916, abs=1e-7)
    assert lrs[7] == pytest.approx(2.0 * 0.55, abs=1e-15)               # progress 4/8: cos = 0
    assert lrs[11:] == pytest.approx([0.2, 0.2, 0.2], abs=1e-15)        # floor: cos_min_ratio × lr


def test_warmup_cosine_lr_log_warmup_per_group_base_lrs():
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.ones(1))], "lr": 1.0},
                           {"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.5}])
    sched = WarmupCosineLR(opt, 100, warmup_min_ratio=0.1, warmup_num_steps=10)
    for _ in range(3):
        opt.step()
        sched.step()
    ratio = 0.1 + 0.9 * math.log(4) / math.log(10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([ratio, 0.5 * ratio], abs=1e-15)


def test_per_group_min_max_lists():
    opt = _optimizer(groups=2)
    sched = WarmupLR(opt, warmup_min_lr=[0.0, 1.0], warmup_max_lr=[1.0, 3.0], warmup_num_steps=4,
                     warmup_type="linear")
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.25, 1.5]
    with pytest.raises(ValueError, match="warmup_max_lr has 3 values but the optimizer has 2 param groups"):
        WarmupLR(_optimizer(groups=2), warmup_max_lr=[1.0, 2.0, 3.0])


def test_state_dict_resumes_the_same_schedule():
    sched = WarmupDecayLR(_optimizer(), 20, warmup_max_lr=1.0, warmup_num_steps=5, warmup_type="linear")
    _lrs(sched, 7)
    fresh = WarmupDecayLR(_optimizer(), 20, warmup_max_lr=1.0, warmup_num_steps=5, warmup_type="linear")
    fresh.load_state_dict(sched.state_dict())
    fresh.step()
    sched.step()
    assert fresh.get_last_lr() == sched.get_last_lr() == [pytest.approx((20 - 8) / 15, abs=1e-15)]


@pytest.mark.parametrize("make,message", [
    (lambda o: WarmupLR(o, warmup_num_steps=0), "warmup_num_steps must be a positive integer, got 0"),
    (lambda o: WarmupLR(o, warmup_type="exp"), "warmup_type must be 'log' or 'linear', got 'exp'"),
    (lambda o: WarmupDecayLR(o, 10, warmup_num_steps=20), "total_num_steps 10 is less than warmup_num_steps 20"),
    (lambda o: WarmupCosineLR(o, 0), "total_num_steps must be a positive integer, got 0"),
])
def test_constructor_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make(_optimizer())


def test_build_scheduler_from_config_and_dict():
    cfg = parse_config({"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
                        "scheduler": {"type": "warmupcosinelr",
                                      "params": {"total_num_steps": 50, "warmup_num_steps": 5}}})
    cls, kwargs = cfg.build_optimizer_spec()
    opt = cls([torch.nn.Parameter(torch.ones(2))], **kwargs)
    sched = build_scheduler(opt, cfg.scheduler)
    assert isinstance(sched, WarmupCosineLR) and sched.total_num_steps == 50 and sched.cos_min_ratio == 1e-4
    assert opt.param_groups[0]["lr"] == 0.0                       # log warmup, ratio 0 at step 0
    sched = build_scheduler(_optimizer(lr=3.0), {"type": "WarmupLR", "params": {"warmup_num_steps": 2,
                                                                                 "warmup_type": "linear"}})
    assert isinstance(sched, WarmupLR) and _lrs(sched, 3) == [0.0, 1.5, 3.0]
    assert build_scheduler(_optimizer(), None) is None
    with pytest.raises(ConfigError, match="scheduler.params.warmup_num_step: unknown key; did you mean"):
        build_scheduler(_optimizer(), {"type": "WarmupLR", "params": {"warmup_num_step": 2}})
