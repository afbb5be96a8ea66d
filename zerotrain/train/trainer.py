"""One rank of a training run: build → (resume) → step → evaluate → checkpoint → report.

``train(mesh, opts)`` runs on every rank of the mesh (spawned by ``zerotrain train`` or started by
torchrun); rank 0 alone writes logs, metrics, plots and prints. The data files must already exist
(``prepare.prepare_data``). Each step all-reduces one small tensor holding the loss and the
stop flag, so a Ctrl-C seen by any rank stops every rank after the same step; the run then
saves a checkpoint and returns. A later start resumes from the latest checkpoint: the batch of
step ``s`` is a function of (seed, s), so resuming replays exactly the batches of an
uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field

import torch

import zerotrain
from zerotrain.data import TokenDataset, batches, load_tokenizer
from zerotrain.distributed import comm
from zerotrain.model import GPT, get_config

from .evaluate import evaluate_run, format_results, heldout_metrics
from .guard import NonFiniteGuard, inject
from .metrics import MetricsLog, Progress
from .options import Options
from .placement import to_device
from .plots import plot_losses
from .prepare import RunData, prepare_data
from .schedule import WarmupCosineLR

log = logging.getLogger("zerotrain")


class StopFlag:
    """Set by SIGINT / SIGTERM; the training loop agrees on it across ranks after each step."""

    def __init__(self):
        self.requested = False

    def install(self, signals=(signal.SIGINT,)) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            log.warning("stop requested: finishing this step, then saving a checkpoint")
        self.requested = True


@dataclass
class TrainState:
    step: int = 0
    elapsed: float = 0.0
    losses: list = field(default_factory=list)
    interrupted: bool = False
    results: dict | None = None


def count_parameters(cfg) -> int:
    """Parameters of the dense model (tied embedding once), without allocating it."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return GPT(cfg).num_parameters()


def build_model(opts: Options, vocab_size: int, mesh):
    cfg = get_config(opts.model.preset, vocab_size=vocab_size, **opts.model_overrides())
    torch.manual_seed(opts.train.seed)
    with torch.device("meta"):         # shapes only: shard_model materialises what this rank keeps,
        model = GPT(cfg)               # unit by unit, with bitwise the weights of a dense build
    if mesh.tp > 1:                    # Megatron layers inside each tp group, then ZeRO over dp
        from zerotrain.parallel.tensor import apply_tensor_parallel
        apply_tensor_parallel(model, mesh.tp_group)
    precision = None if opts.parallel.precision == "fp32" else opts.parallel.precision
    return zerotrain.shard_model(model, stage=opts.parallel.stage, mesh=mesh, mixed_precision=precision,
                                 activation_checkpointing=opts.parallel.activation_checkpointing,
                                 device=mesh.device)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay 2-D weights (linear layers, embeddings); not biases or LayerNorm parameters."""
    decay, rest = [], []
    for p in model.parameters():               # parameters() lists the tied embedding once
        if p.requires_grad:
            (decay if p.dim() >= 2 else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(model, opts: Options):
    o = opts.optim
    return zerotrain.ShardedOptimizer(model, torch.optim.AdamW, param_groups(model, o.weight_decay),
                                      lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                                      max_grad_norm=o.grad_clip)


def lr_schedule_for(opt, opts: Options, *, step: int = 0) -> WarmupCosineLR:
    """Linear warmup, cosine decay to ``min_lr`` at ``train.steps``, positioned at ``step``.

    The schedule is a function of the step alone, so a resumed run rebuilds it from its current
    options (``--steps`` may be raised on resume) instead of loading it; the other optimizer
    hyper-parameters are re-applied from the options too."""
    o = opts.optim
    for i, group in enumerate(opt.param_groups):     # group 0 decays, group 1 does not
        group.update(initial_lr=o.lr, lr=o.lr, betas=(o.beta1, o.beta2),
                     weight_decay=o.weight_decay if i == 0 else 0.0)
    sched = WarmupCosineLR(opt, opts.train.steps, warmup_num_steps=max(1, min(o.warmup, opts.train.steps)),
                           warmup_type="linear", warmup_min_ratio=0.0, cos_min_ratio=o.min_lr / o.lr)
    if step:
        sched.last_epoch = step
        for group, lr in zip(opt.param_groups, sched.get_lr()):
            group["lr"] = lr
        sched._last_lr = [g["lr"] for g in opt.param_groups]
    return sched


def _checkpoint_api():
    from zerotrain import checkpoint
    if not hasattr(checkpoint, "save"):
        raise RuntimeError("zerotrain.checkpoint has no save/load: the checkpoint package is missing "
                           "from this installation")
    return checkpoint


def ckpt_root(opts: Options):
    return opts.run_dir / "checkpoints"


def resume(model, opt, opts: Options, state: TrainState) -> None:
    """Load the run's latest checkpoint, if any, into model / optimizer / state."""
    ckpt, root = _checkpoint_api(), ckpt_root(opts)
    if not root.is_dir() or ckpt.latest_tag(root) is None:
        return
    info = ckpt.load(root, model=model, optimizer=opt)
    client = info.get("client_state") or {}
    state.step, state.elapsed = int(info["step"]), float(client.get("elapsed", 0.0))
    log.info("resumed from %s at step %d", root, state.step)


def save(model, opt, sched, *, opts: Options, state: TrainState) -> None:
    _checkpoint_api().save(ckpt_root(opts), model=model, optimizer=opt, scheduler=sched, step=state.step,
                           client_state={"elapsed": state.elapsed, "options": opts.model_dump()},
                           keep_last=opts.train.keep_last)


def _train_step(model, opt, sched, batch, *, stop: StopFlag, mesh, step: int) -> tuple[float, bool, object, float]:
    """One optimizer step (the ``step``-th); returns (global mean loss, stop agreed, StepInfo, lr used)."""
    x, y = batch
    lr = opt.param_groups[0]["lr"]
    comm.set_step(step)
    loss = inject(model(x, y), rank=mesh.rank, step=step)
    opt.scale_loss(loss).backward()
    info = opt.step()
    sched.step()
    opt.zero_grad()
    agreed = torch.tensor([loss.item(), float(stop.requested)], dtype=torch.float64, device=mesh.device)
    comm.all_reduce(agreed, mesh.world_group, label="trainer: loss and stop flag")
    return agreed[0].item() / mesh.world_size, agreed[1].item() > 0, info, lr


def _record(state: TrainState, *, loss: float, lr: float, info, tokens_per_s: float, health: dict) -> dict:
    return {"split": "train", "step": state.step, "loss": loss, "lr": lr, "grad_norm": info.grad_norm,
            **health, "tokens_per_s": round(tokens_per_s, 1), "elapsed": round(state.elapsed, 2)}


def _periodic_eval(model, held: TokenDataset, *, tokenizer, opts: Options, mesh, metrics: MetricsLog,
                   step: int) -> None:
    m = heldout_metrics(model, held, mesh=mesh, tokenizer=tokenizer, block_size=held.block_size,
                        max_windows=opts.train.eval_windows)
    metrics.log({"split": "eval", "step": step, "loss": m["loss"], "perplexity": m["perplexity"],
                 "bits_per_byte": m["bits_per_byte"]})
    log.info("step %d: held-out loss %.3f (perplexity %.1f) on %d windows", step, m["loss"],
             m["perplexity"], m["windows"])
    if mesh.rank == 0:
        plot_losses(metrics.path, opts.run_dir / "loss.png", title=opts.run_name)


def _due(step: int, interval: int, total: int) -> bool:
    return bool(interval) and step % interval == 0 and step < total


def train_loop(model, opt, sched, *, opts: Options, mesh, data: RunData, tokenizer, state: TrainState,
               metrics: MetricsLog, stop: StopFlag) -> None:
    """Steps ``state.step .. train.steps``; stops early (after a save) when a stop is agreed."""
    t = opts.train
    block = model.config.block_size
    train_ds, held = TokenDataset(data.train_path, block), TokenDataset(data.heldout_path, block)
    progress = Progress(total=t.steps, initial=state.step, enabled=mesh.rank == 0, desc=opts.run_name,
                        log_interval=t.log_interval, elapsed_before=state.elapsed)
    guard = NonFiniteGuard(max_bad_steps=t.max_bad_steps, ckpt_root=ckpt_root(opts), lr=opts.optim.lr,
                           resume_hint=f"zerotrain train --run-name {opts.run_name} --runs-dir {opts.run.runs_dir}",
                           speak=mesh.rank == 0)
    while state.step < t.steps:
        x, y = batches(train_ds, batch_size=t.batch_size, block_size=block, seed=t.seed, step=state.step,
                       dp_rank=mesh.dp_rank, dp_size=mesh.dp)
        x, y = to_device(x, mesh.device), to_device(y, mesh.device)
        start = time.perf_counter()
        loss, stopping, info, lr = _train_step(model, opt, sched, (x, y), stop=stop, mesh=mesh, step=state.step + 1)
        state.step += 1
        state.losses.append(loss)
        progress.update(state.step, loss, t.batch_size * block)
        state.elapsed = progress.elapsed
        health = guard.update(state.step, loss, info)
        metrics.log(_record(state, loss=loss, lr=lr, info=info, health=health,
                            tokens_per_s=t.batch_size * block / (time.perf_counter() - start)))
        if _due(state.step, t.eval_interval, t.steps):
            _periodic_eval(model, held, tokenizer=tokenizer, opts=opts, mesh=mesh, metrics=metrics,
                           step=state.step)
        if guard.wants_save(stopping or state.step == t.steps or _due(state.step, t.ckpt_interval, t.steps),
                            state.step):
            save(model, opt, sched, opts=opts, state=state)
        if stopping:
            state.interrupted = True
            break
    progress.close()
    if not state.interrupted:
        guard.check_end(state.step)


def train(mesh, opts: Options, *, stop: StopFlag | None = None, tensorboard: bool = True) -> TrainState:
    """Run (or resume) ``opts``'s training on this rank; returns the final state on every rank."""
    stop = stop or StopFlag()
    rank0 = mesh.rank == 0
    data = prepare_data(opts, build=False)
    tokenizer = load_tokenizer(data.tokenizer_path)
    model = build_model(opts, tokenizer.vocab_size, mesh)
    opt = build_optimizer(model, opts)
    state = TrainState()
    resume(model, opt, opts, state)
    sched = lr_schedule_for(opt, opts, step=state.step)
    metrics = MetricsLog(opts.run_dir, enabled=rank0, resume_step=state.step, tensorboard=tensorboard)
    if state.step >= opts.train.steps:
        log.info("run %s is already at step %d of %d; evaluating it (raise --steps to train longer)",
                 opts.run_name, state.step, opts.train.steps)
    else:
        log.info("training %s: %s parameters, ZeRO stage %d on %d rank(s) (dp %d x tp %d), "
                 "%d steps x %d sequences x %d tokens", opts.run_name, f"{count_parameters(model.config):,}",
                 opts.parallel.stage, mesh.world_size, mesh.dp, mesh.tp, opts.train.steps,
                 opts.train.batch_size, model.config.block_size)
        train_loop(model, opt, sched, opts=opts, mesh=mesh, data=data, tokenizer=tokenizer, state=state,
                   metrics=metrics, stop=stop)
    if not state.interrupted:
        state.results = final_report(model, opts=opts, mesh=mesh, data=data, tokenizer=tokenizer,
                                     state=state, metrics=metrics)
    metrics.close()
    return state


def final_report(model, *, opts: Options, mesh, data: RunData, tokenizer, state: TrainState,
                 metrics: MetricsLog) -> dict:
    t = opts.train
    results = evaluate_run(model, data, tokenizer, mesh=mesh, block_size=model.config.block_size,
                           cloze_passages=t.cloze_passages, sample_tokens=t.sample_tokens, seed=t.seed)
    tail = state.losses[-10:]
    results["training"] = {"step": state.step, "tokens": state.step * t.batch_size * model.config.block_size,
                           "elapsed_s": round(state.elapsed, 1),
                           "final_train_loss": sum(tail) / len(tail) if tail else None}
    results["training"]["tokens_per_s"] = round(results["training"]["tokens"] / max(state.elapsed, 1e-9))
    m = results["model"]
    metrics.log({"split": "eval", "step": state.step, "loss": m["loss"], "perplexity": m["perplexity"],
                 "bits_per_byte": m["bits_per_byte"], "final": True})
    if mesh.rank == 0:
        plot_losses(metrics.path, opts.run_dir / "loss.png", title=opts.run_name)
        (opts.run_dir / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
        log.info("%s", format_results(results))
    return results
