"""Spawn ranks that meet through a ``file://`` store on gloo and bring their results back.

``spawn(fn, world_size, *args, tp=1)`` runs ``fn(mesh, *args)`` on every rank and returns the list of
per-rank return values (which must be picklable). A rank that raises fails the call with that
rank's traceback; ranks that do not finish within ``timeout`` are killed and the call fails: a
distributed test can never hang CI.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import traceback

import queue as queue_mod

import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 240.0


class RankFailed(RuntimeError):
    pass


def _entry(rank, world_size, store_path, tp, fn, args, queue):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    from zerotrain.distributed import destroy_distributed, init_distributed
    try:
        mesh = init_distributed(tp=tp, backend="gloo", init_method=f"file://{store_path}",
                                rank=rank, world_size=world_size, timeout_s=120)
        result = fn(mesh, *args)
        queue.put((rank, "ok", pickle.dumps(result)))  # bytes: no shared-memory handles
    except BaseException as exc:  # noqa: BLE001 - the parent re-raises with the rank's traceback
        from zerotrain.distributed import report_failure
        report_failure(exc)            # the other ranks leave now instead of waiting for this one
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            destroy_distributed()
        except Exception:  # noqa: BLE001
            pass


def spawn(fn, world_size: int, *args, tp: int = 1, timeout: float = DEFAULT_TIMEOUT):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(r, world_size, store, tp, fn, args, queue), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results, errors = {}, {}
        try:
            for _ in range(world_size):
                try:
                    rank, status, value = queue.get(timeout=timeout)
                except queue_mod.Empty as exc:
                    raise RankFailed(f"ranks {sorted(set(range(world_size)) - set(results) - set(errors))} "
                                     f"did not finish within {timeout:.0f}s (hang?)") from exc
                if status == "ok":
                    results[rank] = pickle.loads(value)
                else:
                    errors[rank] = value
                if errors:
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.5)
                if p.is_alive():
                    p.kill()
                    p.join()
    if errors:
        rank = min(errors)
        raise RankFailed(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]


def status_bytes(field: str) -> int:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line: memory checks need Linux")


def peak_rss_bytes() -> int:
    """This process's own peak RSS (``VmHWM``). Not ``ru_maxrss``: Linux carries the high-water
    mark of the process that forked a spawned rank across ``exec``, so a rank spawned by a large
    pytest process would report that process's peak instead of its own."""
    return status_bytes("VmHWM")
