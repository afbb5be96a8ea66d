"""One rank of a fine-tuning run: base checkpoint (or own, to resume) → mixed-task steps → save.

``finetune(mesh, opts)`` runs on every rank, like ``trainer.train``: ``opts`` are the run's
effective options (``FinetuneOptions.effective``) and the run directory already holds
``finetune.json``, the tokenizer and the encoded task data (the launcher wrote them). A new run
loads the pretrained run's latest checkpoint into the model only (saved at any ZeRO stage, world
size or tp degree: the checkpoint loader reshards) and starts a fresh optimizer; a run that has
checkpoints of its own resumes from them, optimizer included. Unless ``train.copy_head`` is off the
model gains a copy head (``GPTConfig.copy_head``) that the base checkpoint lacks: only its parameters
may be missing there, and they start from their seeded initialisation, the same at every layout.

Loss on answer tokens only (the LM head runs on those positions alone: most positions of a
fine-tuning batch are prompt or padding), normalised by the answer tokens of the *global* batch: each rank
scales its local mean by (local answer tokens × dp / global answer tokens), so the averaged
gradient is that of one process holding the whole batch, whatever the split over ranks.
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch

from zerotrain.data import load_tokenizer
from zerotrain.data.tasks.prompts import IGNORE, Encoded
from zerotrain.distributed import comm

from .finetune_data import TaskMix, copy_path, data_path, eval_batches
from .finetune_options import read_finetune
from .metrics import MetricsLog, Progress
from .options import Options
from .placement import device_of, to_device
from .plots import plot_losses
from .trainer import (StopFlag, TrainState, _checkpoint_api, build_model, build_optimizer, lr_schedule_for,
                      ckpt_root, count_parameters, resume, save)

log = logging.getLogger("zerotrain")


def _start(model, opt, opts: Options, spec, state: TrainState) -> None:
    ckpt = _checkpoint_api()
    root = ckpt_root(opts)
    if root.is_dir() and ckpt.latest_tag(root) is not None:
        resume(model, opt, opts, state)
        return
    info = ckpt.load(spec.base, model=model, new_params=("copy_head.",))
    log.info("fine-tuning from %s (pretrained for %d steps)%s", spec.base, info["step"],
             ", a new copy head" if info["new"] else "")


def _step(model, opt, sched, batch, *, stop, mesh) -> tuple[float, bool, object, float]:
    x, y, global_tokens = batch
    x, y = to_device(x, mesh.device), to_device(y, mesh.device)
    lr = opt.param_groups[0]["lr"]
    local_tokens = int((y != IGNORE).sum())
    loss = model(x, y, labelled_only=True) * (local_tokens * mesh.dp / global_tokens)
    opt.scale_loss(loss).backward()
    info = opt.step()
    sched.step()
    opt.zero_grad()
    agreed = torch.tensor([loss.item() / mesh.dp, float(stop.requested)], dtype=torch.float64, device=mesh.device)
    comm.all_reduce(agreed, mesh.world_group)
    return agreed[0].item() / mesh.tp, agreed[1].item() > 0, info, lr


@torch.no_grad()
def heldout_loss(model, data: Encoded, *, examples: int, pad_id: int) -> float:
    """Mean answer-token loss on the first ``examples`` held-out examples. Every rank runs the same
    batches (the same forwards, as ZeRO-3's gathers need), so no reduction is needed."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    for x, y in eval_batches(data, examples=examples, pad_id=pad_id):
        x, y = to_device(x, device_of(model)), to_device(y, device_of(model))
        n = int((y != IGNORE).sum())
        total += model(x, y, labelled_only=True).item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _evaluate(model, tests: dict, *, spec, metrics: MetricsLog, step: int, pad_id: int, final=False) -> dict:
    losses = {t: heldout_loss(model, d, examples=spec.train.eval_examples, pad_id=pad_id) for t, d in tests.items()}
    metrics.log({"split": "eval", "step": step, "loss": sum(losses.values()) / len(losses),
                 **{f"loss_{t}": v for t, v in losses.items()}, **({"final": True} if final else {})})
    log.info("step %d: held-out answer loss %s", step, "  ".join(f"{t} {v:.3f}" for t, v in losses.items()))
    return losses


def _loop(model, opt, sched, *, opts: Options, spec, mesh, mix: TaskMix, tests: dict, state: TrainState,
          metrics: MetricsLog, stop) -> None:
    t = spec.train
    progress = Progress(total=t.steps, initial=state.step, enabled=mesh.rank == 0, desc=opts.run_name,
                        log_interval=t.log_interval, elapsed_before=state.elapsed)
    while state.step < t.steps:
        batch = mix.batch(state.step, batch_size=t.batch_size, dp_rank=mesh.dp_rank, dp_size=mesh.dp)
        start = time.perf_counter()
        loss, stopping, info, lr = _step(model, opt, sched, batch, stop=stop, mesh=mesh)
        state.step += 1
        state.losses.append(loss)
        tokens = batch[0].numel() * mesh.dp
        progress.update(state.step, loss, tokens)
        state.elapsed = progress.elapsed
        metrics.log({"split": "train", "step": state.step, "loss": loss, "lr": lr, "grad_norm": info.grad_norm,
                     "skipped": info.skipped, "answer_tokens": batch[2],
                     "tokens_per_s": round(tokens / (time.perf_counter() - start), 1),
                     "elapsed": round(state.elapsed, 2)})
        if t.eval_interval and state.step % t.eval_interval == 0 and state.step < t.steps:
            _evaluate(model, tests, spec=spec, metrics=metrics, step=state.step, pad_id=mix.pad_id)
            if mesh.rank == 0:
                plot_losses(metrics.path, opts.run_dir / "loss.png", title=opts.run_name)
        if stopping or state.step == t.steps or (t.ckpt_interval and state.step % t.ckpt_interval == 0):
            save(model, opt, sched, opts=opts, state=state)
        if stopping:
            state.interrupted = True
            break
    progress.close()


def finetune(mesh, opts: Options, *, stop: StopFlag | None = None, tensorboard: bool = True) -> TrainState:
    """Run (or resume) the fine-tuning run in ``opts.run_dir`` on this rank."""
    stop = stop or StopFlag()
    spec = read_finetune(opts.run_dir)
    tokenizer = load_tokenizer(opts.run_dir / "tokenizer.json")
    model = build_model(opts, tokenizer.vocab_size, mesh)
    opt = build_optimizer(model, opts)
    state = TrainState()
    _start(model, opt, opts, spec, state)
    sched = lr_schedule_for(opt, opts, step=state.step)
    names = spec.tasks.names
    t = spec.train
    copy_text = np.load(copy_path(opts.run_dir), mmap_mode="r") if t.copy_share > 0 or t.copy_steps > 0 else None
    mix = TaskMix([Encoded.load(data_path(opts.run_dir, n, "train")) for n in names], spec.tasks.weight_list(),
                  t.seed, tokenizer.eot_id, copy_text=copy_text, copy_share=t.copy_share, copy_steps=t.copy_steps)
    tests = {n: Encoded.load(data_path(opts.run_dir, n, "test")) for n in names}
    metrics = MetricsLog(opts.run_dir, enabled=mesh.rank == 0, resume_step=state.step, tensorboard=tensorboard)
    if state.step < spec.train.steps:
        log.info("fine-tuning %s: %s parameters on %s (weights %s), ZeRO stage %d on %d rank(s) (dp %d x tp %d), "
                 "%d steps x %d examples (the first %d copying exercises, then %.0f%% of each batch)", opts.run_name,
                 f"{count_parameters(model.config):,}", ",".join(names),
                 ",".join(f"{w:.2f}" for w in spec.tasks.weight_list()), opts.parallel.stage, mesh.world_size,
                 mesh.dp, mesh.tp, t.steps, t.batch_size, t.copy_steps, 100 * t.copy_share)
        _loop(model, opt, sched, opts=opts, spec=spec, mesh=mesh, mix=mix, tests=tests, state=state,
              metrics=metrics, stop=stop)
    if not state.interrupted:
        losses = _evaluate(model, tests, spec=spec, metrics=metrics, step=state.step, pad_id=mix.pad_id, final=True)
        tail = state.losses[-10:]
        state.results = {"heldout_answer_loss": losses, "step": state.step, "elapsed_s": round(state.elapsed, 1),
                         "final_train_loss": sum(tail) / len(tail) if tail else None}
        if mesh.rank == 0:
            plot_losses(metrics.path, opts.run_dir / "loss.png", title=opts.run_name)
            (opts.run_dir / "finetune_results.json").write_text(json.dumps(state.results, indent=1))
    metrics.close()
    return state
