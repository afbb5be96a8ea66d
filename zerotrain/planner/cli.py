"""`zerotrain estimate`: memory and communication per rank, as a table or JSON.

The default is the ZeRO paper's setting: mixed-precision Adam in bf16 with gradients reduced in
the compute dtype (K = 12: fp32 master, m, v). ``--reduce-dtype fp32`` gives zerotrain's engine
default for mixed precision (fp32 reductions); ``--dtype fp32`` is pure fp32 training.
``--device`` (default: cuda when CUDA is available, else cpu) decides which attention kernel
torch runs, how dropout masks and LayerNorm statistics are stored, and whether the process's own
memory (a CPU run's runtime overhead) counts with the model's; ``--offload cpu`` puts the fp32
master and optimizer states in host memory and shows the device/host split.
Exit status: 0, or 1 when ``--memory-gb`` is given and nothing fits, or 2 on a usage error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from zerotrain.parallel.zero.policy import STAGES
from zerotrain.planner.activations import ATTENTION_KERNELS, DEVICES
from zerotrain.planner.memory import DTYPE_BYTES, Plan, plan
from zerotrain.planner.recommend import MEASURES, candidates, measured, no_fit_message, recommend
from zerotrain.planner.spec import ModelSpec

GB = 1e9
_POW2 = tuple(2 ** i for i in range(11))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zerotrain estimate", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a zerotrain model preset, e.g. gpt2-124m, tnlg-17b")
    src.add_argument("--params", type=float, help="a bare parameter count, e.g. 7.5e9")
    ap.add_argument("--layers", type=int, help="with --params: transformer layers")
    ap.add_argument("--hidden", type=int, help="with --params: hidden size")
    ap.add_argument("--heads", type=int, help="with --params: attention heads")
    ap.add_argument("--vocab", type=int, help="with --params: vocabulary size")
    ap.add_argument("--dropout", type=float, default=None,
                    help="with --params: dropout probability (default 0)")
    ap.add_argument("--stage", type=int, choices=sorted(STAGES), help="default: all stages")
    ap.add_argument("--dp", type=int, help="data-parallel degree N (default 1)")
    ap.add_argument("--tp", type=int, help="tensor-parallel degree (default 1)")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16",
                    help="compute dtype (default bf16 with an fp32 master)")
    ap.add_argument("--reduce-dtype", choices=tuple(DTYPE_BYTES), help="default: --dtype")
    ap.add_argument("--optimizer", default="adamw", help="adamw (default), adam, sgd_momentum, sgd")
    ap.add_argument("--micro-batch", type=int, help="sequences per rank (default 1)")
    ap.add_argument("--seq-len", type=int, help="default: the model's block size")
    ap.add_argument("--checkpointing", "--activation-checkpointing", dest="checkpointing",
                    action="store_true", help="activation checkpointing, one checkpoint per block")
    ap.add_argument("--device", choices=DEVICES, default=None,
                    help="where the model computes (default: cuda if available, else cpu)")
    ap.add_argument("--attention", choices=("auto",) + ATTENTION_KERNELS, default="auto",
                    help="SDPA kernel (default auto: what torch picks on --device for --dtype)")
    ap.add_argument("--offload", choices=("cpu",), default=None,
                    help="fp32 master and optimizer states in host memory (ZeRO-Offload)")
    ap.add_argument("--memory-gb", type=float, help="recommend what fits in this many GB per rank")
    ap.add_argument("--fit", choices=MEASURES, default="total",
                    help="what must fit in --memory-gb (default: total on the device)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return ap


def _spec(args) -> ModelSpec:
    if args.preset is not None:
        spec = ModelSpec.from_preset(args.preset)
        return spec if args.dropout is None else dataclasses.replace(spec, dropout=args.dropout)
    return ModelSpec.from_params(args.params, n_layer=args.layers, n_embd=args.hidden,
                                 n_head=args.heads, vocab_size=args.vocab,
                                 dropout=args.dropout or 0.0)


def _device(args) -> str:
    if args.device is not None:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _plan_kwargs(args) -> dict:
    return dict(param_dtype=args.dtype, reduce_dtype=args.reduce_dtype or args.dtype,
                optimizer=args.optimizer, seq_len=args.seq_len,
                activation_checkpointing=args.checkpointing, device=_device(args),
                attention=args.attention, offload=args.offload)


def _micro_batches(spec, args) -> list[int]:
    """The given micro-batch, else 1..64 where activations are estimated and count."""
    if args.micro_batch:
        return [args.micro_batch]
    return list(_POW2[:7]) if spec.has_shape and args.fit != "model_states" else [1]


def _recommend(spec, args) -> tuple[list[Plan], str]:
    grid = dict(
        dp_options=[args.dp] if args.dp else _POW2,
        tp_options=[args.tp] if args.tp else (1, 2, 4, 8, 16),
        stages=[args.stage] if args.stage is not None else sorted(STAGES),
        micro_batches=_micro_batches(spec, args), **_plan_kwargs(args))
    memory = args.memory_gb * GB
    fitting = recommend(spec, memory_bytes=memory, measure=args.fit, **grid)
    if not fitting:
        return [], no_fit_message(candidates(spec, **grid), memory, measure=args.fit)
    best = fitting[0]
    return fitting, (f"cheapest fit in {args.memory_gb:g} GB ({args.fit}): stage {best.stage}, "
                     f"dp={best.dp}, tp={best.tp}, micro_batch={best.micro_batch} "
                     f"({measured(best, args.fit) / GB:.3g} GB)")


def _unit(plans: list[Plan]) -> tuple[float, str]:
    """GB (1e9 bytes), or MB (1e6) for models whose totals are under a GB."""
    biggest = max(max(p.total_bytes, p.host_bytes, p.peak_rss_bytes) for p in plans)
    return (GB, "GB") if biggest >= GB else (1e6, "MB")


def _rows(p: Plan) -> list[tuple[str, str]]:
    """(label, Plan field) per table row; offload relabels what lives on the host."""
    host = " (host)" if p.offload else ""
    rows = [("params", "params_bytes"), ("grads", "grads_bytes")]
    if p.offload:
        rows.append(("grads (host buffer)", "host_grads_bytes"))
    rows += [(f"master{host}", "master_bytes"), (f"optimizer states{host}", "optimizer_states_bytes"),
            ("model states", "model_states_bytes"), ("transient buffers", "comm_buffers_bytes"),
            ("activations (peak)", "activations_bytes"), (f"total on {p.device}", "total_bytes")]
    if p.offload:
        rows.append(("host memory (offload)", "host_bytes"))
    if p.device == "cpu":
        rows.append(("peak RSS (CPU run)", "peak_rss_bytes"))
    return rows


def _stage_table(title: str, plans: list[Plan]):
    """One column per stage, one row per category."""
    from rich.table import Table

    scale, unit = _unit(plans)
    table = Table(title=f"{title} ({unit} = {scale:.0e} bytes)")
    table.add_column(f"{unit} per rank")
    for p in plans:
        table.add_column(f"stage {p.stage}", justify="right")
    for label, field in _rows(plans[0]):
        table.add_row(label, *(f"{getattr(p, field) / scale:,.3f}" for p in plans))
    table.add_row("dp comm / step (wire)", *(f"{p.comm.dp_wire_bytes / scale:,.3f}" for p in plans))
    if any(p.tp > 1 for p in plans):
        table.add_row("tp comm / step (wire)",
                      *(f"{p.comm.tp_wire_bytes / scale:,.3f}" for p in plans))
    return table


def _activation_line(p: Plan) -> str:
    """How the activation row was made: kernel, held bytes, what the backward adds at its peak."""
    a = p.activations
    scale, unit = _unit([p])
    ck = ", one checkpoint per block" if p.activation_checkpointing else ""
    return (f"activations: {a.held_bytes / scale:,.3f} {unit} held for backward at the end of the "
            f"forward ({a.attention} attention{ck}) + {a.backward_bytes / scale:,.3f} {unit} at "
            f"the peak, in {a.backward_what}")


def _rec_table(plans: list[Plan]):
    from rich.table import Table

    scale, unit = _unit(plans[:10])
    table = Table(title=f"configurations that fit, cheapest first (top 10), {unit} per rank")
    for col in ("stage", "dp", "tp", "micro-batch", "model states", "total", "dp wire", "tp wire"):
        table.add_column(col, justify="right")
    for p in plans[:10]:
        table.add_row(str(p.stage), str(p.dp), str(p.tp), str(p.micro_batch),
                      *(f"{b / scale:,.3f}" for b in (p.model_states_bytes, p.total_bytes,
                                                       p.comm.dp_wire_bytes,
                                                       p.comm.tp_wire_bytes)))
    return table


def _print_rich(spec, plans, rec, message) -> None:
    from rich.console import Console

    con = Console()
    p0 = plans[0]
    seq = f", seq {p0.seq_len}" if p0.seq_len else ""
    con.print(f"{spec.name}: Ψ = {spec.numel():,} parameters; dp={p0.dp} tp={p0.tp} "
              f"micro-batch {p0.micro_batch}{seq}; {p0.param_dtype} compute, {p0.reduce_dtype} "
              f"reduce, {p0.master_dtype} master, {p0.optimizer}; on {p0.device}"
              + (f", offload to {p0.offload}" if p0.offload else ""))
    con.print(_stage_table("bytes per rank", plans))
    if p0.activations is not None:
        con.print(_activation_line(p0))
    for note in dict.fromkeys(n for p in plans for n in p.notes):
        con.print(f"note: {note}")
    if rec:
        con.print(_rec_table(rec))
    if message:
        con.print(message)


def cli_estimate(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = _spec(args)
        stages = [args.stage] if args.stage is not None else sorted(STAGES)
        plans = [plan(spec, stage=st, dp=args.dp or 1, tp=args.tp or 1,
                      micro_batch=args.micro_batch or 1, **_plan_kwargs(args)) for st in stages]
        rec, message = _recommend(spec, args) if args.memory_gb is not None else ([], "")
    except (ValueError, KeyError, ImportError) as err:
        print(f"zerotrain estimate: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        out = {"model": spec.name, "numel": spec.numel()}
        out.update({f"stage{p.stage}": p.model_states_bytes for p in plans})
        out["plans"] = {f"stage{p.stage}": p.to_dict() for p in plans}
        if args.memory_gb is not None:
            out["recommend"] = [p.to_dict() for p in rec[:10]]
            out["message"] = message
        print(json.dumps(out, indent=2))
    else:
        _print_rich(spec, plans, rec, message)
    return 1 if args.memory_gb is not None and not rec else 0

