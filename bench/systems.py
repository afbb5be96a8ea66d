"""The systems compared: zerotrain stages 0-3 and the peers shipped with torch, each as a Runner
that owns a model and an optimizer and does one training step.

bf16 per system: zerotrain ``mixed_precision="bf16"`` (bf16 parameters, fp32 master and fp32
reductions); FSDP2 ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``; DDP and
ZeroRedundancyOptimizer run the fp32 model under ``torch.autocast("cpu", bfloat16)`` (the fp32
parameter is the master, gradients are fp32).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

import zerotrain
from common import BenchConfig, build_gpt, torch_state_bytes


@dataclass(frozen=True)
class System:
    name: str
    stage: int          # the ZeRO stage whose §2 formula the system is compared with
    kind: str           # "ddp" | "zero_opt" | "fsdp2" | "zerotrain"
    reshard: bool = True
    fused: bool = False  # peers: AdamW(fused=True); zerotrain picks the fused kernel by itself


SYSTEMS = {s.name: s for s in [
    System("ddp", 0, "ddp"),
    System("zero-opt", 1, "zero_opt"),
    System("fsdp2-s2", 2, "fsdp2", reshard=False),
    System("fsdp2-s3", 3, "fsdp2", reshard=True),
    System("ddp-fused", 0, "ddp", fused=True),
    System("fsdp2-s2-fused", 2, "fsdp2", reshard=False, fused=True),
    System("fsdp2-s3-fused", 3, "fsdp2", reshard=True, fused=True),
    *[System(f"zt-s{s}", s, "zerotrain") for s in range(4)],
]}


class Runner:
    """model + optimizer + how to step and how to count model-state bytes."""

    def __init__(self, model, optimizer, *, autocast: bool, forward_model=None):
        self.model, self.optimizer = model, optimizer
        self.forward_model = forward_model or model
        self.autocast = autocast
        self.state_bytes: dict | None = None

    def _context(self):
        if self.autocast:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, x, y, *, measure: bool = False) -> torch.Tensor:
        with self._context():
            loss = self.forward_model(x, y)
        loss.backward()
        self.optimizer.step()
        if measure:                 # after the update, before grads are dropped: all states live
            self.state_bytes = self.count_bytes()
        self.optimizer.zero_grad()
        return loss.detach()

    def count_bytes(self) -> dict:
        return torch_state_bytes(self.model, self.optimizer.state)


class ZeroOptRunner(Runner):
    def count_bytes(self) -> dict:
        return torch_state_bytes(self.model, self.optimizer.optim.state)   # this rank's partition


class ZerotrainRunner(Runner):
    def count_bytes(self) -> dict:
        return zerotrain.memory_report(self.model, self.optimizer)


def _adamw(params, cfg: BenchConfig, fused: bool = False):
    # torch's default on CPU is the per-tensor loop; ``fused`` rows show the peers with the same
    # fused kernel ShardedOptimizer selects, so the optimizer implementation is not the difference
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, **({"fused": True} if fused else {}))


def build(system: System, cfg: BenchConfig, *, bf16: bool) -> Runner:
    model = build_gpt(cfg)
    if system.kind in ("ddp", "zero_opt"):
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model, gradient_as_bucket_view=True)   # grads live in the buckets: no 2nd copy
        if system.kind == "ddp":
            return Runner(model, _adamw(model.parameters(), cfg, system.fused), autocast=bf16, forward_model=ddp)
        from torch.distributed.optim import ZeroRedundancyOptimizer
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW,
                                      lr=cfg.lr, weight_decay=0.01)
        return ZeroOptRunner(model, opt, autocast=bf16, forward_model=ddp)
    if system.kind == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, reshard_after_forward=system.reshard, mp_policy=mp)
        fully_shard(model, reshard_after_forward=system.reshard, mp_policy=mp)
        return Runner(model, _adamw(model.parameters(), cfg, system.fused), autocast=False)
    zerotrain.shard_model(model, stage=system.stage, mesh=zerotrain.Mesh.default(),
                          mixed_precision="bf16" if bf16 else None)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=cfg.lr, weight_decay=0.01)
    return ZerotrainRunner(model, opt, autocast=False)


def global_mean(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()
