"""A GPT larger than a dense build allows: constructed on the meta device, sharded at ZeRO stage 3,
trained for a few steps — each rank holding its shard, never the model.

    .venv/bin/python bench/meta_build.py --params 1.11e9 --width 768 --activation-checkpointing   # 1.11B, world 4
    .venv/bin/python bench/meta_build.py --params 2e8 --world 2  # a quick check

Per rank: peak RSS while building (meta → sharded) and over the whole run, the planner's peak RSS
for the same setting, and the bytes a dense build would have held before sharding (4Ψ fp32 per
rank, plus a flat copy of the largest unit). Also the summed RSS of all ranks, sampled every 50 ms.
Results: bench/results/meta_build.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import zerotrain
from common import code_version, current_rss_bytes, exit_on_sigterm, peak_rss_bytes, rank_batches, spawn
from largest_model import candidate

GB = 1e9


def run(rank: int, world: int, cfg, stage: int, recompute: bool = False) -> dict:
    from zerotrain.model import GPT
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    with torch.device("meta"):
        model = GPT(cfg.gpt_config())
    zerotrain.shard_model(model, stage=stage, mesh=zerotrain.Mesh.default(), activation_checkpointing=recompute)
    build_peak, built = peak_rss_bytes(), time.perf_counter() - t0
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=cfg.lr, weight_decay=0.01)
    losses, step_s = [], []
    for x, y in rank_batches(cfg, rank)[:cfg.steps]:
        t = time.perf_counter()
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        step_s.append(time.perf_counter() - t)
        losses.append(loss.item())
    return {"build_s": built, "build_peak": build_peak, "peak": peak_rss_bytes(), "losses": losses,
            "step_s": step_s, "numel": sum(u.layout.numel for u in model.zero_state.units),
            "report": zerotrain.memory_report(model, opt)}


class TotalRSS:
    def __init__(self):
        self.peak = 0

    def __call__(self, pids):
        self.peak = max(self.peak, sum(current_rss_bytes(p) for p in pids))
        return None


def predicted(cfg, stage: int, world: int, recompute: bool = False):
    from zerotrain.planner import ModelSpec, plan
    spec = ModelSpec.from_config(cfg.gpt_config())
    return plan(spec, stage=stage, dp=world, param_dtype="fp32", micro_batch=cfg.micro_batch,
                seq_len=cfg.seq_len, device="cpu", activation_checkpointing=recompute)


def write(out: dict, path: str) -> None:
    r0, p = out["ranks"][0], out["plan"]
    lines = [f"# Meta construction at ZeRO stage {out['stage']}, world {out['world']}"
             f"{', activation checkpointing' if out.get('recompute') else ''}", "",
             f"`{out['command']}` at {out['commit']}", "",
             f"GPT: {out['config']} = **{r0['numel'] / 1e9:.3f}B parameters** ({4 * r0['numel'] / GB:.2f} GB fp32)", "",
             "| rank | build s | peak RSS building | peak RSS over the run | step s (3 steps) | losses |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(out["ranks"]):
        lines.append(f"| {i} | {r['build_s']:.1f} | {r['build_peak'] / GB:.2f} GB | {r['peak'] / GB:.2f} GB | "
                     f"{', '.join(f'{s:.1f}' for s in r['step_s'])} | {', '.join(f'{v:.3f}' for v in r['losses'])} |")
    lines += ["", f"- all ranks together, sampled every 50 ms: peak {out['total_peak'] / GB:.2f} GB",
              f"- planner, peak RSS per rank: {p['peak_rss_bytes'] / GB:.2f} GB "
              f"(measured/planned {r0['peak'] / p['peak_rss_bytes']:.3f})",
              f"- a dense build holds {4 * r0['numel'] / GB:.2f} GB of fp32 weights on every rank before sharding "
              f"({out['world'] * 4 * r0['numel'] / GB:.1f} GB for the {out['world']} ranks)"]
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(path + ".json", "w") as f:
        json.dump(out, f, indent=1, default=str)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1.15e9)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--width", type=int, default=None,
                    help="model width (default: scaled with the size); narrower means more, smaller units, "
                         "and a rank's transient buffers are a few units")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "meta_build"))
    args = ap.parse_args()
    exit_on_sigterm()
    cfg = candidate(args.params)
    if args.width:
        per_layer = 12 * args.width ** 2 + 13 * args.width
        layers = max(1, round((args.params - (cfg.vocab_size + cfg.seq_len) * args.width) / per_layer))
        cfg = type(cfg)(**{**cfg.__dict__, "n_embd": args.width, "n_head": args.width // 64, "n_layer": layers})
    cfg = type(cfg)(**{**cfg.__dict__, "world": args.world, "steps": 3, "micro_batch": 1})
    watch = TotalRSS()
    ranks = spawn(run, args.world, cfg, args.stage, args.activation_checkpointing, timeout=3600, watchdog=watch)
    out = {"command": "python " + " ".join(["bench/meta_build.py", *sys.argv[1:]]), "commit": code_version(),
           "stage": args.stage, "world": args.world, "recompute": args.activation_checkpointing,
           "config": cfg.__dict__, "ranks": ranks,
           "total_peak": watch.peak,
           "plan": predicted(cfg, args.stage, args.world, args.activation_checkpointing).to_dict()}
    write(out, args.out)


if __name__ == "__main__":
    main()
