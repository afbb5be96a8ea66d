"""The on-disk format of a zerotrain checkpoint: names, the JSON codec and the manifest.

A checkpoint is a directory ``<root>/<tag>/`` holding

* ``rank00000.safetensors`` … one file per rank: 1-D tensors keyed ``<kind>/<param name>/<lo>-<hi>``
  (``kind`` is ``master``, ``state.<key>`` for an optimizer state tensor, or ``extra`` for a buffer
  or frozen parameter; ``[lo, hi)`` is the range of the parameter's flattened local tensor), plus
  that rank's RNG state (``rng/torch``, ``rng/cuda<i>``);
* ``manifest.json``: format version, step, layout (stage, dp, tp, world, dtypes), for every
  parameter its shape, dtype, tensor-parallel split and the list of slices with the file that holds
  each, optimizer groups / state keys / scalar states, scheduler, loss scaler, per-rank RNG
  (JSON part), client state, model config, library version, whether every tensor is finite, and
  the sha256 and size of each file;
* ``manifest.sha256``: the manifest's sha256 in ``sha256sum`` format (``sha256sum -c
  manifest.sha256`` checks it by hand), so the manifest, and through it every file, is covered by
  a checksum. Readers refuse a manifest that does not match it (format version 1, written before
  this file existed, is read without it).

``<root>/latest`` holds the tag of the newest committed checkpoint. Nothing is ever pickled: the
manifest is JSON (tuples, non-string keys and 0-d tensors are tagged so they round-trip exactly)
and tensors are safetensors.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

FORMAT = "zerotrain-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
CHECKSUM = "manifest.sha256"
LATEST = "latest"
_TUPLE, _DICT, _SCALAR = "__zt_tuple__", "__zt_dict__", "__zt_scalar__"

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
          "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint that is damaged, altered, incomplete, or does not fit what it is loaded into."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"checkpoint: unknown dtype {name!r} in the manifest; known: {sorted(DTYPES)}")
    return DTYPES[name]


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def tensor_key(kind: str, name: str, lo: int, hi: int) -> str:
    return f"{kind}/{name}/{lo}-{hi}"


def default_tag(step: int) -> str:
    return f"step{step:08d}"


def check_tag(tag) -> str:
    if not isinstance(tag, str) or not tag or tag.startswith(".") or "/" in tag or "\\" in tag \
            or tag == LATEST:
        raise ValueError(f"checkpoint tag={tag!r} is not a valid directory name; use a non-empty "
                         f"name without '/' that does not start with '.' and is not '{LATEST}'")
    return tag


# ------------------------------------------------------------------ JSON codec
def to_json(value, where: str):
    """Plain-JSON form of ``value``; raises ValueError naming ``where`` for anything else."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_SCALAR: repr(value), "dtype": "float"}
    if isinstance(value, list):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {_TUPLE: [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: to_json(v, f"{where}[{k!r}]") for k, v in value.items()}
        return {_DICT: [[to_json(k, f"{where} key {k!r}"), to_json(v, f"{where}[{k!r}]")]
                        for k, v in value.items()]}
    if torch.is_tensor(value) and value.dim() == 0 and value.dtype in DTYPES.values():
        return {_SCALAR: value.item(), "dtype": dtype_name(value.dtype)}
    raise ValueError(
        f"checkpoint: {where} is a {type(value).__module__}.{type(value).__qualname__}, which cannot "
        "be stored as JSON (zerotrain checkpoints hold no pickle). Keep it to None, bool, int, float, "
        "str, lists, tuples, dicts and 0-d tensors, or store it elsewhere")


def from_json(value):
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if _TUPLE in value:
        return tuple(from_json(v) for v in value[_TUPLE])
    if _DICT in value:
        return {from_json(k): from_json(v) for k, v in value[_DICT]}
    if _SCALAR in value:
        if value["dtype"] == "float":
            return float(value[_SCALAR])
        return torch.tensor(value[_SCALAR], dtype=dtype_of(value["dtype"]))
    return {k: from_json(v) for k, v in value.items()}


# ------------------------------------------------------------------ files
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON and fsync it (the caller renames it into place)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Streamed sha256 (constant memory)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def write_checksum(ckpt_dir: Path) -> None:
    """Write ``manifest.sha256`` for the manifest in ``ckpt_dir`` (fsynced)."""
    path = Path(ckpt_dir) / CHECKSUM
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{sha256_file(Path(ckpt_dir) / MANIFEST)}  {MANIFEST}\n")
        f.flush()
        os.fsync(f.fileno())


def _check_checksum(ckpt_dir: Path, raw: bytes, version) -> None:
    path = Path(ckpt_dir) / CHECKSUM
    if not path.is_file():
        if version == 1:
            return                                   # written before manifests had a checksum
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {CHECKSUM}, so its {MANIFEST} cannot be "
                              "trusted; restore the file or save the checkpoint again")
    want = path.read_text(encoding="utf-8", errors="replace").split()
    if not want or want[0] != hashlib.sha256(raw).hexdigest():
        raise CheckpointError(f"checkpoint manifest {Path(ckpt_dir) / MANIFEST} does not match its checksum in "
                              f"{CHECKSUM}: the manifest was edited or damaged; restore it from a copy or save "
                              "the checkpoint again (every shape, dtype and file hash it lists is suspect)")


def read_manifest(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} has no {MANIFEST}; it is not a "
                                "committed zerotrain checkpoint (an interrupted save leaves none)")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint manifest {path} is not valid JSON ({exc}); the file is damaged") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a zerotrain checkpoint manifest (format field "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: format_version {manifest.get('format_version')!r} is not supported "
                              f"by this zerotrain (it reads versions {READABLE_VERSIONS}); use a matching release")
    _check_checksum(ckpt_dir, raw, manifest["format_version"])
    from .integrity import check_layout
    check_layout(manifest, ckpt_dir)
    return manifest


def check_file(ckpt_dir: Path, name: str, manifest: dict, *, hash: bool = True) -> Path:
    """Check presence and size (and sha256 if ``hash``) of ``name`` against the manifest."""
    info = manifest["files"].get(name)
    path = Path(ckpt_dir) / name
    if info is None:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {name} is not listed in {MANIFEST}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise CheckpointError(f"checkpoint file {path} has {size} bytes, the manifest says {info['bytes']}: "
                              "the file is truncated or altered")
    if hash and sha256_file(path) != info["sha256"]:
        raise CheckpointError(f"checkpoint file {path} fails its sha256 check: the file is corrupted or altered")
    return path


def verify_file(ckpt_dir: Path, name: str, manifest: dict) -> Path:
    """Check size and sha256 of ``name`` against the manifest; returns its path."""
    return check_file(ckpt_dir, name, manifest, hash=True)


# ------------------------------------------------------------------ roots and tags
def latest_tag(root) -> str | None:
    """The tag ``<root>/latest`` points to, or None when there is none."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    return tag or None


def write_latest(root: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` atomically (temp file, fsync, os.replace, fsync the directory)."""
    tmp = root / f".{LATEST}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(tag + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def resolve(path, tag: str | None = None) -> Path:
    """The checkpoint directory for ``path``: a checkpoint directory itself, a checkpoint root
    (``tag`` or its ``latest``), or a run directory whose checkpoints are in ``checkpoints/``."""
    path = Path(path)
    if (path / MANIFEST).is_file() and tag in (None, path.name):
        return path
    if not (path / LATEST).exists() and (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if tag is None:
        tag = latest_tag(path)
        if tag is None:
            raise FileNotFoundError(f"no checkpoint in {path}: it has no '{LATEST}' pointer and no "
                                    f"{MANIFEST} (save one first, or pass tag=)")
    ckpt = path / check_tag(tag)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt} does not exist")
    return ckpt
