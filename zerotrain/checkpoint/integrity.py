"""What a checkpoint's manifest and files must agree on before a byte of it is trusted.

* :func:`check_layout` (every read of a manifest): each tensor's dtype is known and, on every
  tensor-parallel rank that holds it, its slices cover exactly the elements its shape has — no
  gap, no overlap, nothing past the end. A shape edited to another element count fails here.
* :func:`check_entry` (every slice read, and ``inspect``): the slice's entry in its file holds
  ``hi - lo`` elements of the manifest's dtype — the shape x dtype the manifest promises against
  the bytes present.
* :func:`check_files` (``inspect``): every file is present with its size and a valid header;
  with ``hashes`` also its sha256.

A shape edited to the same element count (transposed, say) is caught by the manifest's checksum
(:data:`~zerotrain.checkpoint.format.CHECKSUM`), which :func:`~zerotrain.checkpoint.format.read_manifest`
checks first.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .format import CheckpointError, check_file, dtype_of, tensor_key


def _tp_ranks(meta: dict) -> range:
    return range(meta["tp"]["size"]) if meta.get("tp") else range(1)


def check_layout(manifest: dict, ckpt) -> None:
    try:
        for group in ("params", "extras"):
            for name, meta in manifest[group].items():
                _check_tensor(name, meta, ckpt)
        for key, dt in ((manifest.get("optimizer") or {}).get("state") or {}).items():
            dtype_of(dt)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: the manifest lacks or garbles {exc} — it is damaged or "
                              "was edited; restore it or save the checkpoint again") from None


def _check_tensor(name: str, meta: dict, ckpt) -> None:
    dtype_of(meta["dtype"])
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"checkpoint {ckpt}: {name!r} has shape {shape!r} in the manifest, which is "
                              "not a list of sizes; the manifest is damaged")
    numel = math.prod(shape)
    for rank in _tp_ranks(meta):
        spans = sorted((s["lo"], s["hi"]) for s in meta["slices"] if s["tp_rank"] == rank)
        covered = 0
        for lo, hi in spans:
            if lo != covered or hi < lo:
                break
            covered = hi
        if covered != numel or (spans and spans[-1][1] != numel):
            raise CheckpointError(
                f"checkpoint {ckpt}: {name!r} has shape {shape} ({numel:,} elements) in the manifest, but "
                f"its slices on tensor-parallel rank {rank} cover {_spans(spans)}; the manifest does not "
                "describe the files (edited or damaged) — restore it or save the checkpoint again")


def _spans(spans) -> str:
    shown = ", ".join(f"[{lo}, {hi})" for lo, hi in spans[:4])
    return (shown + (", ..." if len(spans) > 4 else "")) or "nothing"


def check_entry(reader, file: str, key: str, *, dtype: torch.dtype, numel: int) -> None:
    """The entry ``key`` of ``file`` holds ``numel`` elements of ``dtype``."""
    entries = reader.handle(file)[1]
    if key not in entries:
        raise CheckpointError(f"checkpoint file {reader.dir / file} has no tensor {key!r}; the file does not "
                              "match its manifest")
    have, shape, begin, end = entries[key]
    if have != dtype or math.prod(shape) != numel:
        raise CheckpointError(f"checkpoint file {reader.dir / file}: {key!r} holds {math.prod(shape):,} {have} "
                              f"elements ({end - begin:,} bytes), the manifest promises {numel:,} {dtype}; the "
                              "manifest and the file do not match")


def _expected_entries(manifest: dict):
    """(file, key, dtype, numel) of every slice the manifest lists."""
    states = (manifest.get("optimizer") or {}).get("state") or {}
    for group, kind in (("params", "master"), ("extras", "extra")):
        for name, meta in manifest[group].items():
            for sl in meta["slices"]:
                n = sl["hi"] - sl["lo"]
                yield sl["file"], tensor_key(kind, name, sl["lo"], sl["hi"]), dtype_of(meta["dtype"]), n
                for key in sl.get("state", []):
                    yield sl["file"], tensor_key(f"state.{key}", name, sl["lo"], sl["hi"]), dtype_of(states[key]), n


def check_files(ckpt: Path, manifest: dict, *, hashes: bool) -> int:
    """Presence, size, header and entries of every file (and sha256 with ``hashes``); returns the
    number of files. Raises CheckpointError / FileNotFoundError naming the first problem."""
    from .tensorfile import ShardReader
    for name in manifest["files"]:
        check_file(ckpt, name, manifest, hash=hashes)
    with ShardReader(ckpt, manifest, verify=False) as reader:
        for file, key, dtype, numel in _expected_entries(manifest):
            check_entry(reader, file, key, dtype=dtype, numel=numel)
    return len(manifest["files"])


__all__ = ["check_layout", "check_entry", "check_files", "CheckpointError"]
