"""Writing and reading the tensor files of a checkpoint (safetensors, no pickle).

The writer streams each tensor straight to disk in the safetensors layout (8-byte header length,
JSON header, raw little-endian data) and hashes the bytes as it writes them, so saving needs no
copy of a rank's state and no second pass for the checksum. The reader parses and checks the
header itself and reads exactly the byte ranges asked for with positioned reads (the files stay
ordinary safetensors files, readable by ``safetensors.safe_open``).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from .format import CheckpointError, verify_file

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}


def _raw(t: torch.Tensor):
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    return memoryview(t.view(torch.uint8).numpy())


def write_safetensors(path: Path, entries, metadata: dict[str, str] | None = None) -> tuple[str, int]:
    """Write ``entries`` — (name, dtype, shape, tensor or zero-argument callable giving it), in file
    order — as a safetensors file, fsync it, and return (sha256 hex digest, size in bytes)."""
    header, offset = {}, 0
    for name, dtype, shape, _ in entries:
        if dtype not in _ST_DTYPES:
            raise ValueError(f"checkpoint: tensor {name!r} has dtype {dtype}, which safetensors cannot hold")
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            digest.update(chunk)
        for name, dtype, shape, get in entries:
            t = get() if callable(get) else get
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"checkpoint writer: {name} is {t.dtype} {tuple(t.shape)}, "
                                   f"announced {dtype} {tuple(shape)}")
            data = _raw(t)
            f.write(data)
            digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest(), 8 + len(raw) + offset


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 << 20


def _parse_header(fd: int, path: Path) -> tuple[int, dict]:
    """(data start offset, {key: (dtype, shape, begin, end)}) after checking every entry."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) != 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > min(_MAX_HEADER, size - 8):
        raise ValueError(f"header length {n} does not fit the file size {size}")
    header = json.loads(os.pread(fd, n, 8).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    data, entries = 8 + n, {}
    for key, e in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, (begin, end) = e["dtype"], e["shape"], e["data_offsets"]
        numel = torch.Size(shape).numel()
        fits = 0 <= begin <= end <= size - data
        if dtype not in _ITEMSIZE or not fits or end - begin != numel * _ITEMSIZE[dtype]:
            raise ValueError(f"entry {key!r} is inconsistent ({dtype}, {shape}, [{begin}, {end}))")
        entries[key] = (_FROM_ST[dtype], shape, data + begin, data + end)
    return data, entries


class ShardReader:
    """Reads slices of a checkpoint's tensor files (safetensors layout) with positioned reads: only
    the bytes asked for are read, straight into the destination tensor; nothing is memory-mapped,
    so a rank's resident memory grows only by the tensors it restores. Each file is opened (and
    its sha256 verified) on first use."""

    def __init__(self, ckpt_dir: Path, manifest: dict, *, verify: bool = True):
        self.dir, self.manifest, self.verify = Path(ckpt_dir), manifest, verify
        self._open: dict[str, tuple[int, dict]] = {}

    def handle(self, file: str) -> tuple[int, dict]:
        if file not in self._open:
            path = verify_file(self.dir, file, self.manifest) if self.verify else self.dir / file
            fd = os.open(path, os.O_RDONLY)
            try:
                self._open[file] = (fd, _parse_header(fd, path)[1])
            except Exception as exc:  # noqa: BLE001 - any parse failure means a damaged file
                os.close(fd)
                raise CheckpointError(f"checkpoint file {path} is not a valid safetensors file ({exc})") from exc
        return self._open[file]

    def keys(self, file: str) -> list[str]:
        return list(self.handle(file)[1])

    def _entry(self, file: str, key: str):
        fd, entries = self.handle(file)
        if key not in entries:
            raise CheckpointError(f"checkpoint file {self.dir / file} has no tensor {key!r}; the file does "
                                  "not match its manifest")
        return fd, entries[key]

    def read_into(self, file: str, key: str, lo: int, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (contiguous, CPU) with elements [lo, lo + out.numel()) of flattened ``key``."""
        fd, (dtype, shape, begin, end) = self._entry(file, key)
        item = out.element_size()
        if dtype != out.dtype or not out.is_contiguous() or lo < 0 or begin + (lo + out.numel()) * item > end:
            raise CheckpointError(f"checkpoint file {self.dir / file}: cannot read elements [{lo}, "
                                  f"{lo + out.numel()}) of {key!r} ({dtype}, {shape}) as {out.dtype}")
        view = memoryview(out.detach().view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        pos, offset = 0, begin + lo * item
        while pos < len(view):
            n = os.preadv(fd, [view[pos:]], offset + pos)
            if n <= 0:
                raise CheckpointError(f"checkpoint file {self.dir / file} ended early while reading {key!r}")
            pos += n
        return out

    def read(self, file: str, key: str) -> torch.Tensor:
        """The whole tensor ``key`` of ``file``."""
        _, (dtype, shape, _, _) = self._entry(file, key)
        return self.read_into(file, key, 0, torch.empty(shape, dtype=dtype))

    def close(self) -> None:
        for fd, _ in self._open.values():
            os.close(fd)
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
