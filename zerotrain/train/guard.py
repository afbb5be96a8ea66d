"""The trainer's guard against non-finite numbers.

``ShardedOptimizer.step()`` already skips a step on every rank when the global gradient norm is
inf or nan (in every dtype; the loss is agreed over ranks too), so one rank's NaN never reaches
the weights. The guard decides what the run does about it, identically on every rank (it only
reads agreed values):

* every step records ``skipped`` and ``skipped_total`` in the metrics; a bad step (non-finite
  loss, or a skipped step) is logged as a warning;
* a checkpoint is written only when the loss of the step before it is finite — weights that give
  a non-finite loss are not worth resuming from; a save that falls on a bad step is made after the
  next good one — so the newest checkpoint, the one ``keep_last`` retention never deletes, is
  always a finite one (``checkpoint.save`` itself refuses tensors holding inf or nan);
* ``train.max_bad_steps`` bad steps in a row (default 20; 0 never) stop the run with
  :class:`TrainingDiverged`, naming the newest finite checkpoint and how to resume from it; a run
  whose last step is bad ends the same way instead of evaluating a broken model.

``ZEROTRAIN_FAULT`` injects faults for tests: ``kind:rank:step[:arg]`` items separated by commas,
``kind`` one of ``nan`` (that rank's loss becomes nan), ``raise`` (ValueError), ``exit`` (the
process ends with status ``arg``), ``sleep`` (``arg`` seconds inside the step).
"""
from __future__ import annotations

import logging
import math
import os
import time

import torch

log = logging.getLogger("zerotrain")
FAULT_ENV = "ZEROTRAIN_FAULT"


class TrainingDiverged(RuntimeError):
    """Losses or gradients stayed non-finite; the run stopped without saving the broken state."""


class NonFiniteGuard:
    def __init__(self, *, max_bad_steps: int, ckpt_root, lr: float, resume_hint: str, speak: bool = True):
        """``speak``: log the warnings (rank 0; every rank decides alike)."""
        self.max_bad_steps, self.ckpt_root, self.lr, self.resume_hint = max_bad_steps, ckpt_root, lr, resume_hint
        self.speak = speak
        self.in_a_row = 0
        self.skipped_total = 0
        self.last_loss: float | None = None      # None: no step yet
        self.owed = False                          # a save fell on a bad step

    def update(self, step: int, loss: float, info) -> dict:
        """Account for one finished step; returns the metrics to record with it."""
        self.last_loss = loss
        bad = info.skipped or not math.isfinite(loss)
        self.skipped_total += int(bool(info.skipped))
        self.in_a_row = self.in_a_row + 1 if bad else 0
        if bad and self.speak:
            overflow = info.loss_scale is not None and math.isfinite(loss)     # fp16's loss scaling at work
            (log.info if overflow else log.warning)(
                "step %d: loss %s, gradient norm %s: %s (%d bad step(s) in a row)", step, loss, info.grad_norm,
                "the update was skipped on every rank" if info.skipped else "the weights give a non-finite loss",
                self.in_a_row)
        if self.max_bad_steps and self.in_a_row >= self.max_bad_steps:
            raise self.diverged(step, f"{self.in_a_row} steps in a row had a non-finite loss or gradient "
                                      f"norm (step {step}: loss {loss}, gradient norm {info.grad_norm})")
        return {"skipped": bool(info.skipped), "skipped_total": self.skipped_total}

    @property
    def may_save(self) -> bool:
        return self.last_loss is None or math.isfinite(self.last_loss)

    def wants_save(self, due: bool, step: int) -> bool:
        """Whether to save after ``step``: when ``due`` (or owed since a bad step) and the loss is finite."""
        if not (due or self.owed):
            return False
        self.owed = not self.may_save
        if self.owed:
            self.skip_save(step)
        return not self.owed

    def skip_save(self, step: int) -> None:
        if self.speak:
            log.warning("step %d: not saving a checkpoint: the loss is %s, so these weights are not worth "
                        "resuming from (the save is made after the next finite step); %s stays the newest "
                        "checkpoint", step, self.last_loss, self._newest())

    def check_end(self, step: int) -> None:
        if not self.may_save:
            raise self.diverged(step, f"the run ended with a non-finite loss ({self.last_loss}) at step {step}")

    def diverged(self, step: int, what: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"training diverged: {what}; no checkpoint was written with these weights. The newest "
            f"checkpoint is {self._newest()}: resume from it with a lower learning rate (optim.lr is "
            f"{self.lr:g}), e.g. `{self.resume_hint} optim.lr={self.lr / 10:g}`; train.max_bad_steps "
            "sets how many bad steps in a row stop a run")

    def _newest(self) -> str:
        from zerotrain.checkpoint import latest_tag
        tag = latest_tag(self.ckpt_root) if self.ckpt_root.is_dir() else None
        return f"{self.ckpt_root / tag}" if tag else "none (no checkpoint was saved)"


def inject(loss: torch.Tensor, *, rank: int, step: int) -> torch.Tensor:
    """Apply the ``ZEROTRAIN_FAULT`` items for (rank, step) to this step (tests only)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return loss
    for item in spec.split(","):
        kind, r, s, *arg = item.split(":")
        if int(r) != rank or int(s) != step:
            continue
        log.warning("fault injection %s=%s on rank %d at step %d", FAULT_ENV, item, rank, step)
        if kind == "nan":
            loss = loss * float("nan")
        elif kind == "raise":
            raise ValueError(f"injected fault at step {step}")
        elif kind == "exit":
            os._exit(int(arg[0]) if arg else 1)
        elif kind == "sleep":
            time.sleep(float(arg[0]))
    return loss
