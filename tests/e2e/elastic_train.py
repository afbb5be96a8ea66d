"""A tiny ZeRO-3 training run for the elastic-restart test, launched under torchrun.

Each rank writes its PID to ``<out>/pid.<attempt>.<rank>``; rank 0 appends ``step loss`` lines to
``<out>/losses.<attempt>.txt`` and writes ``<out>/final.json`` at the end. On the first attempt the
ranks stop after ``--pause-at`` steps and wait (to be killed by the test); torchrun restarts the
group, which resumes from the latest checkpoint. ``train`` is also the uninterrupted reference.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import zerotrain
from zerotrain import checkpoint
from zerotrain.distributed import comm
from zerotrain.model import GPT, GPTConfig

VOCAB, SEQ, PER_RANK = 64, 16, 4


def build(mesh):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=16, dropout=0.1))
    zerotrain.shard_model(model, stage=3, mesh=mesh)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, None, lr=3e-3, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=10)
    return model, opt, sched


def train(mesh, *, steps: int, ckpt: str | None = None, save_every: int = 0, on_step=None) -> list:
    model, opt, sched = build(mesh)
    start, losses = 0, []
    if ckpt and checkpoint.latest_tag(ckpt):
        start = checkpoint.load(ckpt, model=model, optimizer=opt, scheduler=sched)["client_state"]["next_step"]
    for step in range(start, steps):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, VOCAB, (PER_RANK * mesh.dp, SEQ + 1), generator=g)
        idx = idx[mesh.dp_rank * PER_RANK:(mesh.dp_rank + 1) * PER_RANK]
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        loss = loss.detach()
        comm.all_reduce(loss, mesh.dp_group, op="avg")
        losses.append((step, loss.item()))
        if ckpt and save_every and (step + 1) % save_every == 0:
            checkpoint.save(ckpt, model=model, optimizer=opt, scheduler=sched, step=step + 1,
                            client_state={"next_step": step + 1}, keep_last=2)
        if on_step is not None:
            on_step(step, loss.item())
    return losses


def reference(mesh, steps: int) -> list:
    return train(mesh, steps=steps)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--pause-at", type=int, default=13)
    args = p.parse_args()
    torch.set_num_threads(1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    out = Path(args.out)
    _write(out / f"pid.{attempt}.{os.environ['RANK']}", str(os.getpid()))   # before anything can hang
    mesh = zerotrain.init_distributed(backend="gloo")     # joins under a per-restart store prefix

    def on_step(step: int, loss: float) -> None:
        if mesh.rank == 0:
            with open(out / f"losses.{attempt}.txt", "a") as f:
                f.write(f"{step} {loss!r}\n")
        if attempt == 0 and step + 1 == args.pause_at:
            _write(out / f"paused.{mesh.rank}", str(step))
            time.sleep(120)                       # wait here to be killed

    losses = train(mesh, steps=args.steps, ckpt=args.ckpt, save_every=args.save_every, on_step=on_step)
    if mesh.rank == 0:
        _write(out / "final.json", json.dumps({"attempt": attempt, "losses": losses}))
    import torch.distributed as dist
    from datetime import timedelta
    dist.monitored_barrier(timeout=timedelta(seconds=30))     # leave together: no teardown abort
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
