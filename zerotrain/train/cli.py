"""``zerotrain train | eval | generate``.

``train`` with no arguments trains the ``tiny`` GPT on the bundled World English Bible with ZeRO
stage 3 on 2 local processes. A run lives in ``<runs-dir>/<run-name>/`` (default
``runs/<preset>-zero<stage>``): options.json, tokenizer.json, data/, checkpoints/, metrics.jsonl,
tb/, loss.png, results.json. Starting a run whose directory holds a checkpoint resumes it, with
the options it was created with (command-line settings on top; the model and data may not
change); ``--fresh`` starts it over. Before any rank starts, ``train`` asks the memory planner
whether the run fits this machine (:mod:`.preflight`). ``eval`` and ``generate`` load a run's
latest checkpoint in one process. Errors print one line (``zerotrain.cli`` gives the exit
status: 2 for user errors); an interrupted run exits 130.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys

from .options import Options, UsageError, build_options, check_launch
from .placement import apply_device_defaults

FLAGS = {  # flag -> (dotted option, type, help)
    "--preset": ("model.preset", str, "model preset: tiny, small, gpt2-124m, ... (default tiny)"),
    "--stage": ("parallel.stage", int, "ZeRO stage 0-3 (default 3)"),
    "--nproc": ("parallel.nproc", int, "local processes to spawn (default: one per GPU, else 2; torchrun sets its own)"),
    "--device": ("parallel.device", str, "auto (default: the GPUs when CUDA is present), cuda or cpu"),
    "--tp": ("parallel.tp", int, "tensor-parallel degree: ranks per model replica (default 1)"),
    "--precision": ("parallel.precision", str, "fp32 (default on CPU), bf16 (default on GPU) or fp16"),
    "--steps": ("train.steps", int, "optimizer steps (default 1000)"),
    "--batch-size": ("train.batch_size", int, "global batch size in sequences (default 32)"),
    "--lr": ("optim.lr", float, "peak learning rate (default 3e-3)"),
    "--seed": ("train.seed", int, "seed of the initialisation and the batch order"),
    "--run-name": ("run.name", str, "run directory name (default <preset>-zero<stage>)"),
    "--runs-dir": ("run.runs_dir", str, "where runs live (default ./runs)"),
    "--corpus": ("data.corpus", str, "a different corpus text file (default: bundled Bible)"),
}


TRAIN_HELP = """Train a GPT with ZeRO on local processes (or as a torchrun rank).

With no arguments: the tiny preset on the bundled World English Bible, ZeRO stage 3, 2 processes,
about six minutes on two CPU cores; then held-out perplexity, bits per byte and cloze accuracy
against baselines, and samples. The run lives in runs/<preset>-zero<stage>/. Running the same
command again resumes the run from its latest checkpoint (Ctrl-C saves one); --fresh starts over."""


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zerotrain train", description=TRAIN_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="overrides: KEY=VALUE with KEY dotted (optim.lr=3e-4) or a bare "
                                       "option name (lr=3e-4); `zerotrain train --options` lists them")
    p.add_argument("--config", help="JSON file with option sections (model, data, parallel, optim, train, run)")
    for flag, (_, typ, help_) in FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=help_)
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in backward (less memory, ~1/3 more compute)")
    p.add_argument("--fresh", action="store_true", help="start the run over, discarding its checkpoints")
    p.add_argument("--options", action="store_true", help="print every option with its default and exit")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return p


def parse_train_args(argv: list[str]):
    """Flags and ``key=value`` overrides in any order (``--nproc 1 a=1 --stage 0 b=2``)."""
    return _train_parser().parse_intermixed_args(argv)


def resolve_options(args) -> Options:
    """Options from the command line; for an existing run, its saved options are the base."""
    settings = {FLAGS[f][0]: v for f in FLAGS if (v := getattr(args, f[2:].replace("-", "_"))) is not None}
    if args.activation_checkpointing:
        settings["parallel.activation_checkpointing"] = True
    opts = build_options(config_file=args.config, settings=settings, overrides=args.overrides)
    saved = opts.run_dir / "options.json"
    if saved.is_file() and not args.fresh:
        base = json.loads(saved.read_text(encoding="utf-8"))
        opts = build_options(base=base, config_file=args.config, settings=settings, overrides=args.overrides)
        for section in ("model", "data"):
            old, new = base.get(section, {}), getattr(opts, section).model_dump()
            changed = [f"{section}.{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
            if changed:
                raise UsageError(f"run '{opts.run_name}' in {opts.run_dir.parent} was created with other "
                                 f"settings ({'; '.join(changed)}); pass --fresh to start it over or "
                                 "--run-name NAME for a new run")
    opts.run.name = opts.run_name
    apply_device_defaults(opts, explicit={f"parallel.{f}" for f in opts.parallel.model_fields_set})
    return opts


def setup_run(opts: Options, *, fresh: bool) -> None:
    """Create (or clear, with ``fresh``) the run directory, save options.json, build the data."""
    from .prepare import prepare_data
    run_dir = opts.run_dir
    _check_run_dir(run_dir)
    if fresh and run_dir.is_dir():
        if any(run_dir.iterdir()) and not (run_dir / "options.json").is_file():
            raise UsageError(f"--fresh: {run_dir} is not a zerotrain run (no options.json); not clearing it")
        for sub in ("checkpoints", "tb"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        for name in ("metrics.jsonl", "loss.png", "results.json", "options.json"):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "options.json").write_text(opts.model_dump_json(indent=1), encoding="utf-8")
    _check_data_fits(opts, prepare_data(opts))


def _check_run_dir(run_dir) -> None:
    import os
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise UsageError(f"{path} is a file, not a directory; choose another --run-name or "
                                 "--runs-dir (the run lives in <runs-dir>/<run-name>/)")
            if not os.access(path, os.W_OK | os.X_OK):
                raise UsageError(f"{path} is not writable; choose a --runs-dir you can write to")
            return


def _check_data_fits(opts: Options, data) -> None:
    """Each token file must hold at least one window of block_size + 1 tokens."""
    import numpy as np

    from zerotrain.model import get_config
    block = get_config(opts.model.preset, vocab_size=opts.data.vocab_size, **opts.model_overrides()).block_size
    for what, path, more in (("training", data.train_path, "a larger corpus"),
                             ("held-out", data.heldout_path, "more held-out books (data.heldout_books)")):
        n = len(np.load(path, mmap_mode="r"))
        if n < block + 1:
            raise UsageError(f"model.block_size={block} is longer than the {what} text ({n:,} tokens); "
                             f"use model.block_size <= {n - 1} or {more}")


def _print_options() -> None:
    for section, values in Options().model_dump().items():
        for key, value in values.items():
            print(f"{section}.{key} = {json.dumps(value)}")


def cli_train(argv: list[str]) -> int:
    from .preflight import preflight
    from .spawn import configure_logging, run_torchrun_rank, spawn_ranks, under_torchrun
    args = parse_train_args(argv)
    if args.options:
        _print_options()
        return 0
    opts = resolve_options(args)
    if under_torchrun():
        import os
        opts.parallel.nproc = int(os.environ["WORLD_SIZE"])
        check_launch(opts, world_size=opts.parallel.nproc)
        preflight(opts, local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        summary = run_torchrun_rank(opts, lambda: setup_run(opts, fresh=args.fresh), verbose=args.verbose)
        if summary is None:
            return 0
    else:
        check_launch(opts)
        configure_logging(0, verbose=args.verbose)
        preflight(opts)
        setup_run(opts, fresh=args.fresh)
        summary = spawn_ranks(opts, verbose=args.verbose)
    return _report_end(opts, summary)


def _report_end(opts: Options, summary: dict) -> int:
    again = f"zerotrain train --run-name {opts.run_name} --runs-dir {opts.run.runs_dir}"
    if summary.get("aborted"):
        latest = summary.get("latest")
        kept = (f"the latest checkpoint, {latest}, in {opts.run_dir / 'checkpoints'} is intact" if latest
                else "no checkpoint had been saved")
        print(f"aborted: the ranks were stopped at once; {kept}. Resume with: {again}", file=sys.stderr)
        return 130
    if summary.get("interrupted"):
        print(f"interrupted at step {summary['step']}; the latest checkpoint in {opts.run_dir / 'checkpoints'} "
              f"is intact. Resume with: {again}", file=sys.stderr)
        return 130
    print(f"\nrun directory: {opts.run_dir}  (metrics.jsonl, loss.png, results.json, checkpoints/, tb/)\n"
          f"next: zerotrain eval {opts.run_name} --runs-dir {opts.run.runs_dir}   |   "
          f"zerotrain generate {opts.run_name} --runs-dir {opts.run.runs_dir} --prompt \"In the beginning\"")
    return 0


def cli_eval(argv: list[str]) -> int:
    from .inference import cli_eval as run
    return run(argv)


def cli_generate(argv: list[str]) -> int:
    from .inference import cli_generate as run
    return run(argv)


__all__ = ["cli_train", "cli_eval", "cli_generate", "parse_train_args", "resolve_options", "setup_run"]
