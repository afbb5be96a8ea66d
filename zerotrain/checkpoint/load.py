"""``load``: restore a checkpoint into a sharded model (and optimizer, scheduler) at any ZeRO stage,
data-parallel size and, for parameters split by tensor parallelism, any tp degree.

Each rank reads only the slices its own master and optimizer state cover, as positioned reads
of those byte ranges straight into the master and state tensors (no mapping, no staging copy), so
a rank's host memory grows by exactly the state it restores, whatever the number of ranks that
wrote the checkpoint. Then the parameters are made to follow the master exactly as after an
optimizer step (``unit.params_from_master()``: a copy, and an all-gather at stages 1–2). Slices
come from ``owned_slices()`` of the model and optimizer; the optimizer state is handed to the
wrapped optimizer through its own ``load_state_dict``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..distributed import comm
from . import rng
from .collect import global_shape, param_names, split_state_dict, tp_rank_of, tp_spec, zero_state_of
from .format import CheckpointError, dtype_of, from_json, read_manifest, resolve
from .source import ParamSource
from .tensorfile import ShardReader

log = logging.getLogger("zerotrain")


def load(root, *, model, optimizer=None, scheduler=None, tag: str | None = None, verify: bool = True,
         new_params: tuple[str, ...] = ()) -> dict:
    """Load ``<root>/<tag>`` (``tag=None``: the one ``latest`` points to; ``root`` may also be a
    checkpoint directory or a run directory) into ``model`` (sharded by ``shard_model``), and
    ``optimizer``/``scheduler`` if given. Collective. Returns ``{"step", "client_state", "tag", "path",
    "new"}``. ``verify`` checks the sha256 of every file this rank reads. ``new_params``: name prefixes
    of parameters the checkpoint may lack (a head added after it was saved, as fine-tuning adds a copy
    head): those keep the values they have; ``"new"`` lists them. Model-only (no optimizer)."""
    zs = zero_state_of(model, "load")
    ckpt = resolve(root, tag)
    manifest = read_manifest(ckpt)
    if new_params and optimizer is not None:
        raise ValueError("checkpoint.load: new_params is for loading a model only; pass optimizer=None")
    new = _check_compatible(manifest, model, zs, optimizer=optimizer, scheduler=scheduler, ckpt=ckpt,
                            new_params=tuple(new_params))
    error, status = None, None
    try:
        with ShardReader(ckpt, manifest, verify=verify) as reader:
            source = ParamSource(manifest, reader)
            _load_master(zs, source, skip=set(new))
            _load_extras(model, zs, source)
            if optimizer is not None:
                _load_optimizer_state(optimizer, source)
            _load_rng(zs, manifest, reader)
    except Exception as exc:  # noqa: BLE001 - every rank raises together below
        error, status = exc, f"{type(exc).__name__}: {exc}"
    statuses = comm.all_gather_object(status, zs.mesh.world_group)
    if error is not None:
        raise error
    for rank, st in enumerate(statuses):
        if st:
            raise CheckpointError(f"checkpoint.load: rank {rank} failed: {st}")
    for u in zs.units:
        u.params_from_master()
    if optimizer is not None:
        _load_optimizer_hyper(optimizer, manifest["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(from_json(manifest["scheduler"]["state"]))
    log.info("checkpoint: loaded %s (step %d, saved at stage %d dp %d tp %d)", ckpt, manifest["step"],
             manifest["layout"]["stage"], manifest["layout"]["dp"], manifest["layout"]["tp"])
    if new:
        log.info("checkpoint: %d parameters not in %s keep their initial values: %s", len(new), ckpt,
                 ", ".join(new))
    return {"step": manifest["step"], "client_state": from_json(manifest["client_state"]),
            "tag": manifest["tag"], "path": Path(ckpt), "new": new}


# ------------------------------------------------------------------ checks (no collective)
def _check_compatible(manifest, model, zs, *, optimizer, scheduler, ckpt, new_params=()) -> list[str]:
    """The model's parameters that the checkpoint lacks and ``new_params`` allows; raises otherwise."""
    saved = manifest["params"]
    mine = {slot.name: (slot.shape, p) for u in zs.units for slot, p in zip(u.layout.slots, u.params)}
    new = [n for n in mine if n not in saved and new_params and n.startswith(new_params)]
    missing = [n for n in mine if n not in saved and n not in new]
    unexpected = [n for n in saved if n not in mine]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt} does not match the model: missing from the checkpoint "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''}, not in the model "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; build the model it "
                         "was saved from")
    for name, (shape, p) in mine.items():
        if name in new:
            continue
        want = global_shape(shape, tp_spec(p))
        have = global_shape(saved[name]["shape"], saved[name]["tp"])
        if want != have:
            raise CheckpointError(f"checkpoint {ckpt}: parameter {name!r} has shape {have} in the checkpoint "
                             f"and {want} in the model; build the model with the saved configuration")
    _, extras = split_state_dict(model, zs)
    absent = [n for n in extras if n not in manifest["extras"]]
    if absent:
        raise CheckpointError(f"checkpoint {ckpt} lacks buffers/frozen parameters {absent[:5]} of the model")
    if optimizer is not None:
        _check_optimizer(manifest.get("optimizer"), optimizer, zs, ckpt)
    if scheduler is not None and manifest.get("scheduler") is None:
        raise CheckpointError(f"checkpoint {ckpt} has no scheduler state; pass scheduler=None to load it")
    return new


def _check_optimizer(meta, optimizer, zs, ckpt) -> None:
    if meta is None:
        raise CheckpointError(f"checkpoint {ckpt} has no optimizer state; pass optimizer=None to load the "
                         "model only")
    if getattr(optimizer, "model", None) is None or optimizer.zs is not zs:
        raise ValueError("checkpoint.load: optimizer is not a zerotrain.ShardedOptimizer of this model")
    cls = type(optimizer.inner).__qualname__
    if meta["class"] != cls:
        raise CheckpointError(f"checkpoint {ckpt} holds {meta['class']} state, the optimizer is {cls}; "
                         f"build a {meta['class']} (or load with optimizer=None)")
    names = param_names(zs)
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    saved = [g["params"] for g in meta["param_groups"]]
    if [sorted(g) for g in groups] != [sorted(g) for g in saved]:
        raise CheckpointError(f"checkpoint {ckpt}: the optimizer's param groups ({len(groups)} groups) hold other "
                         f"parameters than the saved ones ({len(saved)} groups); build the groups the same way")


# ------------------------------------------------------------------ data
def _load_master(zs, source: ParamSource, skip: set = frozenset()) -> None:
    with torch.no_grad():
        for s in zs.owned_slices():
            if s.name in skip:
                continue
            source.read_into(s.master, s.name, "master", s.span[0], target=tp_spec(s.param),
                             target_rank=tp_rank_of(s.param))


def _load_extras(model, zs, source: ParamSource) -> None:
    _, extras = split_state_dict(model, zs)
    with torch.no_grad():
        for name, t in extras.items():
            flat = t.view(-1) if t.is_contiguous() else torch.empty(t.numel(), dtype=t.dtype)
            source.read_into(flat, name, "extra", 0, target=tp_spec(t), target_rank=tp_rank_of(t), group="extras")
            if not t.is_contiguous():
                t.copy_(flat.view(t.shape))


def _scalar(value, dtype: str | None):
    value = from_json(value)
    return value if dtype is None else torch.tensor(value, dtype=dtype_of(dtype))


def _load_optimizer_state(optimizer, source: ParamSource) -> None:
    state_dtypes = {k: dtype_of(dt) for k, dt in source.manifest["optimizer"]["state"].items()}

    def fill(s, key, out):
        source.read_into(out, s.name, f"state.{key}", s.span[0], target=tp_spec(s.param),
                         target_rank=tp_rank_of(s.param))

    def scalars_of(name):
        return {k: _scalar(v, dt) for k, (v, dt) in source.meta(name)["scalars"].items()}

    with torch.no_grad():
        optimizer.load_owned_state(fill, state_dtypes=state_dtypes, scalars_of=scalars_of)


def _load_optimizer_hyper(optimizer, meta: dict) -> None:
    for g, saved in zip(optimizer.param_groups, meta["param_groups"]):
        g.update(from_json(saved["hyper"]))
    for outer, inner in zip(optimizer.param_groups, optimizer.inner.param_groups):
        inner.update({k: v for k, v in outer.items() if k != "params"})
    if optimizer.scaler is not None and meta.get("scaler") is not None:
        optimizer.scaler.load_state_dict(from_json(meta["scaler"]))


def _load_rng(zs, manifest: dict, reader: ShardReader) -> None:
    """Restore this rank's RNG when the checkpoint was written by the same layout of ranks."""
    mesh, ranks = zs.mesh, manifest["ranks"]
    layout = manifest["layout"]
    if (layout["dp"], layout["tp"]) != (mesh.dp, mesh.tp) or len(ranks) != mesh.world_size:
        log.info("checkpoint: saved by dp=%d tp=%d, loading at dp=%d tp=%d: RNG states not restored",
                 layout["dp"], layout["tp"], mesh.dp, mesh.tp)
        return
    entry = ranks[mesh.rank]
    tensors = {k: reader.read(entry["file"], k) for k in reader.keys(entry["file"]) if k.startswith("rng/")}
    rng.restore(tensors, entry["rng"])
