"""zerotrain on one GPU beside plain PyTorch and FSDP2: step time, tokens/s, MFU, peak memory and
loss agreement, at micro-batch 8 and 1, in one run.

    python3 bench/gpu.py                       # GPT 24 x 2048, seq 2048, bf16 (under 5 minutes, H200)
    python3 bench/gpu.py --quick --device cpu  # a tiny model on the CPU: checks the script

Systems (each from the same weights, built on the GPU with the same seed):
  torch    fp32 parameters, bf16 autocast, fused AdamW (plain PyTorch)
  fsdp2    fully_shard per block and the root, MixedPrecisionPolicy(bf16 params, fp32 reduce)
  zt-s0..3 zerotrain.shard_model(stage=s, mixed_precision="bf16"): bf16 parameters, fp32 master,
           fp32 reductions, fused AdamW on the master
One process, world 1 (NCCL refuses two ranks on one GPU). MFU = tokens/s x (6 N + 12 L d T) / peak,
N without position embeddings; peak 989e12 (H200/H100 dense bf16). Results: bench/results/gpu.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

import zerotrain
from zerotrain.model import GPT, GPTConfig

PEAK_FLOPS = 989e12
FULL = dict(n_layer=24, n_embd=2048, n_head=16, vocab_size=50304, block_size=2048)
QUICK = dict(n_layer=2, n_embd=128, n_head=4, vocab_size=512, block_size=64)
SYSTEMS = ("torch", "fsdp2", "zt-s0", "zt-s1", "zt-s2", "zt-s3")


def _init_group(device: torch.device) -> None:
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def build(system: str, cfg: GPTConfig, device: torch.device):
    """(model, optimizer, autocast?) for ``system``, from the same seed."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg)
    if system == "torch":
        return model, torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True), True
    if system == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model, torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True), False
    mesh = zerotrain.Mesh.default()
    zerotrain.shard_model(model, stage=int(system[-1]), mesh=mesh, mixed_precision="bf16", device=device)
    return model, zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=3e-4), False


def batches(cfg: GPTConfig, micro: int, n: int, device):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randint(0, cfg.vocab_size, (micro, cfg.block_size + 1), generator=g)
        out.append((x[:, :-1].pin_memory() if device.type == "cuda" else x[:, :-1],
                    x[:, 1:].contiguous()))
    return [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in out]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(system: str, cfg: GPTConfig, micro: int, device, *, warmup: int, steps: int) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, opt, autocast = build(system, cfg, device)
    data = batches(cfg, micro, warmup + steps, device)
    losses, times = [], []
    for i, (x, y) in enumerate(data):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    tokens_s = micro * cfg.block_size / step_s
    flops_per_token = 6 * _dense_params(cfg) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    out = {"system": system, "micro_batch": micro, "step_s": step_s, "tokens_s": tokens_s,
           "mfu": tokens_s * flops_per_token / PEAK_FLOPS, "losses": [float(v) for v in losses[:10]]}
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    del model, opt, data
    return out


def _dense_params(cfg: GPTConfig) -> int:
    """Parameters without position embeddings, tied embedding once (the MFU convention)."""
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    return V * d + L * (12 * d * d + 13 * d) + 2 * d


def write(rows: list[dict], args, path: str) -> str:
    ref = {r["micro_batch"]: r["losses"] for r in rows if r["system"] == "torch"}
    lines = [f"# One GPU: zerotrain beside plain PyTorch and FSDP2 ({args.device})", "",
             f"`python3 bench/gpu.py{' --quick' if args.quick else ''}` — model {args.model}", "",
             "| system | micro-batch | step s | tokens/s | MFU | peak GiB (allocated / reserved) | max loss diff vs torch (10 steps) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = max(abs(a - b) for a, b in zip(r["losses"], ref[r["micro_batch"]]))
        mem = (f"{r['peak_allocated_gib']:.1f} / {r['peak_reserved_gib']:.1f}" if "peak_allocated_gib" in r else "-")
        lines.append(f"| {r['system']} | {r['micro_batch']} | {r['step_s']:.4f} | {r['tokens_s']:,.0f} | "
                     f"{100 * r['mfu']:.1f} % | {mem} | {diff:.4f} |")
    text = "\n".join(lines) + "\n"
    with open(path + ".md", "w") as f:
        f.write(text)
    with open(path + ".json", "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--micro-batches", default="8,1")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gpu"))
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    _init_group(device)
    cfg = GPTConfig(**(QUICK if args.quick else FULL))
    args.model = f"GPT {cfg.n_layer} x {cfg.n_embd}, {cfg.n_head} heads, vocab {cfg.vocab_size}, seq {cfg.block_size}"
    rows = []
    for micro in map(int, args.micro_batches.split(",")):
        for system in args.systems.split(","):
            rows.append(measure(system, cfg, micro, device, warmup=args.warmup, steps=args.steps))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
    print(write(rows, args, args.out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
