"""Before ``zerotrain train`` spawns its ranks: does the run fit this machine, and is it sane?

The memory planner (:func:`zerotrain.planner.plan`) predicts each rank's bytes; the local ranks
share this host, so the run needs ``nproc`` times that. It is compared with the memory available
now (``MemAvailable``, or the cgroup's limit if lower):

* model states + transient buffers + the runtime (what the run holds whatever the data) above
  the available memory: refused, with the numbers and what to change;
* the same plus the planner's activation estimate above it, or within 80% of it: a warning (the
  activation model is an estimate; CPU attention kernels may need less).

Model dimensions far from their preset's (more than 8x) get a warning: a typo such as
``model.block_size=100000`` makes every step take minutes. ``run.preflight=false`` skips all of it.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .options import Options, UsageError

log = logging.getLogger("zerotrain")
GB = 1e9
ABSURD = 8


def available_memory() -> tuple[int, str]:
    """(bytes available to new processes now, where that number comes from)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "available host memory"))
    except (OSError, ValueError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap, used = Path(limit).read_text().strip(), int(Path(usage).read_text())
            if cap != "max" and int(cap) < 1 << 60:
                found.append((int(cap) - used, "the memory cgroup's limit"))
        except (OSError, ValueError):
            continue
    return min(found) if found else (0, "")


def _plan(opts: Options, cfg):
    from zerotrain.planner import ModelSpec, plan
    p = opts.parallel
    dp = p.nproc // p.tp
    return plan(ModelSpec.from_config(cfg, name=opts.model.preset), stage=p.stage, dp=dp, tp=p.tp,
                param_dtype=p.precision, reduce_dtype="fp32", micro_batch=max(1, opts.train.batch_size // dp),
                seq_len=cfg.block_size)


def check_memory(opts: Options, cfg, *, local_ranks: int) -> None:
    plan_ = _plan(opts, cfg)
    avail, source = available_memory()
    if not avail:
        return
    n = local_ranks
    certain = plan_.model_states_bytes + plan_.comm_buffers_bytes + plan_.runtime_overhead_bytes
    likely = plan_.peak_rss_bytes
    what = (f"{opts.model.preset} ({plan_.numel:,} parameters), ZeRO stage {opts.parallel.stage}, "
            f"{opts.parallel.precision}, {n} local rank(s)")
    if certain * n > avail:
        raise UsageError(
            f"{what} needs about {certain / GB:.1f} GB per rank for model states and buffers, "
            f"{certain * n / GB:.1f} GB in all, but {avail / GB:.1f} GB are free ({source}); use a smaller "
            f"--preset, --precision bf16, or see what fits with `zerotrain estimate --preset {opts.model.preset} "
            f"--memory-gb {avail / n / GB:.1f}` (run.preflight=false starts it anyway)")
    if likely * n > 0.8 * avail:
        log.warning("%s may not fit: with the planner's activation estimate (micro-batch %d x %d tokens) it "
                    "needs about %.1f GB per rank, %.1f GB in all, and %.1f GB are free (%s); lower "
                    "--batch-size or model.block_size if it runs out of memory", what, plan_.micro_batch,
                    cfg.block_size, likely / GB, likely * n / GB, avail / GB, source)


def check_shape(opts: Options, cfg) -> None:
    from zerotrain.model import get_config
    base = get_config(opts.model.preset, vocab_size=opts.data.vocab_size)
    for key, value in opts.model_overrides().items():
        preset = getattr(base, key, None)
        if isinstance(value, int) and isinstance(preset, int) and preset and not (
                preset / ABSURD <= value <= preset * ABSURD):
            log.warning("model.%s=%d is %.3gx the %s preset's %d: is that intended? Steps may be very slow "
                        "or run out of memory (run.preflight=false hides this check)", key, value,
                        value / preset, opts.model.preset, preset)


def preflight(opts: Options, *, local_ranks: int | None = None) -> None:
    """Refuse (UsageError) a run that cannot fit; warn about one that may not, or looks mistyped.
    ``local_ranks``: the ranks sharing this host (default ``parallel.nproc``)."""
    if not opts.run.preflight:
        return
    from zerotrain.model import get_config
    cfg = get_config(opts.model.preset, vocab_size=opts.data.vocab_size, **opts.model_overrides())
    check_shape(opts, cfg)
    check_memory(opts, cfg, local_ranks=local_ranks or opts.parallel.nproc)
