"""Training metrics: one JSON object per line in ``metrics.jsonl`` and TensorBoard scalars.

Records carry ``split`` ("train" or "eval") and ``step`` (optimizer steps done). On resume from
step ``s`` the records of steps ``> s`` (written after that checkpoint by the interrupted run)
and the final evaluation of step ``s`` are dropped, so the file always describes one consistent
history. Only rank 0 writes.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue                      # a line cut short by a crash
    return records


class MetricsLog:
    def __init__(self, run_dir: str | Path, *, enabled: bool, resume_step: int = 0,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path)
                if r.get("step", 0) < resume_step or (r.get("step") == resume_step and not r.get("final"))]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step or None)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            split, step = record.get("split", "train"), record["step"]
            for key, value in record.items():
                if key not in ("split", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class Throughput:
    """Tokens per second since the last call to ``rate``, and total elapsed seconds."""

    def __init__(self, elapsed_before: float = 0.0):
        self.start = self.mark = time.perf_counter()
        self.before = elapsed_before
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.mark, 1e-9)
        self.mark, self.tokens = now, 0
        return rate

    @property
    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Rank 0's progress: a tqdm bar on a terminal, else one log line every ~5% of the run."""

    def __init__(self, *, total: int, initial: int, enabled: bool, desc: str, log_interval: int,
                 elapsed_before: float = 0.0):
        import sys

        from tqdm import tqdm
        self.total, self.initial, self.enabled = total, initial, enabled
        self.log_interval = log_interval
        self.every = max(log_interval, total // 20)
        self.meter = Throughput(elapsed_before)
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=desc,
                        mininterval=1.0) if enabled and sys.stderr.isatty() else None

    def update(self, step: int, loss: float, tokens: int) -> None:
        self.meter.add(tokens)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if step % self.log_interval == 0 or step == self.total:
                self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.meter.rate():.0f}", refresh=False)
        elif step % self.every == 0 or step == self.total:
            import logging
            session = self.meter.elapsed - self.meter.before
            eta = session / max(step - self.initial, 1) * (self.total - step)
            logging.getLogger("zerotrain").info(
                "step %d/%d  loss %.3f  %.0f tokens/s  elapsed %s  eta %s", step, self.total, loss,
                self.meter.rate(), _clock(self.meter.elapsed), _clock(eta))

    @property
    def elapsed(self) -> float:
        return self.meter.elapsed

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
