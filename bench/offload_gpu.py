"""ZeRO-Offload on one GPU: the largest GPT that trains with and without offload, and offload's
step-time cost at 1.3B — in one run.

    python3 bench/offload_gpu.py                    # H200: ~6 minutes
    python3 bench/offload_gpu.py --quick --device cpu   # tiny sizes on the CPU: checks the script

Each candidate is a GPT of width 4096 (32 heads, vocabulary 50304, sequence 2048), as many layers
as make its size, built on the meta device and materialised on the GPU at ZeRO stage 3, bf16
(fp32 master and reductions), micro-batch 1, per-unit activation checkpointing, fused AdamW; it
trains ``--steps`` optimizer steps of ``--accum`` micro-batches. A candidate that runs out of GPU
memory (or host memory) is recorded as such. MFU counts 6 N + 12 L d T FLOPs per token of 989e12.
Results: bench/results/offload_gpu.{md,json}.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
import torch.distributed as dist

import zerotrain
from zerotrain.model import GPT, GPTConfig

PEAK = 989e12


def config(params: float, *, width: int, seq: int, vocab: int) -> GPTConfig:
    per_layer = 12 * width * width + 13 * width
    layers = max(1, round((params - (vocab + seq) * width) / per_layer))
    return GPTConfig(vocab_size=vocab, block_size=seq, n_layer=layers, n_head=max(1, width // 128),
                     n_embd=width)


def attempt(cfg: GPTConfig, *, offload: bool, steps: int, accum: int, device) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    n = cfg.vocab_size * cfg.n_embd + cfg.n_layer * (12 * cfg.n_embd ** 2 + 13 * cfg.n_embd)
    row = {"params": n, "layers": cfg.n_layer, "offload": offload}
    model = opt = None
    try:
        torch.manual_seed(0)
        with torch.device("meta"):
            model = GPT(cfg)
        zerotrain.shard_model(model, stage=3, mesh=zerotrain.Mesh.single(device), mixed_precision="bf16",
                              activation_checkpointing=True)
        opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-4, offload="cpu" if offload else None)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            for _ in range(accum):
                x = torch.randint(0, cfg.vocab_size, (1, cfg.block_size), device=device)
                model(x, x).backward()
            opt.step()
            opt.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        step_s = min(times[1:] or times)
        tokens_s = accum * cfg.block_size / step_s
        row.update(ok=True, step_s=step_s, tokens_s=tokens_s,
                   mfu=tokens_s * (6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size) / PEAK,
                   memory=zerotrain.memory_report(model, opt))
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    finally:
        del model, opt
        gc.collect()
    print(json.dumps({k: v for k, v in row.items() if k != "memory"}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "offload_gpu"))
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="tcp://127.0.0.1:29513",
                            rank=0, world_size=1)
    shape = dict(width=256, seq=64, vocab=512) if args.quick else dict(width=4096, seq=2048, vocab=50304)
    sizes = [2e7, 4e7] if args.quick else [7.46e9, 8.67e9, 9.0e9, 9.5e9]
    cost = 1e7 if args.quick else 1.3e9
    steps, accum = (2, 2) if args.quick else (3, 16)
    rows = {"largest": [], "cost": []}
    for offload in (False, True):
        for size in sizes:
            rows["largest"].append(attempt(config(size, **shape), offload=offload, steps=2, accum=1, device=device))
        rows["cost"].append(attempt(config(cost, **shape), offload=offload, steps=steps, accum=accum, device=device))
    lines = [f"# ZeRO-Offload on one {args.device} device", "", f"`python3 bench/offload_gpu.py"
             f"{' --quick' if args.quick else ''}`", "", "| params | offload | trains | step s | MFU | peak GiB |",
             "|---|---|---|---|---|---|"]
    for r in rows["largest"] + rows["cost"]:
        lines.append(f"| {r['params'] / 1e9:.2f}B | {'cpu' if r['offload'] else 'no'} | "
                     f"{'yes' if r['ok'] else r['error']} | {r.get('step_s', 0):.2f} | "
                     f"{100 * r.get('mfu', 0):.1f} % | {r.get('peak_gib', 0):.1f} |")
    text = "\n".join(lines) + "\n"
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1, default=str)
    print(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
