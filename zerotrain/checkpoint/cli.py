"""``zerotrain checkpoint inspect RUN_OR_DIR`` and ``zerotrain checkpoint consolidate RUN_OR_DIR -o FILE``.

RUN_OR_DIR is a run directory (its checkpoints live in ``checkpoints/``), a checkpoint root (with a
``latest`` pointer) or one checkpoint directory.

``inspect`` checks the manifest against its checksum and every file's presence, size and header
against the manifest (``--verify`` adds every file's sha256); ``consolidate`` checks all of that
and each tensor's shape x dtype against the bytes it reads. A problem is an error (one line, exit
status 3 for a damaged checkpoint, 6 for a missing file: see ``zerotrain.cli``).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .collect import global_shape
from .format import from_json, latest_tag, read_manifest, resolve
from .integrity import check_files

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "keep": None}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary(ckpt: Path, manifest: dict) -> list[tuple[str, str]]:
    """(label, text) rows describing a checkpoint."""
    lay = manifest["layout"]
    params = manifest["params"]
    count = sum(math.prod(global_shape(m["shape"], m["tp"])) for m in params.values())
    rows = [("checkpoint", str(ckpt)), ("tag", manifest["tag"] + (" (latest)" if latest_tag(ckpt.parent)
                                                               == manifest["tag"] else "")),
            ("step", str(manifest["step"])
             + ("" if manifest.get("finite", True) else "  (holds inf/nan: saved with allow_nonfinite)")),
            ("layout", f"stage {lay['stage']}, dp {lay['dp']}, tp {lay['tp']}, world {lay['world']} "
                       f"(params {lay['param_dtype']}, master {lay['master_dtype']})"),
            ("model", f"{manifest['model']['class']} {json.dumps(from_json(manifest['model']['config']))}"),
            ("parameters", f"{count:,} in {len(params)} tensors"
                           + "".join(f"; {a} -> {t} (tied)" for a, t in manifest["aliases"].items())),
            ("buffers", ", ".join(manifest["extras"]) or "none")]
    opt = manifest.get("optimizer")
    if opt is None:
        rows.append(("optimizer", "none"))
    else:
        scalars = sorted({k for m in params.values() for k in m.get("scalars", {})})
        rows.append(("optimizer", f"{opt['class']}, {len(opt['param_groups'])} param group(s); state "
                                  + ", ".join([f"{k} ({d})" for k, d in opt["state"].items()] + scalars)))
        if opt.get("scaler"):
            rows.append(("loss scaler", json.dumps(from_json(opt["scaler"]))))
    sched = manifest.get("scheduler")
    rows.append(("scheduler", "none" if sched is None else
                 f"{sched['class']} (last_epoch {from_json(sched['state']).get('last_epoch')})"))
    rows.append(("client state", ", ".join(manifest["client_state"]) or "none"))
    total = 0
    for name, info in manifest["files"].items():
        rows.append(("file", f"{name}  {_size(info['bytes'])}  sha256 {info['sha256'][:16]}"))
        total += info["bytes"]
    listed = set(manifest["files"]) | {"manifest.json", "manifest.sha256"}
    ignored = sorted(p.name for p in ckpt.iterdir() if p.name not in listed)
    if ignored:
        rows.append(("ignored", ", ".join(ignored) + " (not part of the checkpoint; never read)"))
    rows += [("total", _size(total)),
             ("written by", f"zerotrain {manifest['library_version']}, format {manifest['format_version']}")]
    return rows


def _inspect(args) -> int:
    ckpt = resolve(args.path, args.tag)
    manifest = read_manifest(ckpt)                 # its checksum and its layout
    count = check_files(ckpt, manifest, hashes=args.verify)
    if args.json:
        print(json.dumps({k: manifest[k] for k in ("tag", "step", "layout", "files", "client_state")}, indent=1))
        return 0
    for label, text in summary(ckpt, manifest):
        print(f"{label:<13} {text}")
    checked = "sizes, headers and sha256 match" if args.verify else \
        "sizes and headers match (--verify also checks their sha256)"
    print(f"{'checked':<13} manifest checksum OK; {count} file(s) present, {checked}")
    return 0


def _consolidate(args) -> int:
    from .consolidate import consolidate, full_state_dict, to_hf_gpt2_state_dict
    from .format import dtype_of
    dtype = _DTYPES[args.dtype]
    dtype = dtype_of(dtype) if dtype else None
    if args.hf_gpt2:
        from .tensorfile import write_safetensors
        sd = to_hf_gpt2_state_dict(full_state_dict(args.path, tag=args.tag, dtype=dtype, include_aliases=False))
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(out, [(k, t.dtype, tuple(t.shape), t.contiguous()) for k, t in sd.items()],
                          {"format": "pt"})
    else:
        out = consolidate(args.path, args.output, tag=args.tag, dtype=dtype)
    print(f"wrote {out} ({_size(out.stat().st_size)})")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zerotrain checkpoint", description="inspect or consolidate a checkpoint")
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="describe a checkpoint (step, layout, files, state)")
    ins.add_argument("path", help="run directory, checkpoint root, or checkpoint directory")
    ins.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    ins.add_argument("--verify", action="store_true", help="check every file's sha256")
    ins.add_argument("--json", action="store_true", help="machine-readable summary")
    con = sub.add_parser("consolidate", help="write one safetensors file of full parameters")
    con.add_argument("path", help="run directory, checkpoint root, or checkpoint directory")
    con.add_argument("-o", "--output", required=True, help="output .safetensors file")
    con.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    con.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="dtype of floating tensors")
    con.add_argument("--hf-gpt2", action="store_true", help="name and lay out tensors as HF GPT2LMHeadModel")
    return p


def cli_checkpoint(argv: list[str] | None = None) -> int:
    """Errors propagate: ``zerotrain.cli`` prints them as one line with their exit status."""
    args = _parser().parse_args(argv)
    return _inspect(args) if args.command == "inspect" else _consolidate(args)
