"""A PyTorch-style training script for the fault-injection tests, run under torchrun:
``init_distributed`` + ``shard_model`` + ``ShardedOptimizer`` on a tiny GPT, with one fault.

    fault_job.py --stage 3 --steps 4 --out DIR [--raise-rank 1 --raise-step 2] [--extra-rank 1]

Under torchrun it joins torchrun's group; with ``--store PATH`` (and RANK, WORLD_SIZE in the
environment) the ranks meet through a ``file://`` store instead, without an agent around them.
Each rank writes its pid to ``DIR/pid.<rank>``. ``--raise-rank/--raise-step``: that rank raises in its forward at that step (0-based), after
writing the time to ``DIR/raised``. ``--extra-rank``: that rank runs one step more than the others.
Every rank writes ``DIR/done.<rank>`` when its loop ends normally.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zerotrain  # noqa: E402
from models import TinyGPT, make_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", required=True)
    ap.add_argument("--raise-rank", type=int, default=None)
    ap.add_argument("--raise-step", type=int, default=None)
    ap.add_argument("--extra-rank", type=int, default=None)
    ap.add_argument("--store", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    if args.store:
        mesh = zerotrain.init_distributed(backend="gloo", init_method=f"file://{args.store}",
                                          rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    else:
        mesh = zerotrain.init_distributed(backend="gloo")
    (out / f"pid.{mesh.rank}").write_text(str(os.getpid()))
    torch.manual_seed(0)
    model = TinyGPT(vocab=23, d=16, n_layer=2, ctx=8)
    zerotrain.shard_model(model, stage=args.stage, mesh=mesh)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-3)
    steps = args.steps + (1 if mesh.rank == args.extra_rank else 0)
    for step in range(steps):
        x, y = make_batch("gpt", 6, step)
        if mesh.rank == args.raise_rank and step == args.raise_step:
            (out / "raised").write_text(repr(time.time()))
            raise ValueError(f"boom in the forward of step {step}")
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    (out / f"done.{mesh.rank}").write_text(repr(time.time()))


if __name__ == "__main__":
    main()
