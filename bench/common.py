"""Shared pieces of the benchmarks: the model and data every system trains on, spawning ranks,
peak RSS, live-tensor byte counting, a dispatcher-level collective counter and the §2 formulas.

Nothing here times anything; the scripts (compare.py, largest_model.py) do.
"""
from __future__ import annotations

import os
import pickle
import queue as queue_mod
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from zerotrain.model import GPT, GPTConfig

# What every rank's environment gets: one thread per rank (2 cores, 2 ranks) and glibc returning
# freed multi-MB tensors to the OS (DESIGN.md §4) so peak RSS reflects live tensors.
RANK_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
MiB = 2 ** 20


@dataclass(frozen=True)
class BenchConfig:
    """The model, batch and schedule shared by every system in one comparison."""
    n_layer: int = 8
    n_embd: int = 512
    n_head: int = 8
    vocab_size: int = 8192
    seq_len: int = 64
    micro_batch: int = 4        # sequences per rank per step
    warmup: int = 2             # untimed steps (DDP rebuilds its buckets after the first)
    steps: int = 6              # timed steps
    lr: float = 1e-3
    seed: int = 0
    world: int = 2

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, block_size=self.seq_len, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + 1     # + one step under the collective counter


def build_gpt(cfg: BenchConfig) -> GPT:
    """The same fp32 initial weights on every rank and for every system."""
    torch.manual_seed(cfg.seed)
    return GPT(cfg.gpt_config())


def num_params(cfg: BenchConfig) -> int:
    with torch.device("meta"):
        return GPT(cfg.gpt_config()).num_parameters()


def rank_batches(cfg: BenchConfig, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's slice of each step's global batch. Four global batches are cycled, so the loss
    falls as the model memorises them (a comparison of falling losses means more than of flat ones)."""
    out = []
    for step in range(cfg.total_steps):
        g = torch.Generator().manual_seed(1000 * cfg.seed + step % 4)
        tokens = torch.randint(0, cfg.vocab_size, (cfg.world * cfg.micro_batch, cfg.seq_len + 1), generator=g)
        mine = tokens[rank * cfg.micro_batch:(rank + 1) * cfg.micro_batch]
        out.append((mine[:, :-1].contiguous(), mine[:, 1:].contiguous()))
    return out


def peak_rss_bytes() -> int:
    """This process's own peak resident set size (``VmHWM``). Not ``ru_maxrss``: Linux carries the
    launcher's high-water mark across ``exec``, so a rank would report its launcher's peak when
    that is the larger."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line: peak RSS needs Linux")


def current_rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` now (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0


# ------------------------------------------------------------------ live tensor bytes
def _local(t):
    """A DTensor's local shard, or the tensor itself."""
    return getattr(t, "_local_tensor", t)


class StorageCounter:
    """Adds up storages once each (views of one flat buffer share it), at their current size."""

    def __init__(self):
        self.seen: set = set()
        self.bytes: dict[str, int] = {}

    def add(self, category: str, t) -> None:
        self.bytes.setdefault(category, 0)
        if t is None or not torch.is_tensor(t):
            return
        s = _local(t).untyped_storage()
        key = (s.data_ptr(), str(_local(t).device))
        if key in self.seen or s.nbytes() == 0:
            return
        self.seen.add(key)
        self.bytes[category] += s.nbytes()


def torch_state_bytes(model: torch.nn.Module, optim_state: dict) -> dict[str, int]:
    """Model-state bytes of a plain-torch system: parameters, gradients (DDP's bucket views and
    FSDP2's sharded DTensor grads included) and tensor optimizer states (scalar ``step`` left out)."""
    c = StorageCounter()
    for p in model.parameters():
        c.add("params", p)
    for p in model.parameters():
        c.add("grads", p.grad)
    c.add("master", None)
    c.add("optimizer_states", None)
    for state in optim_state.values():
        for v in state.values():
            if torch.is_tensor(v) and _local(v).dim() > 0:
                c.add("optimizer_states", v)
    out = dict(c.bytes)
    out["model_states"] = sum(out.values())
    return out


# ------------------------------------------------------------------ collectives
_VOLUME = {  # c10d op -> (argument holding the data, logical-volume factor)
    "allreduce_": (0, 2), "allreduce_coalesced_": (0, 2), "broadcast_": (0, 1),
    "_allgather_base_": (0, 1), "allgather_": (0, 1), "allgather_into_tensor_coalesced_": (0, 1),
    "_reduce_scatter_base_": (1, 1), "reduce_scatter_": (1, 1), "reduce_scatter_tensor_coalesced_": (1, 1),
}
_NAMES = {"allreduce": "all_reduce", "allgather": "all_gather", "reduce_scatter": "reduce_scatter",
          "broadcast": "broadcast"}


class CollectiveCounter(TorchDispatchMode):
    """Counts the c10d collectives this rank issues while active, wherever they come from (DDP's
    C++ reducer, FSDP2, ZeroRedundancyOptimizer, zerotrain), in zerotrain's logical-volume
    convention: all-reduce 2× the buffer, all-gather the output, reduce-scatter the input,
    broadcast the buffer. Every op passes through Python while active: never time under it."""

    def __init__(self, world: int):
        super().__init__()
        self.world = world
        self.counts: dict[str, dict] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if func.namespace == "c10d" and name in _VOLUME:
            where, factor = _VOLUME[name]
            tensors = [t for t in tree_flatten(args[where])[0] if isinstance(t, torch.Tensor)]
            nbytes = factor * sum(t.numel() * t.element_size() for t in tensors)
            key = next(v for k, v in _NAMES.items() if name.lstrip("_").startswith(k))
            c = self.counts.setdefault(key, {"calls": 0, "bytes": 0, "wire_bytes": 0.0})
            c["calls"] += 1
            c["bytes"] += nbytes
            c["wire_bytes"] += nbytes * (self.world - 1) / self.world
        return func(*args, **kwargs)


def comm_totals(report: dict) -> tuple[int, float]:
    """(logical bytes, wire bytes) summed over the data collectives of a comm report."""
    keep = [v for k, v in report.items() if k != "all_gather_object"]
    return sum(v["bytes"] for v in keep), sum(v["wire_bytes"] for v in keep)


# ------------------------------------------------------------------ the §2 formulas
def formula_bytes(stage: int, psi: int, n: int, *, p: int, g: int, k: int) -> int:
    """DESIGN.md §2: params p·Ψ, grads g·Ψ, master + optimizer states k·Ψ per rank, each either
    whole or /N by stage. fp32 Adam: p=4, g=4, k=8 (the parameter is the master); mixed Adam:
    p=2, k=12, g = bytes of the reduce dtype (the paper's table has g=2)."""
    whole_p, whole_g, whole_k = {0: (1, 1, 1), 1: (1, 1, 0), 2: (1, 0, 0), 3: (0, 0, 0)}[stage]
    return round(sum(b * psi / (1 if w else n) for b, w in ((p, whole_p), (g, whole_g), (k, whole_k))))


# ------------------------------------------------------------------ spawning ranks
def _rank_entry(rank, world, store, fn, args, results):
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        results.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # noqa: BLE001 - the parent reports the rank's traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankFailed(RuntimeError):
    pass


def spawn(fn, world: int, *args, timeout: float = 900.0, watchdog=None, poll_s: float = 0.05):
    """Run ``fn(rank, world, *args)`` on ``world`` fresh processes (gloo, file store, RANK_ENV) and
    return their results. ``watchdog(pids) -> str | None`` is polled while they run; a message kills
    the ranks (by PID) and raises RankFailed with it."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    saved = {k: os.environ.get(k) for k in RANK_ENV}
    os.environ.update(RANK_ENV)         # a spawned child execs a fresh interpreter with this env
    try:
        with tempfile.TemporaryDirectory() as tmp:
            procs = [ctx.Process(target=_rank_entry, args=(r, world, os.path.join(tmp, "store"), fn, args,
                                                           results), daemon=True) for r in range(world)]
            for p in procs:
                p.start()
            try:
                return _collect(procs, results, world, timeout, watchdog, poll_s)
            finally:
                for p in procs:
                    if p.is_alive():
                        p.kill()
                    p.join()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _collect(procs, results, world, timeout, watchdog, poll_s):
    got, deadline = {}, time.monotonic() + timeout
    while len(got) < world:
        try:
            rank, status, value = results.get(timeout=poll_s)
        except queue_mod.Empty:
            reason = watchdog([p.pid for p in procs]) if watchdog else None
            if reason is None and time.monotonic() > deadline:
                reason = f"ranks did not finish within {timeout:.0f}s"
            if reason is None and any(p.exitcode not in (None, 0) for p in procs):
                reason = "a rank died: exit codes " + str([p.exitcode for p in procs])
            if reason is not None:
                for p in procs:
                    if p.is_alive():
                        p.kill()
                raise RankFailed(reason)
            continue
        if status != "ok":
            raise RankFailed(f"rank {rank} failed:\n{value}")
        got[rank] = pickle.loads(value)
    return [got[r] for r in range(world)]


def code_version() -> str:
    """The commit the run measured, and whether zerotrain/ had uncommitted changes (read-only git)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "zerotrain"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted zerotrain/ changes" if dirty else "")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so spawn()'s cleanup kills the ranks (by PID) on the way out."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)
