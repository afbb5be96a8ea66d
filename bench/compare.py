"""zerotrain stages 0-3 against DDP, ZeroRedundancyOptimizer and FSDP2, side by side.

    .venv/bin/python bench/compare.py                  # full run: 3 rounds, fp32 and bf16
    .venv/bin/python bench/compare.py --quick          # a small model, 1 round: checks the script

Every (system, dtype) runs in a fresh pair of spawned ranks (gloo, file store, world 2,
OMP_NUM_THREADS=1) on the same GPT, weights, data and AdamW; rounds interleave the systems
(A B C ... A B C ...) and each round rotates their order. Per run: step times, the global loss
of every step, model-state bytes counted from live tensors after the last update, the collectives
of one step (zerotrain's comm_report(); for every system also the c10d ops counted at the
dispatcher), and each rank's peak RSS. Results: bench/results/compare*.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace

import torch

import zerotrain
from common import (BenchConfig, CollectiveCounter, code_version, comm_totals, exit_on_sigterm,
                    formula_bytes, num_params, peak_rss_bytes, rank_batches, spawn, spread)
from report import write_chart, write_markdown
from systems import SYSTEMS, build, global_mean

QUICK = dict(n_layer=2, n_embd=128, n_head=2, vocab_size=1024, seq_len=32, micro_batch=2,
             warmup=1, steps=3)
# Loss agreement with DDP at the same dtype (absolute, on losses of about ln(vocab) ≈ 9):
# fp32 differs only by reduction order; bf16 systems round differently from DDP under autocast.
LOSS_TOL = {"fp32": 1e-4, "bf16": 3e-2}


def measure(rank: int, world: int, name: str, cfg: BenchConfig, bf16: bool) -> dict:
    """One system on this rank: warm-up, timed steps, then one step under the collective counter."""
    runner = build(SYSTEMS[name], cfg, bf16=bf16)
    batches = rank_batches(cfg, rank)
    times, cpu, losses = [], [], []
    for x, y in batches[:-1]:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = runner.step(x, y)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)       # all threads of this rank (gloo's included)
        losses.append(float(loss))
    zerotrain.reset_comm_report()
    counter = CollectiveCounter(world)
    with counter:
        losses.append(float(runner.step(*batches[-1], measure=True)))
    return {"times": times[cfg.warmup:], "cpu": cpu[cfg.warmup:], "losses": global_mean(losses),
            "state": runner.state_bytes, "counted": counter.counts, "zerotrain_comm": zerotrain.comm_report(),
            "rss": peak_rss_bytes()}


def run_all(cfg: BenchConfig, systems: list[str], dtypes: list[str], rounds: int) -> list[dict]:
    runs = []
    for rnd in range(rounds):
        for dtype in dtypes:
            k = rnd % len(systems)
            for name in systems[k:] + systems[:k]:
                t0 = time.monotonic()
                per_rank = spawn(measure, cfg.world, name, cfg, dtype == "bf16")
                runs.append({"round": rnd, "dtype": dtype, "system": name, "ranks": per_rank})
                step = statistics.median(max(ts) for ts in zip(*(r["times"] for r in per_rank)))
                print(f"round {rnd} {dtype:4s} {name:9s} step {step * 1e3:8.1f} ms "
                      f"({time.monotonic() - t0:.0f}s)", flush=True)
    return runs


def _step_median(run) -> float:
    """Median over timed steps of the slowest rank's step time."""
    return statistics.median(max(ts) for ts in zip(*(r["times"] for r in run["ranks"])))


def summarize(runs: list[dict], cfg: BenchConfig) -> list[dict]:
    psi, n = num_params(cfg), cfg.world
    rows = []
    for dtype in dict.fromkeys(r["dtype"] for r in runs):
        mine = [r for r in runs if r["dtype"] == dtype]
        ddp = {r["round"]: _step_median(r) for r in mine if r["system"] == "ddp"}
        ddp_fused = {r["round"]: _step_median(r) for r in mine if r["system"] == "ddp-fused"}
        ref = next((r for r in mine if r["system"] == "ddp"), None)
        sizes = dict(p=4, g=4, k=8) if dtype == "fp32" else dict(p=2, g=4, k=12)
        for name in dict.fromkeys(r["system"] for r in mine):
            rs = [r for r in mine if r["system"] == name]
            row = _row(name, dtype, rs, ddp, ref, formula_bytes(SYSTEMS[name].stage, psi, n, **sizes))
            fused = [_step_median(r) / ddp_fused[r["round"]] for r in rs if r["round"] in ddp_fused]
            row["vs_ddp_fused"] = spread(fused) if fused else None
            rows.append(row)
    return rows


def _row(name, dtype, rs, ddp, ref, formula) -> dict:
    steps = [_step_median(r) for r in rs]
    cpu = [statistics.median(max(c) for c in zip(*(rk["cpu"] for rk in r["ranks"]))) for r in rs]
    ratios = [_step_median(r) / ddp[r["round"]] for r in rs if r["round"] in ddp]
    first = rs[0]["ranks"]
    state = max((rk["state"] for rk in first), key=lambda s: s["model_states"])
    zt = SYSTEMS[name].kind == "zerotrain"
    comm = [rk["zerotrain_comm"] if zt else rk["counted"] for rk in first]
    counted = [comm_totals(rk["counted"]) for rk in first]
    totals = [comm_totals(c) for c in comm]
    loss_diff = None
    if ref is not None:
        loss_diff = max(abs(a - b) for a, b in zip(first[0]["losses"], ref["ranks"][0]["losses"]))
    return {
        "system": name, "dtype": dtype, "stage": SYSTEMS[name].stage, "rounds": len(rs),
        "per_round": {r["round"]: s for r, s in zip(rs, steps)}, "step_s": spread(steps), "cpu_s": spread(cpu),
        "vs_ddp": spread(ratios) if ratios else None,
        "rss": spread([max(rk["rss"] for rk in r["ranks"]) for r in rs]),
        "state": state, "formula": formula, "vs_formula": state["model_states"] / formula,
        "comm_bytes": max(t[0] for t in totals), "comm_wire": max(t[1] for t in totals),
        "comm_ops": comm[0], "comm_source": "comm_report()" if zt else "c10d ops counted",
        "counter_agrees": all(abs(a[0] - b[0]) == 0 for a, b in zip(totals, counted)),
        "loss_diff": loss_diff, "loss_ok": loss_diff is not None and loss_diff <= LOSS_TOL[dtype],
        "losses": first[0]["losses"],
    }


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small model, 1 round (checks the script)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 1)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    for f in ("n_layer", "n_embd", "n_head", "vocab_size", "seq_len", "micro_batch", "warmup", "steps"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default=None, help="output file stem (default compare / compare_quick)")
    ap.add_argument("--render", default=None, help="re-write the .md/.png of a saved .json (no runs)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    exit_on_sigterm()
    if args.render:
        return _render(args.render)
    cfg = BenchConfig(**(QUICK if args.quick else {}))
    cfg = replace(cfg, **{f: getattr(args, f) for f in ("n_layer", "n_embd", "n_head", "vocab_size", "seq_len",
                                                          "micro_batch", "warmup", "steps")
                          if getattr(args, f) is not None})
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    rounds = args.rounds or (1 if args.quick else 3)
    print(f"model: {num_params(cfg) / 1e6:.2f}M parameters, {cfg}, torch {torch.__version__}", flush=True)
    version = code_version()
    t0 = time.monotonic()
    runs = run_all(cfg, systems, args.dtypes.split(","), rounds)
    rows = summarize(runs, cfg)
    stem = args.name or ("compare_quick" if args.quick else "compare")
    os.makedirs(args.out, exist_ok=True)
    command = "python bench/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"config": asdict(cfg), "params": num_params(cfg), "rounds": rounds, "command": command.strip(),
            "wall_s": round(time.monotonic() - t0), "torch": torch.__version__, "loss_tol": LOSS_TOL,
            "commit": version}
    md = write_markdown(os.path.join(args.out, stem + ".md"), rows, meta)
    write_chart(os.path.join(args.out, stem + ".png"), rows, meta)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "runs": runs}, f, indent=1, default=str)
    print(md)
    return 0


def _render(path: str) -> int:
    with open(path) as f:
        saved = json.load(f)
    stem = os.path.splitext(path)[0]
    print(write_markdown(stem + ".md", saved["rows"], saved["meta"]))
    write_chart(stem + ".png", saved["rows"], saved["meta"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
