"""ShardedOptimizer.step() decides on the device: with a fused optimizer (and no fp16 loss scaler)
nothing in the step reads a tensor's value on the host — the norm, the clip coefficient and the
skip of a non-finite step stay tensors — so on a GPU the step never waits for the device. On the
CPU the same code runs; a host read is detected by patching the Tensor methods that read values."""
from __future__ import annotations

import contextlib

import pytest
import torch

import zerotrain
from models import make_batch, make_model

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def host_reads():
    seen = []
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def spy(name):
        def read(self, *a, **kw):
            seen.append(name)
            return saved[name](self, *a, **kw)
        return read
    for name in READS:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield seen
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _step(precision=None, clip=1.0, poison=1.0):
    model = zerotrain.shard_model(make_model("gpt"), stage=3, mixed_precision=precision)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-2, max_grad_norm=clip)
    x, y = make_batch("gpt", 4, 0)
    opt.scale_loss(model(x, y) * poison).backward()
    with host_reads() as seen:
        info = opt.step()
    return info, seen


@pytest.mark.parametrize("clip", [1.0, None])
@pytest.mark.parametrize("precision", [None, "bf16"])
def test_fused_step_reads_nothing_on_the_host(precision, clip):
    info, seen = _step(precision, clip)
    assert seen == [], f"host reads inside step(): {seen}"
    assert info.grad_norm > 0 and not info.skipped      # read afterwards, on demand


def test_non_finite_step_is_skipped_on_the_device():
    info, seen = _step(poison=float("nan"))
    assert seen == [] and info.skipped and info.clipped_grad_norm is None


def test_fp16_decides_on_the_host_for_its_loss_scale():
    _, seen = _step("fp16")
    assert seen, "the dynamic loss scale needs the overflow decision on the host"
