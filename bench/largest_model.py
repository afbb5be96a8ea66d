"""The largest GPT that completes 3 training steps on 2 ranks, under DDP and each ZeRO stage.

    .venv/bin/python bench/largest_model.py --budget-gb 20          # all systems, fp32
    .venv/bin/python bench/largest_model.py --budget-gb 3 --systems ddp,zt-s3   # a quick check

A candidate of P parameters is a GPT of width d (a multiple of 64, d ≈ (P / 0.1875)^(1/3), i.e.
about d/64 layers) with as many layers as make P; it runs in two fresh spawned ranks (gloo,
OMP_NUM_THREADS=1, MALLOC_MMAP_THRESHOLD_=1 MiB) while a watchdog sums both ranks' RSS every
50 ms and kills them (by PID) past the budget. The search starts at the planner's prediction,
steps ×1.25 until it has a size that fits and one that does not, then bisects to 4%.
Results: bench/results/largest_model.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch

from common import (BenchConfig, RankFailed, code_version, current_rss_bytes, exit_on_sigterm, num_params, peak_rss_bytes,
                    rank_batches, spawn)
from systems import SYSTEMS, build, global_mean

GB = 1e9
VOCAB, SEQ = 8192, 32


def candidate(target: float) -> BenchConfig:
    """A GPT of about ``target`` parameters, width and depth scaled together."""
    d = max(128, 64 * round((target / 0.1875) ** (1 / 3) / 64))
    per_layer = 12 * d * d + 13 * d
    layers = max(1, round((target - (VOCAB + SEQ) * d) / per_layer))
    return BenchConfig(n_layer=layers, n_embd=d, n_head=d // 64, vocab_size=VOCAB, seq_len=SEQ,
                       micro_batch=1, warmup=0, steps=3)


def train(rank: int, world: int, name: str, cfg: BenchConfig, bf16: bool) -> dict:
    t0 = time.perf_counter()
    runner = build(SYSTEMS[name], cfg, bf16=bf16)
    built = time.perf_counter() - t0
    losses = [float(runner.step(x, y)) for x, y in rank_batches(cfg, rank)[:cfg.steps]]
    return {"losses": global_mean(losses), "rss": peak_rss_bytes(), "build_s": built,
            "train_s": time.perf_counter() - t0 - built}


class Watchdog:
    def __init__(self, budget: float):
        self.budget, self.peak = budget, 0

    def __call__(self, pids):
        total = sum(current_rss_bytes(p) for p in pids)
        self.peak = max(self.peak, total)
        if total > self.budget:
            return f"total RSS {total / GB:.2f} GB > budget {self.budget / GB:.2f} GB"
        return None


def attempt(name: str, target: float, budget: float, bf16: bool, timeout: float) -> dict:
    cfg = candidate(target)
    dog = Watchdog(budget)
    t0 = time.monotonic()
    try:
        ranks = spawn(train, cfg.world, name, cfg, bf16, timeout=timeout, watchdog=dog)
        ok = all(math.isfinite(v) for v in ranks[0]["losses"])
        out = {"fits": ok, "why": "" if ok else "non-finite loss", "rank_rss": [r["rss"] for r in ranks],
               "losses": ranks[0]["losses"]}
    except RankFailed as exc:
        out = {"fits": False, "why": str(exc).splitlines()[-1][:160]}
    out.update(params=num_params(cfg), n_layer=cfg.n_layer, n_embd=cfg.n_embd, target=target,
               watchdog_peak=dog.peak, wall_s=round(time.monotonic() - t0))
    print(f"  {name:8s} {out['params'] / 1e6:8.1f}M (L={cfg.n_layer:3d} d={cfg.n_embd:5d}) "
          f"{'fits' if out['fits'] else 'FAILS'}  peak total {dog.peak / GB:5.2f} GB  "
          f"{out['wall_s']:4d}s  {out['why']}", flush=True)
    return out


def predicted(name: str, budget: float, bf16: bool) -> float:
    """The planner's largest P whose two ranks' peak RSS fits the budget (the search's start)."""
    from zerotrain.planner import ModelSpec, plan
    stage = SYSTEMS[name].stage if SYSTEMS[name].kind == "zerotrain" else 0
    lo, hi = 1e6, 1e11
    while hi / lo > 1.01:
        mid = math.sqrt(lo * hi)
        c = candidate(mid)
        p = plan(ModelSpec.from_config(c.gpt_config()), stage=stage, dp=c.world,
                 param_dtype="bf16" if bf16 else "fp32", micro_batch=c.micro_batch, seq_len=c.seq_len)
        lo, hi = (mid, hi) if c.world * p.peak_rss_bytes <= budget else (lo, mid)
    return lo


def search(name: str, budget: float, *, bf16: bool, tol: float, timeout: float) -> dict:
    start = predicted(name, budget, bf16)
    print(f"{name}: planner predicts {start / 1e6:.0f}M parameters fit {budget / GB:.1f} GB", flush=True)
    tries = [attempt(name, start, budget, bf16, timeout)]
    step = 1.25 if tries[0]["fits"] else 1 / 1.25
    while (tries[-1]["fits"] == tries[0]["fits"]) and len(tries) < 8:
        tries.append(attempt(name, tries[-1]["target"] * step, budget, bf16, timeout))
    fit = [t for t in tries if t["fits"]]
    fail = [t for t in tries if not t["fits"]]
    while fit and fail:
        lo, hi = max(fit, key=lambda t: t["params"]), min(fail, key=lambda t: t["params"])
        mid = math.sqrt(lo["target"] * hi["target"])
        if hi["params"] / lo["params"] <= 1 + tol or num_params(candidate(mid)) in (lo["params"], hi["params"]):
            break                   # within tolerance, or no distinct shape left in between
        t = attempt(name, mid, budget, bf16, timeout)
        tries.append(t)
        (fit if t["fits"] else fail).append(t)
    best = max(fit, key=lambda t: t["params"]) if fit else None
    first_fail = min((t for t in fail if not best or t["params"] > best["params"]),
                     key=lambda t: t["params"], default=None)
    return {"system": name, "planner_start": start, "best": best, "first_fail": first_fail, "tries": tries}


def write(out_dir: str, results: list[dict], meta: dict) -> str:
    ddp = next((r["best"]["params"] for r in results if r["system"] == "ddp" and r["best"]), None)
    lines = [f"Command: `{meta['command']}` (wall {meta['wall_s']} s, torch {meta['torch']}, zerotrain at "
             f"{meta['commit']}); budget "
             f"{meta['budget_gb']} GB total RSS of 2 ranks, {meta['dtype']}, AdamW, micro-batch 1 × seq {SEQ}, "
             f"vocab {VOCAB}, 3 steps; search tolerance {meta['tol']:.0%}.", "",
             "| system | largest that trains | shape (layers × width) | × DDP | peak RSS per rank (GB) "
             "| watchdog peak total (GB) | smallest that failed | planner's start |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        b, f = r["best"], r["first_fail"]
        start = f"{r['planner_start'] / 1e6:.0f}M"
        if b is None:
            lines.append(f"| {r['system']} | none | | | | | | {start} |")
            continue
        failed = f"{f['params'] / 1e6:.0f}M ({f['why']})" if f else "—"
        ratio = f"{b['params'] / ddp:.2f}" if ddp else "—"
        rss = ", ".join(f"{x / GB:.2f}" for x in b["rank_rss"])
        lines.append(f"| {r['system']} | {b['params'] / 1e6:.0f}M | {b['n_layer']} × {b['n_embd']} | {ratio} "
                     f"| {rss} | {b['watchdog_peak'] / GB:.2f} | {failed} | {start} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, meta["name"] + ".md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(out_dir, meta["name"] + ".json"), "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-gb", type=float, default=20.0, help="total RSS of both ranks (default 20)")
    ap.add_argument("--systems", default="ddp,zt-s0,zt-s1,zt-s2,zt-s3")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--tol", type=float, default=0.04, help="stop bisecting at hi/lo <= 1 + tol")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per candidate")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default="largest_model")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    budget = args.budget_gb * GB
    avail = _mem_available()
    if budget > avail - 1.5 * GB:
        raise SystemExit(f"--budget-gb {args.budget_gb}: only {avail / GB:.1f} GB is available now "
                         f"(others use this machine); pass --budget-gb {max(1.0, (avail / GB) - 2):.0f} or less")
    version = code_version()
    t0 = time.monotonic()
    results = [search(s, budget, bf16=args.bf16, tol=args.tol, timeout=args.timeout)
               for s in args.systems.split(",")]
    meta = {"command": "python bench/largest_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "budget_gb": args.budget_gb, "dtype": "bf16" if args.bf16 else "fp32", "tol": args.tol,
            "wall_s": round(time.monotonic() - t0), "torch": torch.__version__, "name": args.name, "commit": version,
            "candidate": asdict(candidate(1e8)) | {"n_layer": "scaled", "n_embd": "scaled", "n_head": "d/64"}}
    os.makedirs(args.out, exist_ok=True)
    print(write(args.out, results, meta))
    return 0


def _mem_available() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


if __name__ == "__main__":
    sys.exit(main())
