"""The DeepSpeed-style face: ``initialize(...)`` and an ``Engine`` with forward / backward / step.

A DeepSpeed training script runs with ``import zerotrain as deepspeed``: the same call returns
``(engine, optimizer, dataloader, lr_scheduler)``, and the engine drives the same sharding
mechanism as ``shard_model`` + ``ShardedOptimizer`` (there is no second implementation).
"""
from __future__ import annotations

import inspect
import logging

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._pytree import tree_map

from . import checkpoint as _ckpt
from .config import ConfigError, ZeroTrainConfig, load_config
from .distributed.launch import init_distributed
from .distributed.mesh import Mesh
from .parallel.precision import LossScaleConfig, MixedPrecision
from .parallel.zero import ShardedOptimizer, shard_model
from .train.schedule import build_scheduler

log = logging.getLogger("zerotrain")


class Engine(nn.Module):
    """Wraps the sharded model; ``engine(batch)`` runs it, ``backward`` and ``step`` train it."""

    def __init__(self, module: nn.Module, optimizer: ShardedOptimizer, lr_scheduler, cfg: ZeroTrainConfig,
                 batch, mesh: Mesh):
        super().__init__()
        self.module = module
        self.optimizer, self.lr_scheduler, self.config, self.mesh = optimizer, lr_scheduler, cfg, mesh
        self._batch = batch
        self.global_steps = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self._grad_norm = None

    # ------------------------------------------------------------------ DeepSpeed API
    def forward(self, *args, **kwargs):
        """Run the module; tensor inputs still on the CPU are moved to ``engine.device`` first
        (non-blocking: the engine's data loader pins its batches when the device is a GPU)."""
        if self.device.type != "cpu":
            args, kwargs = tree_map(self._to_device, (args, kwargs))
        return self.module(*args, **kwargs)

    def _to_device(self, x):
        if isinstance(x, torch.Tensor) and x.device.type == "cpu":
            return x.to(self.device, non_blocking=True)
        return x

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self._batch.gradient_accumulation_steps == 0

    def backward(self, loss: torch.Tensor, retain_graph: bool = False):
        """Scale (1/accumulation steps, fp16 loss scale) and backpropagate. Returns ``loss``."""
        scaled = loss / self._batch.gradient_accumulation_steps if self._batch.gradient_accumulation_steps > 1 else loss
        scaled = self.optimizer.scale_loss(scaled)
        # Where the stage keeps full gradients anyway, reduce once per optimizer step.
        defer = not self.is_gradient_accumulation_boundary() and self.module.zero_state.policy.defer_reduce
        if defer:
            with self.module.no_sync():
                scaled.backward(retain_graph=retain_graph)
        else:
            scaled.backward(retain_graph=retain_graph)
        return loss

    def step(self, lr_kwargs=None):
        """Steps the optimizer (and the LR schedule) at accumulation boundaries only."""
        if self.is_gradient_accumulation_boundary():
            info = self.optimizer.step()
            self._grad_norm = info.grad_norm
            if info.skipped:
                self.skipped_steps += 1
            elif self.lr_scheduler is not None:
                self.lr_scheduler.step(**(lr_kwargs or {}))
            self.optimizer.zero_grad()
            self.global_steps += 1
            if self.global_steps % self.config.steps_per_print == 0:
                log.info("step %d: lr %s, grad norm %s%s", self.global_steps, self.get_lr(), self._grad_norm,
                         f", loss scale {info.loss_scale}" if info.loss_scale else "")
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self):
        return self._grad_norm

    def train_batch_size(self) -> int:
        return self._batch.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._batch.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        return self._batch.gradient_accumulation_steps

    @property
    def global_rank(self) -> int:
        return self.mesh.rank

    @property
    def local_rank(self) -> int:
        """DeepSpeed's ``engine.local_rank``: this process's index on its node (torchrun's LOCAL_RANK)."""
        import os
        return int(os.environ.get("LOCAL_RANK", 0))

    @property
    def device(self) -> torch.device:
        """Where the module's parameters and the engine's states live (``cuda:LOCAL_RANK`` on a GPU)."""
        return self.module.zero_state.units[0].full.device

    def zero_grad(self):
        self.optimizer.zero_grad()

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest: bool = True):
        _ckpt.save(save_dir, model=self.module, optimizer=self.optimizer, scheduler=self.lr_scheduler,
                   step=self.global_steps, client_state=_engine_state(self, client_state), tag=tag)
        return True

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, **_ignored):
        """Returns ``(path, client_state)`` like DeepSpeed; ``(None, None)`` when there is none."""
        if _ckpt.latest_tag(load_dir) is None and tag is None:
            log.warning("no checkpoint found in %s", load_dir)
            return None, None
        out = _ckpt.load(load_dir, model=self.module,
                         optimizer=self.optimizer if load_optimizer_states else None,
                         scheduler=self.lr_scheduler if load_lr_scheduler_states else None, tag=tag)
        client = dict(out.get("client_state") or {})
        engine_state = client.pop("_engine", {})
        self.global_steps = int(engine_state.get("global_steps", out["step"]))
        self.micro_steps = int(engine_state.get("micro_steps", self.global_steps * self.gradient_accumulation_steps()))
        self.skipped_steps = int(engine_state.get("skipped_steps", 0))
        return str(out.get("path", load_dir)), client


def _engine_state(engine: Engine, client_state):
    state = dict(client_state or {})
    state["_engine"] = {"global_steps": engine.global_steps, "micro_steps": engine.micro_steps,
                        "skipped_steps": engine.skipped_steps}
    return state


# ---------------------------------------------------------------------------------- initialize
def _mixed_precision(cfg: ZeroTrainConfig) -> MixedPrecision | None:
    reduce = cfg.zerotrain.reduce_dtype
    if cfg.fp16.enabled:
        f = cfg.fp16
        scale = LossScaleConfig(initial_scale=2.0 ** f.initial_scale_power, growth_interval=f.loss_scale_window,
                                hysteresis=f.hysteresis, min_scale=f.min_loss_scale,
                                static_scale=f.loss_scale if f.loss_scale > 0 else None)
        return MixedPrecision.coerce(MixedPrecision(torch.float16, reduce, scale))
    if cfg.bf16.enabled:
        return MixedPrecision.coerce(MixedPrecision(torch.bfloat16, reduce))
    return MixedPrecision.coerce(MixedPrecision(None, reduce)) if reduce else None


def _optimizer_spec(cfg: ZeroTrainConfig, model: nn.Module, optimizer, model_parameters):
    """(optimizer class, param groups, kwargs) from a built optimizer, a callable or the config."""
    if optimizer is not None and cfg.optimizer is not None:
        raise ConfigError("optimizer: given both in the config and as initialize(optimizer=...); keep one")
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(model_parameters if model_parameters is not None else model.parameters())
    if isinstance(optimizer, torch.optim.Optimizer):
        groups = [{k: v for k, v in g.items()} for g in optimizer.param_groups]
        accepted = inspect.signature(type(optimizer).__init__).parameters
        return type(optimizer), groups, {k: v for k, v in optimizer.defaults.items() if k in accepted}
    if optimizer is not None:
        raise ConfigError(f"optimizer={optimizer!r}: pass a torch optimizer, a callable taking the "
                          "parameters, or None with an 'optimizer' block in the config")
    cls, kwargs = cfg.build_optimizer_spec()
    groups = list(model_parameters) if model_parameters is not None else None
    return cls, groups, kwargs


def _build_dataloader(training_data, batch, mesh: Mesh, collate_fn, seed):
    if training_data is None:
        return None
    from torch.utils.data import DataLoader, DistributedSampler
    sampler = DistributedSampler(training_data, num_replicas=mesh.dp, rank=mesh.dp_rank, seed=seed or 0)
    return DataLoader(training_data, batch_size=batch.train_micro_batch_size_per_gpu, sampler=sampler,
                      collate_fn=collate_fn, drop_last=True, pin_memory=mesh.device.type == "cuda")


def initialize(args=None, model: nn.Module | None = None, optimizer=None, model_parameters=None,
               training_data=None, lr_scheduler=None, mpu=None, dist_init_required=None,
               collate_fn=None, config=None, config_params=None, mesh: Mesh | None = None):
    """DeepSpeed's ``initialize``: returns ``(engine, optimizer, dataloader, lr_scheduler)``."""
    if model is None:
        raise ValueError("initialize: model= is required")
    if mpu is not None:
        raise ValueError("initialize: mpu is not supported; set tensor_parallel.tp_size in the config")
    source = config if config is not None else config_params
    if source is None and args is not None:
        source = getattr(args, "deepspeed_config", None)
    if source is None:
        raise ConfigError("initialize: no config; pass config=<path or dict> (or args.deepspeed_config)")
    cfg = load_config(source)
    tp = cfg.tensor_parallel.tp_size
    world = dist.get_world_size() if dist.is_initialized() else _env_world()
    if world % tp:
        raise ConfigError(f"tensor_parallel.tp_size {tp} does not divide the world size {world}")
    batch = cfg.resolve(world // tp)             # every config error is raised before any collective
    if mesh is None:
        mesh = init_distributed(tp=tp)
    if tp > 1:
        _apply_tp(model, mesh)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    # the module goes to the mesh's device, cuda:LOCAL_RANK when CUDA is present, as DeepSpeed puts it
    model = shard_model(model, stage=cfg.zero_optimization.stage, mesh=mesh, mixed_precision=_mixed_precision(cfg),
                        activation_checkpointing=cfg.recompute_units, device=mesh.device)
    cls, groups, kwargs = _optimizer_spec(cfg, model, optimizer, model_parameters)
    off = cfg.zero_optimization.offload_optimizer
    opt = ShardedOptimizer(model, cls, groups, max_grad_norm=cfg.gradient_clipping or None,
                           offload=None if off.device == "none" else off.device, pin_memory=off.pin_memory, **kwargs)
    if callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
        lr_scheduler = lr_scheduler(opt)
    elif lr_scheduler is not None:
        lr_scheduler.optimizer = opt             # a scheduler built over the original optimizer
    elif cfg.scheduler is not None:
        lr_scheduler = build_scheduler(opt, cfg.scheduler)
    engine = Engine(model, opt, lr_scheduler, cfg, batch, mesh)
    loader = _build_dataloader(training_data, batch, mesh, collate_fn, cfg.seed)
    return engine, opt, loader, lr_scheduler


def _env_world() -> int:
    import os
    return int(os.environ.get("WORLD_SIZE", 1))


def _apply_tp(model: nn.Module, mesh: Mesh) -> None:
    from .model import GPT
    from .parallel.tensor import apply_tensor_parallel
    if not isinstance(model, GPT):
        raise ConfigError(f"tensor_parallel.tp_size {mesh.tp}: zerotrain can slice its own GPT; "
                          f"{type(model).__name__} is not one")
    apply_tensor_parallel(model, mesh.tp_group)


def add_config_arguments(parser):
    """DeepSpeed's helper: adds --deepspeed and --deepspeed_config to an argparse parser."""
    group = parser.add_argument_group("zerotrain", "DeepSpeed-compatible configuration")
    group.add_argument("--deepspeed", action="store_true", help="accepted for compatibility")
    group.add_argument("--deepspeed_config", default=None, type=str, help="path to the JSON config")
    group.add_argument("--local_rank", type=int, default=-1, help="accepted for compatibility")
    return parser
