"""``explain`` (every effective value and its source) and the ``zerotrain config`` command line."""
from __future__ import annotations

import argparse
import json
import sys

from zerotrain.config.errors import ConfigError
from zerotrain.config.loading import load_config
from zerotrain.config.schema import BATCH_KEYS, ZeroTrainConfig, _walk


def explain(cfg: ZeroTrainConfig, dp_size: int) -> str:
    """The effective config: every value and where it came from (user, default, derived, inert)."""
    batch, rows = cfg.resolve(dp_size), []
    for path, value, source, inert in _walk(cfg, ""):
        if path in BATCH_KEYS:
            value = getattr(batch, path)
            source = f"derived: {batch.derivation[path]}" if path in batch.derivation else source
        if path.endswith("warmup_max_lr") and value is None:
            value = cfg.optimizer.params.lr if cfg.optimizer is not None else None
            source = "derived: optimizer.params.lr" if value is not None else "default: the optimizer's lr"
        if path in ("optimizer", "scheduler"):
            source = "not set"
        rows.append((path, value, source + (", inert" if inert else "")))
    rows += [("(world size = dp × tp)", dp_size * cfg.tensor_parallel.tp_size, "derived"),
             ("(precision)", cfg.precision, "derived")]
    if cfg.optimizer is not None:
        rows.append(("(torch optimizer)", f"torch.optim.{cfg.build_optimizer_spec()[0].__name__}", "derived"))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"zerotrain effective config (data-parallel size {dp_size})",
             "sources: user = set in the config, default = not set, derived = computed, "
             "inert = accepted without effect", ""]
    return "\n".join(lines + [f"{p:<{width}}{json.dumps(v, default=str):<14} [{s}]" for p, v, s in rows])


def cli_config(argv: list[str]) -> int:
    """``zerotrain config explain FILE [--dp N]`` and ``zerotrain config validate FILE [--dp N]``."""
    parser = argparse.ArgumentParser(prog="zerotrain config", description="Check a ds_config-style JSON.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("explain", "print the effective config"), ("validate", "check the config")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("file")
        cmd.add_argument("--dp", type=int, default=None, help="data-parallel size (explain: default 1)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        cfg = load_config(args.file)
        if args.command == "explain":
            print(explain(cfg, 1 if args.dp is None else args.dp))
            return 0
        if args.dp is not None:
            cfg.resolve(args.dp)
    except ConfigError as e:
        from zerotrain.cli import one_line
        print(f"zerotrain config: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    inert = cfg.inert_keys()
    print(f"{args.file}: valid" + (f"; accepted without effect: {', '.join(inert)}" if inert else ""))
    return 0
