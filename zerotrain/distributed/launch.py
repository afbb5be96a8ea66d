"""Process-group initialisation: from torchrun's environment, an explicit store, or none at all."""
from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from . import comm
from .mesh import Mesh

log = logging.getLogger("zerotrain")

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is present (DeepSpeed's placement), else
    the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, *, tp: int = 1, init_method: str | None = None,
                     rank: int | None = None, world_size: int | None = None,
                     timeout_s: float = 300.0, dist_backend: str | None = None) -> Mesh:
    """Initialise torch.distributed and return the dp × tp :class:`Mesh`.

    * Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set), joins that group.
    * With ``init_method`` (e.g. ``"file:///tmp/store"``) plus ``rank``/``world_size``, joins it.
    * Otherwise runs as a single process: no process group, every collective is a no-op.

    The backend is gloo on CPU and nccl when CUDA is present, unless ``backend`` says otherwise
    (``dist_backend`` is the same, under DeepSpeed's name).
    Calling it again when already initialised just builds the mesh.
    """
    backend = backend or dist_backend
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if not dist.is_initialized():
        env = all(v in os.environ for v in _TORCHRUN_VARS)
        if init_method is None and not env:
            if tp != 1:
                raise ValueError(f"tp={tp} needs several processes: launch with torchrun "
                                 f"--nproc-per-node {tp} (or more) or `zerotrain train --nproc`")
            log.info("no torchrun environment: running as a single process")
            return Mesh.single(local_device())
        backend = backend or default_backend()
        kwargs = dict(backend=backend, timeout=timedelta(seconds=timeout_s))
        if init_method is not None:
            if rank is None or world_size is None:
                raise ValueError("init_method needs rank= and world_size=")
            kwargs.update(init_method=init_method, rank=rank, world_size=world_size)
        elif "TORCHELASTIC_RESTART_COUNT" in os.environ:
            kwargs.update(_elastic_store(timeout_s))
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", rank or 0))
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(**kwargs)
        # Tear the group down before interpreter shutdown: a gloo group destroyed during teardown
        # can abort the process ("terminate called without an active exception").
        atexit.register(_destroy_at_exit)
    return Mesh.build(tp=tp)


def _elastic_store(timeout_s: float) -> dict:
    """Join torchrun's store under a per-restart prefix. After an elastic restart the store still
    holds the previous attempt's addresses; reading one of them fails with "connection refused"."""
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=None,
                          is_master=not agent_store and rank == 0, timeout=timedelta(seconds=timeout_s))
    return {"store": dist.PrefixStore(f"zerotrain/attempt{attempt}", store), "rank": rank, "world_size": world}


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    comm.forget_groups()


def _destroy_at_exit() -> None:
    """Leave together: a rank that closes its gloo connections while a peer is still tearing
    down can make the peer abort. A bounded barrier first (a crashed peer cannot hang exit)."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
            dist.monitored_barrier(timeout=timedelta(seconds=30))
    except Exception:  # noqa: BLE001 - a peer already gone: nothing left to wait for
        pass
    destroy_distributed()
