"""Process-group initialisation: from torchrun's environment, an explicit store, or none at all.

Failure handling (see :mod:`~zerotrain.distributed.watchdog`): every rank of a multi-process job
runs a watchdog, so a rank that raises or dies makes the others leave within seconds (under 30 s
for a rank killed without a word), naming the rank and its error. The collective timeout — the
last resort for a hang nothing else explains — is 300 s: ``init_distributed(timeout_s=...)`` or
the environment variable ``ZEROTRAIN_COLLECTIVE_TIMEOUT`` (seconds) change it. Debug mode
(``debug=True`` or ``ZEROTRAIN_DEBUG_COLLECTIVES=1``) cross-checks the order of collectives
(:mod:`~zerotrain.distributed.calls`).
"""
from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from . import calls, comm, watchdog
from .mesh import Mesh

log = logging.getLogger("zerotrain")

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "ZEROTRAIN_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


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
                     timeout_s: float | None = None, dist_backend: str | None = None,
                     debug: bool | None = None, watch_parent: bool | None = None) -> Mesh:
    """Initialise torch.distributed and return the dp × tp :class:`Mesh`.

    * Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set), joins that group.
    * With ``init_method`` (e.g. ``"file:///tmp/store"``) plus ``rank``/``world_size``, joins it.
    * Otherwise runs as a single process: no process group, every collective is a no-op.

    The backend is gloo on CPU and nccl when CUDA is present, unless ``backend`` says otherwise
    (``dist_backend`` is the same, under DeepSpeed's name). ``timeout_s``: the collective timeout
    (default ``ZEROTRAIN_COLLECTIVE_TIMEOUT`` or 300 s). ``debug``: cross-check the order of
    collectives (default: ``ZEROTRAIN_DEBUG_COLLECTIVES``). ``watch_parent``: leave when the
    launching process exits (default: under torchrun). Calling it again when already initialised
    just builds the mesh.
    """
    backend = backend or dist_backend
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if debug is not None:
        calls.set_debug(debug)
    timeout_s = _timeout(timeout_s)
    if not dist.is_initialized():
        env = all(v in os.environ for v in _TORCHRUN_VARS)
        if init_method is None and not env:
            if tp != 1:
                raise ValueError(f"tp={tp} needs several processes: launch with torchrun "
                                 f"--nproc-per-node {tp} (or more) or `zerotrain train --nproc`")
            log.info("no torchrun environment: running as a single process")
            return Mesh.single(local_device())
        _join(backend or default_backend(), init_method, rank=rank, world_size=world_size, timeout_s=timeout_s)
        # Tear the group down before interpreter shutdown: a gloo group destroyed during teardown
        # can abort the process ("terminate called without an active exception").
        atexit.register(_destroy_at_exit)
        calls.start()
        _start_watchdog(env if watch_parent is None else watch_parent)
    return Mesh.build(tp=tp)


def _join(backend: str, init_method: str | None, *, rank, world_size, timeout_s: float) -> None:
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


def _timeout(timeout_s: float | None) -> float:
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV)
        try:
            timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; set it to e.g. 600") from None
    if not timeout_s > 0:
        raise ValueError(f"the collective timeout must be > 0 seconds, got {timeout_s!r}")
    return float(timeout_s)


def _start_watchdog(watch_parent: bool) -> None:
    world = dist.get_world_size()
    if world == 1 and not watch_parent:
        return
    parent = os.getppid() if watch_parent and os.getppid() != 1 else None
    watchdog.start(dist.distributed_c10d._get_default_store(), rank=dist.get_rank(), world=world,
                   parent_pid=parent)


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
    """Leave the job. A rank that finishes normally first waits (at most 30 s, never once a rank
    has failed) until every rank has finished: a rank that closes its gloo connections while a peer
    is still tearing down can make the peer abort. A rank that failed
    (:func:`~zerotrain.distributed.watchdog.report_failure`) leaves at once."""
    watchdog.finish()
    watchdog.stop()
    if dist.is_initialized():
        dist.destroy_process_group()
    comm.forget_groups()


def _destroy_at_exit() -> None:
    if dist.is_initialized() or watchdog.active() is not None:
        destroy_distributed()
