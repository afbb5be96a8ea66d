"""``zerotrain finetune | ask | summarize`` and ``zerotrain eval RUN --task qa|summarize``.

``finetune RUN --tasks qa,summarize`` fine-tunes a pretrained run (saved at any ZeRO stage, world
size or tp degree) into a new run directory, ``<RUN>-ft`` unless ``--run-name`` says otherwise,
on local ranks like ``train`` (same progress, metrics.jsonl, TensorBoard and loss.png; Ctrl-C
saves, the same command resumes, ``--fresh`` starts over), then evaluates it on held-out data
beside the baselines. ``ask`` answers questions, ``summarize`` summarizes documents, both batched
with the KV cache, decoded as the task's ``DECODING`` in ``answer.py`` says unless ``--beams`` /
``--length-penalty`` say otherwise.
User errors print one message and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from .finetune_options import FinetuneOptions, read_finetune
from .inference import find_run, load_run
from .options import Options, UsageError, build_options, check_launch

FT_FLAGS = {  # flag -> (dotted option, type, help)
    "--steps": ("train.steps", int, "optimizer steps, copy warm-up included (default 3000)"),
    "--batch-size": ("train.batch_size", int, "global batch size in examples (default 32)"),
    "--lr": ("optim.lr", float, "peak learning rate (default 2e-3)"),
    "--seed": ("train.seed", int, "seed of the task mixing"),
    "--stage": ("parallel.stage", int, "ZeRO stage 0-3 (default 3)"),
    "--nproc": ("parallel.nproc", int, "local processes (default 2)"),
    "--tp": ("parallel.tp", int, "tensor-parallel degree (default 1)"),
    "--precision": ("parallel.precision", str, "fp32 (default), bf16 or fp16"),
    "--copy-steps": ("train.copy_steps", int, "first steps of copying exercises only (default 0; part of --steps)"),
    "--copy": ("train.copy_share", float, "then the share of each batch that are copying exercises (default 0.25)"),
    "--report-examples": ("train.report_examples", int, "held-out examples per task in the final report (default 200)"),
}


def _fail(command: str, message: str) -> int:
    print(f"zerotrain {command}: error: {message}", file=sys.stderr)
    return 2


def _weights(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UsageError(f"--weights {text!r}: write task=weight pairs, e.g. --weights qa=2,summarize=1")
    return out


def _base_run(name: str, runs_dir: str) -> Path:
    base = find_run(name, runs_dir).resolve()
    if not (base / "tokenizer.json").is_file():
        raise UsageError(f"run {base} has no tokenizer.json (it was interrupted before training started); "
                         f"train it first: zerotrain train --run-name {base.name} --runs-dir {base.parent}")
    from zerotrain.checkpoint import latest_tag
    if latest_tag(base / "checkpoints") is None:
        raise UsageError(f"run {base} has no checkpoint to fine-tune; train it first: "
                         f"zerotrain train --run-name {base.name} --runs-dir {base.parent}")
    return base


def finetune_options(args) -> tuple[FinetuneOptions, Options]:
    """(fine-tuning options, effective training options) from the command line and, for an existing
    run, its saved options."""
    base = _base_run(args.run, args.runs_dir)
    settings = {FT_FLAGS[f][0]: v for f in FT_FLAGS if (v := getattr(args, f[2:].replace("-", "_"))) is not None}
    if args.no_copy_head:
        settings["train.copy_head"] = False
    data = {"base": str(base), "run": {"name": args.run_name, "runs_dir": args.runs_dir}}
    if args.tasks is not None:
        data["tasks"] = {"names": args.tasks.split(","), "weights": _weights(args.weights)}
    elif args.weights:
        data["tasks"] = {"weights": _weights(args.weights)}
    spec = _validate(data, settings)
    requested = spec.base
    saved = read_finetune(spec.run_dir)
    if saved is not None and not args.fresh:
        merged = saved.model_dump()
        for key in ("parallel", "optim", "train"):
            merged[key].update(getattr(spec, key).model_dump(exclude_unset=True))
        if args.tasks is not None or args.weights:
            merged["tasks"] = spec.tasks.model_dump()
        spec = _validate(merged, settings)
        if (Path(requested).resolve(), spec.tasks) != (Path(saved.base).resolve(), saved.tasks):
            raise UsageError(f"run '{spec.run_name}' was fine-tuned from {saved.base} on "
                             f"{','.join(saved.tasks.names)} (weights {saved.tasks.weights or 'equal'}); pass "
                             "--fresh to start it over or --run-name NAME for a new run")
        if spec.train.copy_head != saved.train.copy_head:
            raise UsageError(f"run '{spec.run_name}' was fine-tuned {'with' if saved.train.copy_head else 'without'} "
                             "a copy head; resume it as it was, or pass --fresh to start it over or "
                             "--run-name NAME for a new run")
    base_opts = Options.model_validate_json((base / "options.json").read_text(encoding="utf-8"))
    return spec, spec.effective(base_opts)


def _validate(data: dict, settings: dict) -> FinetuneOptions:
    from pydantic import ValidationError

    from .options import _describe
    for key, value in settings.items():
        section, field = key.split(".")
        data.setdefault(section, {})[field] = value
    try:
        return FinetuneOptions.model_validate(data)
    except ValidationError as e:
        raise UsageError(_describe(e)) from None


def setup_finetune(spec: FinetuneOptions, opts: Options, *, fresh: bool) -> None:
    from zerotrain.data import load_tokenizer
    from zerotrain.model import get_config

    from .finetune_data import prepare_copy_data, prepare_task_data
    run_dir = spec.run_dir
    if fresh and run_dir.is_dir():
        if any(run_dir.iterdir()) and not (run_dir / "finetune.json").is_file():
            raise UsageError(f"--fresh: {run_dir} is not a fine-tuning run (no finetune.json); not clearing it")
        for sub in ("checkpoints", "tb"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        for name in ("metrics.jsonl", "loss.png", "results.json", "finetune_results.json"):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(spec.base) / "tokenizer.json", run_dir / "tokenizer.json")
    (run_dir / "finetune.json").write_text(spec.model_dump_json(indent=1), encoding="utf-8")
    (run_dir / "options.json").write_text(opts.model_dump_json(indent=1), encoding="utf-8")
    block = get_config(opts.model.preset, vocab_size=opts.data.vocab_size, **opts.model_overrides()).block_size
    if spec.train.copy_share > 0 or spec.train.copy_steps > 0:
        prepare_copy_data(run_dir, Path(spec.base))
    prepare_task_data(run_dir, spec.tasks.names, load_tokenizer(run_dir / "tokenizer.json"), block_size=block)


def _finetune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zerotrain finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default=Options().run_name, help="the pretrained run (name or directory)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks: qa, summarize (default both)")
    p.add_argument("--weights", default=None, help="mixing weights, e.g. qa=2,summarize=1 (default equal)")
    for flag, (_, typ, help_) in FT_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=help_)
    p.add_argument("--no-copy-head", action="store_true",
                   help="fine-tune the model as it is, without adding a copy (pointer) head")
    p.add_argument("--run-name", default=None, help="the fine-tuning run's name (default <RUN>-ft)")
    p.add_argument("--runs-dir", default="runs", help="where runs live (default ./runs)")
    p.add_argument("--fresh", action="store_true", help="start the fine-tuning run over")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def cli_finetune(argv: list[str]) -> int:
    from .finetune import finetune
    from .spawn import configure_logging, spawn_ranks
    args = _finetune_parser().parse_args(argv)
    configure_logging(0, verbose=args.verbose)
    try:
        spec, opts = finetune_options(args)
        check_launch(opts)
        setup_finetune(spec, opts, fresh=args.fresh)
        summary = spawn_ranks(opts, verbose=args.verbose, entry=finetune)
    except UsageError as e:
        return _fail("finetune", str(e))
    except KeyboardInterrupt:
        print("interrupted before fine-tuning started", file=sys.stderr)
        return 130
    again = f"zerotrain finetune {spec.base} --run-name {spec.run_name} --runs-dir {spec.run.runs_dir}"
    if summary is None:
        return _fail("finetune", "rank 0 ended without a result (see the messages above)") - 1
    if summary.get("interrupted"):
        print(f"interrupted at step {summary['step']}; the latest checkpoint in {spec.run_dir / 'checkpoints'} "
              f"is intact. Resume with: {again}", file=sys.stderr)
        return 130
    report(spec.run_dir, spec.tasks.names, examples=spec.train.report_examples, base=Path(spec.base))
    print(f"\nrun directory: {spec.run_dir}  (metrics.jsonl, loss.png, results.json, checkpoints/, tb/)\n"
          f"next: zerotrain ask {spec.run_dir} \"What is the capital of Peru?\"   |   "
          f"zerotrain summarize {spec.run_dir} FILE")
    return 0


def _load(run: str, runs_dir: str):
    opts, _, tokenizer, model, step = load_run(run, runs_dir)
    return opts, tokenizer, model, step


def report(run_dir: Path, tasks: list[str], *, examples: int | None, base: Path | None,
           beams: int | None = None, length_penalty: float | None = None) -> dict:
    """Evaluate a run on ``tasks`` beside the baselines (``base``: the pretrained run, zero-shot);
    print the report and add it to ``results.json``."""
    from .spawn import configure_logging
    from .task_eval import evaluate_task, format_task
    configure_logging(0, quiet=True)
    torch.set_num_threads(1)           # batches of a few rows: threads cost more than they bring
    opts, tokenizer, model, step = _load(str(run_dir), str(run_dir.parent))
    base_model = _load(str(base), str(base.parent))[2] if base is not None else None
    results = {}
    for task in tasks:
        results[task] = evaluate_task(task, model, tokenizer, run_dir=run_dir, examples=examples,
                                      base_model=base_model, beams=beams, length_penalty=length_penalty)
        print(format_task(results[task]))
    path = run_dir / "results.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved.update({f"task_{k}": v for k, v in results.items()}, task_step=step)
    path.write_text(json.dumps(saved, indent=1))
    return results


def cli_eval(argv: list[str]) -> int:
    """``zerotrain eval RUN --task qa|summarize``; without ``--task``, the language-model evaluation."""
    if not any(a == "--task" or a.startswith("--task=") for a in argv):
        from .cli import cli_eval as lm_eval
        return lm_eval(argv)
    from .answer_cli import add_decoding_flags, check_decoding
    p = argparse.ArgumentParser(prog="zerotrain eval", description="held-out task evaluation beside baselines")
    p.add_argument("run", nargs="?", default=Options().run_name)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--task", required=True, help="qa or summarize")
    p.add_argument("--examples", type=int, default=200, help="held-out examples (default 200; 0 for all)")
    add_decoding_flags(p, "eval")
    args = p.parse_args(argv)
    try:
        check_decoding(args)
        from zerotrain.data.tasks import check_tasks
        try:
            task = check_tasks([args.task])[0]
        except ValueError as e:
            raise UsageError(str(e).replace("--tasks", "--task")) from None
        run_dir = find_run(args.run, args.runs_dir).resolve()
        _load(str(run_dir), str(run_dir.parent))                  # the run's own errors first
        spec = read_finetune(run_dir)
        base = Path(spec.base) if spec is not None else None
        if base is not None and not (base / "options.json").is_file():
            print(f"note: the pretrained run {base} is gone; no zero-shot baseline", file=sys.stderr)
            base = None
    except UsageError as e:
        return _fail("eval", str(e))
    report(run_dir, [task], examples=args.examples or None, base=base, beams=args.beams,
           length_penalty=args.length_penalty)
    return 0
