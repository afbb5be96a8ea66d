"""The comparison's outputs: a markdown table (with the targets checked) and a PNG bar chart of
model-state bytes per rank by stage against the §2 formula."""
from __future__ import annotations

import statistics

from common import MiB

PEER_AT_STAGE = {0: "ddp", 1: "zero-opt", 2: "fsdp2-s2", 3: "fsdp2-s3"}
STEP_TARGET = {1: 1.05, 2: 1.05, 3: 1.3}


def _mib(b) -> str:
    return f"{b / MiB:,.1f}"


def _spread(s, fmt="{:.3f}", scale=1.0) -> str:
    if s is None:
        return "—"
    med, lo, hi = (v * scale for v in s)
    return f"{fmt.format(med)} ({fmt.format(lo)}–{fmt.format(hi)})"


def _main_table(rows) -> list[str]:
    out = ["| system | dtype | ≈ stage | step ms, median (min–max over rounds) | × DDP (paired by round) "
           "| × DDP with fused AdamW | CPU ms / step "
           "| peak RSS / rank MiB | model states / rank MiB | § 2 formula MiB | × formula "
           "| comm / step / rank MiB logical (ring wire) | counted by | max abs Δloss vs DDP | losses match |",
           "|" + "---|" * 15]
    for r in rows:
        out.append(
            f"| {r['system']} | {r['dtype']} | {r['stage']} | {_spread(r['step_s'], '{:.0f}', 1e3)} "
            f"| {_spread(r['vs_ddp'])} | {_spread(r.get('vs_ddp_fused'))} | {r['cpu_s'][0] * 1e3:.0f} | {_mib(r['rss'][0])} | {_mib(r['state']['model_states'])} "
            f"| {_mib(r['formula'])} | {r['vs_formula']:.3f} "
            f"| {_mib(r['comm_bytes'])} ({_mib(r['comm_wire'])}) | {r['comm_source']} "
            f"| {r['loss_diff']:.2e} | {'yes' if r['loss_ok'] else 'NO'} |")
    return out


def _breakdown(rows) -> list[str]:
    out = ["| system | dtype | params | grads | separate master | optimizer states | collectives in one step (calls × logical MiB) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["state"]
        ops = ", ".join(f"{k} {v['calls']}× {_mib(v['bytes'])}" for k, v in sorted(r["comm_ops"].items())
                        if k != "all_gather_object")
        out.append(f"| {r['system']} | {r['dtype']} | {_mib(s['params'])} | {_mib(s['grads'])} "
                   f"| {_mib(s.get('master', 0))} | {_mib(s['optimizer_states'])} | {ops} |")
    return out


def _paired(a: dict, b: dict) -> float | None:
    ratios = [a[k] / b[k] for k in a if k in b]
    return statistics.median(ratios) if ratios else None


def targets(rows) -> list[str]:
    """The issue's targets, checked on the medians (reported, never asserted)."""
    by = {(r["system"], r["dtype"]): r for r in rows}
    out = []
    for (name, dtype), r in by.items():
        if not name.startswith("zt-"):
            continue
        stage = r["stage"]
        ok = abs(r["vs_formula"] - 1) <= 0.05
        out.append(f"- {name} {dtype}: model states {r['vs_formula']:.3f}× formula "
                   f"({'within' if ok else 'OUTSIDE'} 5%)")
        if stage in STEP_TARGET and r["vs_ddp"] is not None:
            ok = r["vs_ddp"][0] <= STEP_TARGET[stage]
            line = (f"- {name} {dtype}: step {r['vs_ddp'][0]:.3f}× DDP (target ≤ {STEP_TARGET[stage]}: "
                    f"{'met' if ok else 'MISSED'})")
            if r.get("vs_ddp_fused") is not None:
                ok = r["vs_ddp_fused"][0] <= STEP_TARGET[stage]
                line += (f"; {r['vs_ddp_fused'][0]:.3f}× DDP with fused AdamW "
                         f"({'met' if ok else 'MISSED'})")
            for suffix in ("", "-fused"):
                peer = by.get((PEER_AT_STAGE[stage] + suffix, dtype))
                if stage >= 2 and peer is not None:
                    ratio = _paired(r["per_round"], peer["per_round"])
                    line += f"; {ratio:.3f}× {peer['system']} ({'no worse' if ratio <= 1 else 'SLOWER'})"
            out.append(line)
    return out


def write_markdown(path: str, rows, meta) -> str:
    cfg = meta["config"]
    lines = [f"Command: `{meta['command']}` (wall {meta['wall_s']} s, torch {meta['torch']}, zerotrain at "
             f"{meta.get('commit', 'unknown')})", "",
             f"GPT {meta['params'] / 1e6:.2f}M parameters (n_layer {cfg['n_layer']}, n_embd {cfg['n_embd']}, "
             f"vocab {cfg['vocab_size']}, seq {cfg['seq_len']}), micro-batch {cfg['micro_batch']} per rank, "
             f"world {cfg['world']} (gloo, spawned, OMP_NUM_THREADS=1), AdamW; {meta['rounds']} interleaved "
             f"rounds × {cfg['steps']} timed steps after {cfg['warmup']} warm-up. Loss tolerance vs DDP "
             f"(absolute): {meta['loss_tol']}.", ""]
    lines += _main_table(rows) + ["", "Model-state bytes per rank by kind (MiB), and one step's collectives:", ""]
    lines += _breakdown(rows) + ["", "Targets:", ""] + targets(rows) + [""]
    text = "\n".join(lines)
    with open(path, "w") as f:
        f.write(text)
    return text


def write_chart(path: str, rows, meta) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        mine = {r["system"]: r for r in rows if r["dtype"] == dtype}
        for stage in range(4):
            pair = [(f"zt-s{stage}", "tab:blue", "zerotrain"), (PEER_AT_STAGE[stage], "tab:orange", "torch peer")]
            for i, (name, color, label) in enumerate(pair):
                r = mine.get(name)
                if r is None:
                    continue
                ax.bar(stage + (i - 0.5) * 0.38, r["state"]["model_states"] / MiB, 0.36, color=color,
                       label=label if stage == 0 else None)
                ax.text(stage + (i - 0.5) * 0.38, r["state"]["model_states"] / MiB, name, ha="center",
                        va="bottom", fontsize=7, rotation=90)
            ref = next((r for r in mine.values() if r["stage"] == stage), None)
            if ref is not None:
                ax.hlines(ref["formula"] / MiB, stage - 0.45, stage + 0.45, colors="black",
                          label="§2 formula" if stage == 0 else None)
        ax.set_xticks(range(4), [f"stage {s}" for s in range(4)])
        ax.set_ylabel("model-state MiB per rank")
        ax.set_title(f"{dtype}: {meta['params'] / 1e6:.1f}M params, world {meta['config']['world']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
