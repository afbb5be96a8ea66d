"""``save``: every rank writes its shard file into a temporary directory; rank 0 writes the manifest
and commits by renaming the directory and then pointing ``latest`` at it.

Protocol (collective over the world group; every step that can fail on one rank is followed by an
exchange of status, so all ranks raise together instead of hanging):

1. every rank checks the arguments and encodes the JSON parts (errors raise before any collective);
2. every rank checks that the tensors it will write are finite (a checkpoint holding inf or nan is
   refused unless ``allow_nonfinite``); rank 0 creates ``<root>/.tmp-<tag>`` (removing leftovers of
   interrupted saves); exchange;
3. every rank writes ``rank<r>.safetensors`` there, fsyncs it and reports its sha256; exchange;
4. rank 0 writes ``manifest.json`` and ``manifest.sha256``, fsyncs, renames the directory to
   ``<root>/<tag>``, fsyncs the root, replaces ``latest`` atomically, applies keep-last-N retention
   (which never removes the newest checkpoint whose values are all finite); exchange.

A process killed at any point before step 4's ``latest`` update leaves the previous checkpoint as
``latest``; the test hook ``ZEROTRAIN_CHECKPOINT_FAULT=after_shards|before_rename|before_latest``
makes rank 0 ``os._exit`` at that point.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from ..distributed import comm
from . import rng
from .collect import collect, describe_params, model_info, param_names, zero_state_of
from .format import (FORMAT, FORMAT_VERSION, MANIFEST, CheckpointError, check_tag, default_tag, dtype_name,
                     fsync_dir, latest_tag, rank_file, to_json, write_checksum, write_json, write_latest)
from .tensorfile import write_safetensors

log = logging.getLogger("zerotrain")
FAULT_ENV = "ZEROTRAIN_CHECKPOINT_FAULT"
FAULT_EXIT_CODE = 86


def _fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        log.error("checkpoint: fault injection %s=%s: exiting now", FAULT_ENV, point)
        os._exit(FAULT_EXIT_CODE)


def _exchange(value, group, what: str):
    """All-gather (status, value); raise on every rank if any rank failed."""
    statuses = comm.all_gather_object(value, group)
    for rank, st in enumerate(statuses):
        if isinstance(st, dict) and st.get("error"):
            kept = "" if what == "committing" else " (nothing was committed: the previous checkpoint is the latest)"
            raise CheckpointError(f"checkpoint.save: {what} failed on rank {rank}: {st['error']}{kept}")
    return statuses


def _attempt(fn, *args, **kwargs):
    try:
        return {"error": None, "value": fn(*args, **kwargs)}
    except Exception as exc:  # noqa: BLE001 - reported to every rank by _exchange
        log.exception("checkpoint.save failed")
        return {"error": f"{type(exc).__name__}: {exc}"}


def _check_args(step, keep_last, optimizer, model) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint.save: step={step!r} must be an int >= 0")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"checkpoint.save: keep_last={keep_last!r} must be None (keep all) or an int >= 1")
    if optimizer is not None and getattr(optimizer, "model", None) is not model:
        raise ValueError("checkpoint.save: optimizer is not a zerotrain.ShardedOptimizer of this model")


def _json_parts(model, zs, *, optimizer, scheduler, client_state) -> dict:
    parts = {"client_state": to_json(dict(client_state or {}), "client_state"),
             "scheduler": None, "optimizer": None, "model": model_info(model)}
    if scheduler is not None:
        parts["scheduler"] = {"class": type(scheduler).__qualname__,
                              "state": to_json(scheduler.state_dict(), "scheduler.state_dict()")}
    if optimizer is not None:
        names = param_names(zs)
        groups = [{"hyper": to_json({k: v for k, v in g.items() if k != "params"}, f"optimizer param group {i}"),
                   "params": [names[id(p)] for p in g["params"]]} for i, g in enumerate(optimizer.param_groups)]
        parts["optimizer"] = {"class": type(optimizer.inner).__qualname__, "param_groups": groups,
                              "state": {}, "scaler": to_json(optimizer.scaler.state_dict(), "loss scaler")
                              if optimizer.scaler is not None else None}
    return parts


def save(root, *, model, optimizer=None, scheduler=None, step: int, client_state: dict | None = None,
         keep_last: int | None = None, tag: str | None = None, allow_nonfinite: bool = False) -> Path:
    """Save a sharded checkpoint to ``<root>/<tag>`` (default tag ``step%08d``) and point
    ``<root>/latest`` at it. Collective: every rank calls it with the same arguments; ``root`` must
    be visible to every rank. ``client_state`` (JSON-able: data position, ...) comes back from
    ``load`` (rank 0's is stored). ``keep_last=N`` deletes older checkpoints beyond the newest N
    (never the newest finite one). Weights or optimizer state holding inf or nan raise
    :class:`CheckpointError` on every rank and nothing is written, unless ``allow_nonfinite``."""
    zs = zero_state_of(model, "save")
    _check_args(step, keep_last, optimizer, model)
    tag = check_tag(default_tag(step) if tag is None else tag)
    parts = _json_parts(model, zs, optimizer=optimizer, scheduler=scheduler, client_state=client_state)
    mesh, root = zs.mesh, Path(root)
    tmp = root / f".tmp-{tag}"
    t0 = time.perf_counter()
    checks = _exchange(_attempt(_check_and_prepare, model, zs, optimizer, root=root, tmp=tmp,
                                allow_nonfinite=allow_nonfinite), mesh.world_group, "preparing")
    parts["finite"] = all(c["value"] for c in checks)
    reports = _exchange(_attempt(_write_rank, model, zs, optimizer, tmp), mesh.world_group, "writing shards")
    status = None
    if mesh.rank == 0:
        _fault("after_shards")
        status = _attempt(lambda: _commit(root, tmp, tag, keep_last=keep_last, manifest=_manifest(
            model, zs, parts, [r["value"] for r in reports], step=step, tag=tag)))
    _exchange(status, mesh.world_group, "committing")
    log.info("checkpoint: saved %s (step %d) in %.2fs", root / tag, step, time.perf_counter() - t0)
    return root / tag


def _all_finite(t, chunk: int = 1 << 24) -> bool:
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _check_and_prepare(model, zs, optimizer, *, root: Path, tmp: Path, allow_nonfinite: bool) -> bool:
    """Whether this rank's tensors are all finite (raising if not and not allowed); rank 0 prepares."""
    bad = next((key for key, t in collect(model, zs, optimizer).tensors
                if t.is_floating_point() and not _all_finite(t)), None)
    if bad is not None and not allow_nonfinite:
        latest = latest_tag(root) if root.is_dir() else None
        raise CheckpointError(f"{bad} holds inf or nan: refusing to write a checkpoint that cannot be resumed "
                              f"from ({f'{latest} stays the latest' if latest else 'no checkpoint is written'}); "
                              "pass allow_nonfinite=True to save it anyway")
    if zs.mesh.rank == 0:
        _prepare(root, tmp)
    return bad is None


def _prepare(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.iterdir():
        if not stale.is_dir() or not stale.name.startswith((".tmp-", ".old-", ".trash-")):
            continue
        original = root / stale.name[len(".old-"):]
        if stale.name.startswith(".old-") and not original.exists():
            os.rename(stale, original)                   # a re-save died between its two renames
        else:
            shutil.rmtree(stale, ignore_errors=True)     # left by an interrupted save
    tmp.mkdir()


def _write_rank(model, zs, optimizer, tmp: Path) -> dict:
    content = collect(model, zs, optimizer)
    rng_tensors, rng_info = rng.capture()
    entries = [(k, t.dtype, tuple(t.shape), t) for k, t in content.tensors]
    entries += [(k, t.dtype, tuple(t.shape), t) for k, t in rng_tensors.items()]
    mesh = zs.mesh
    name = rank_file(mesh.rank)
    sha, size = write_safetensors(tmp / name, entries, {"format": FORMAT, "rank": mesh.rank})
    return {"rank": mesh.rank, "dp_rank": mesh.dp_rank, "tp_rank": mesh.tp_rank, "file": name,
            "sha256": sha, "bytes": size, "slices": content.slices, "scalars": content.scalars,
            "state_dtypes": content.state_dtypes, "rng": rng_info}


def _manifest(model, zs, parts: dict, reports: list[dict], *, step: int, tag: str) -> dict:
    params, extras, aliases = describe_params(model, zs)
    optimizer = parts["optimizer"]
    for rep in reports:
        for group, name, lo, hi, keys in rep["slices"]:
            table = params if group == "param" else extras
            table[name]["slices"].append({"file": rep["file"], "tp_rank": rep["tp_rank"], "lo": lo, "hi": hi,
                                          "state": keys})
        for name, scalars in rep["scalars"].items():
            params[name]["scalars"] = params[name]["scalars"] or scalars
        if optimizer is not None:
            optimizer["state"].update(rep["state_dtypes"])
    for meta in list(params.values()) + list(extras.values()):
        meta["slices"].sort(key=lambda s: (s["tp_rank"], s["lo"]))
    mesh = zs.mesh
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": _version(),
        "tag": tag, "step": step, "created_unix": time.time(), "finite": parts["finite"],
        "layout": {"stage": zs.stage, "dp": mesh.dp, "tp": mesh.tp, "world": mesh.world_size,
                   "param_dtype": dtype_name(zs.dtypes.param), "master_dtype": dtype_name(zs.dtypes.master)},
        "model": parts["model"], "params": params, "extras": extras, "aliases": aliases,
        "optimizer": optimizer, "scheduler": parts["scheduler"], "client_state": parts["client_state"],
        "ranks": [{k: rep[k] for k in ("rank", "dp_rank", "tp_rank", "file", "rng")} for rep in reports],
        "files": {rep["file"]: {"sha256": rep["sha256"], "bytes": rep["bytes"]} for rep in reports},
    }


def _version() -> str:
    from .. import __version__
    return __version__


def _commit(root: Path, tmp: Path, tag: str, *, manifest: dict, keep_last: int | None) -> None:
    write_json(tmp / MANIFEST, manifest)
    write_checksum(tmp)
    fsync_dir(tmp)
    _fault("before_rename")
    final, old = root / tag, None
    if final.exists():                                   # re-saving a tag: move the old one aside
        old = root / f".old-{tag}"
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fault("before_latest")
    write_latest(root, tag)
    if keep_last is not None:
        apply_retention(root, keep_last, protect={tag})


def committed(root: Path) -> list[tuple[int, float, str, bool]]:
    """(step, commit time, tag, finite) of every committed checkpoint under ``root``, oldest first."""
    out = []
    for d in Path(root).iterdir():
        man = d / MANIFEST
        if d.is_dir() and not d.name.startswith(".") and man.is_file():
            try:
                meta = json.loads(man.read_text(encoding="utf-8"))
                step, finite = int(meta.get("step", -1)), meta.get("finite", True) is not False
            except (ValueError, TypeError, AttributeError):
                step, finite = -1, False
            out.append((step, man.stat().st_mtime, d.name, finite))
    return sorted(out)


def apply_retention(root: Path, keep_last: int, *, protect=()) -> list[str]:
    """Delete all but the newest ``keep_last`` checkpoints; never ``protect``-ed tags, ``latest``'s,
    nor the newest checkpoint whose values are all finite."""
    entries = committed(root)
    finite = [tag for _, _, tag, ok in entries if ok]
    keep = set(protect) | {latest_tag(root)} | set(finite[-1:])
    doomed = [tag for _, _, tag, _ in entries[:max(0, len(entries) - keep_last)] if tag not in keep]
    for tag in doomed:
        trash = root / f".trash-{tag}"
        os.rename(root / tag, trash)                      # never a half-deleted "committed" directory
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        log.info("checkpoint: retention keep_last=%d removed %s", keep_last, ", ".join(doomed))
    return doomed
