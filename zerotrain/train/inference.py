"""``zerotrain eval RUN`` and ``zerotrain generate RUN --prompt ...`` in one process.

The run's latest checkpoint (saved at any ZeRO stage and world size) is loaded into a GPT at
stage 0 on a world of one; the run's own options.json and tokenizer describe the model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zerotrain.distributed import Mesh


from .options import Options, UsageError
from .placement import device_of, run_device


def find_run(name: str, runs_dir: str) -> Path:
    """``name`` as a run directory path, else ``runs_dir/name``."""
    for candidate in (Path(name), Path(runs_dir) / name):
        if (candidate / "options.json").is_file():
            return candidate
    root = Path(runs_dir)
    known = sorted(p.name for p in root.iterdir() if (p / "options.json").is_file()) if root.is_dir() else []
    listing = f"runs in {root}: {', '.join(known)}" if known else f"no runs in {root}"
    raise UsageError(f"run '{name}' not found ({listing}); pass a run name or a run directory, "
                     "and --runs-dir if the runs live elsewhere")


def load_run(name: str, runs_dir: str):
    """(options, run data, tokenizer, model in eval mode, checkpoint step) of a run."""
    from zerotrain.data import load_tokenizer

    from .prepare import prepare_data
    from .trainer import _checkpoint_api, build_model, ckpt_root
    run_dir = find_run(name, runs_dir)
    opts = Options.model_validate_json((run_dir / "options.json").read_text(encoding="utf-8"))
    opts.run.name, opts.run.runs_dir = run_dir.name, str(run_dir.parent)
    opts.parallel.stage, opts.parallel.nproc, opts.parallel.precision = 0, 1, "fp32"
    data = prepare_data(opts, build=False)
    if not data.tokenizer_path.is_file():
        raise UsageError(f"run {run_dir} has no tokenizer.json; it was interrupted before training started")
    tokenizer = load_tokenizer(data.tokenizer_path)
    ckpt, root = _checkpoint_api(), ckpt_root(opts)
    if not root.is_dir() or ckpt.latest_tag(root) is None:
        raise UsageError(f"run {run_dir} has no checkpoint yet; train it with "
                         f"`zerotrain train --run-name {run_dir.name} --runs-dir {run_dir.parent}`")
    model = build_model(opts, tokenizer.vocab_size, Mesh.single(run_device(opts)))
    info = ckpt.load(root, model=model)
    model.eval()
    bad = next((n for n, p in model.named_parameters() if not bool(p.isfinite().all())), None)
    if bad is not None:
        from zerotrain.checkpoint.format import CheckpointError
        raise CheckpointError(f"the checkpoint of run {run_dir} at step {info['step']} holds inf or nan values "
                              f"({bad}): training had diverged when it was saved; train again from an "
                              "earlier checkpoint with a lower optim.lr")
    return opts, data, tokenizer, model, int(info["step"])


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", nargs="?", default=Options().run_name,
                        help=f"run name (in --runs-dir) or run directory (default {Options().run_name})")
    parser.add_argument("--runs-dir", default="runs", help="where runs live (default ./runs)")


def cli_eval(argv: list[str]) -> int:
    from .evaluate import evaluate_run, format_results
    from .spawn import configure_logging
    p = argparse.ArgumentParser(prog="zerotrain eval", description=__doc__)
    _common(p)
    p.add_argument("--cloze", type=int, default=None, help="cloze passages (default: the run's setting)")
    p.add_argument("--samples", type=int, default=None, help="tokens per sample, 0 for none")
    p.add_argument("--verbose", action="store_true", help="show loading messages")
    args = p.parse_args(argv)
    configure_logging(0, verbose=args.verbose, quiet=True)
    try:
        for flag, value in (("--cloze", args.cloze), ("--samples", args.samples)):
            if value is not None and value < 0:
                raise UsageError(f"{flag} {value}: must be >= 0 (0 skips it)")
        opts, data, tokenizer, model, step = load_run(args.run, args.runs_dir)
    except UsageError as e:
        print(f"zerotrain eval: error: {e}", file=sys.stderr)
        return 2
    t = opts.train
    results = evaluate_run(model, data, tokenizer, mesh=Mesh.single(device_of(model)), block_size=model.config.block_size,
                           cloze_passages=t.cloze_passages if args.cloze is None else args.cloze,
                           sample_tokens=t.sample_tokens if args.samples is None else args.samples, seed=t.seed)
    print(f"run {opts.run_dir} at step {step}")
    print(format_results(results))
    return 0


def _check_sampling(args) -> None:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature}: must be >= 0 (0 is greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k}: must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p}: must be in (0, 1]")
    if not args.prompt:
        raise UsageError("--prompt is empty; give some text to continue, e.g. --prompt \"In the beginning\"")
    if args.num_samples < 1:
        raise UsageError(f"--num-samples {args.num_samples}: must be >= 1")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("--prompt is not valid UTF-8 text; pass UTF-8 (check the terminal's encoding)") from None


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zerotrain generate", description=__doc__)
    _common(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--verbose", action="store_true", help="show loading messages")
    return p


def cli_generate(argv: list[str]) -> int:
    from .evaluate import sample_texts
    from .spawn import configure_logging
    args = _generate_parser().parse_args(argv)
    configure_logging(0, verbose=args.verbose, quiet=True)
    try:
        _check_sampling(args)
        opts, data, tokenizer, model, step = load_run(args.run, args.runs_dir)
        n_prompt, context = len(tokenizer.encode(args.prompt)), model.config.block_size
        if n_prompt >= context:
            raise UsageError(f"the prompt is {n_prompt} tokens but the model's context is {context} tokens "
                             f"(block_size); shorten the prompt to at most {context - 1} tokens")
    except UsageError as e:
        print(f"zerotrain generate: error: {e}", file=sys.stderr)
        return 2
    new = min(args.max_new_tokens, context - n_prompt)
    if new < args.max_new_tokens:
        print(f"note: only {new} new tokens fit in the {context}-token context", file=sys.stderr)
    for i in range(args.num_samples):
        text = sample_texts(model, tokenizer, [args.prompt], max_new_tokens=new, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed + i)[0]
        print(text if args.num_samples == 1 else f"--- sample {i + 1}\n{text}")
    return 0
