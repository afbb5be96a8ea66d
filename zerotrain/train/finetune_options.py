"""Options of ``zerotrain finetune``: which pretrained run, which tasks and how they are mixed.

A fine-tuning run lives in its own directory (default ``runs/<base run>-ft``) and holds
``finetune.json`` (these options) beside ``options.json`` (the effective training options: the
base run's model and data, this run's parallel layout, optimizer and steps), so ``zerotrain eval``,
``generate``, ``ask`` and ``summarize`` read it like any run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from zerotrain.data.tasks import TASKS, check_tasks

from .options import NonNegInt, OptimOptions, Options, ParallelOptions, PosInt, Real, RunOptions, UsageError, _Section


class TaskOptions(_Section):
    names: list[str] = Field(default_factory=lambda: list(TASKS))
    weights: dict[str, Annotated[Real, Field(gt=0)]] = Field(default_factory=dict)   # missing: 1.0

    @model_validator(mode="after")
    def _known(self):
        try:
            check_tasks(self.names)
        except ValueError as e:
            raise ValueError(str(e)) from None
        extra = sorted(set(self.weights) - set(self.names))
        if extra:
            raise ValueError(f"--weights names {', '.join(extra)}, which --tasks {','.join(self.names)} "
                             "does not train; weigh only the tasks you train")
        return self

    def weight_list(self) -> list[float]:
        raw = [float(self.weights.get(n, 1.0)) for n in self.names]
        return [w / sum(raw) for w in raw]


class FinetuneTrainOptions(_Section):
    steps: PosInt = 3000
    batch_size: PosInt = 32            # global: examples per optimizer step
    seed: NonNegInt = 1337
    log_interval: PosInt = 10
    eval_interval: NonNegInt = 500     # held-out answer loss every this many steps (0: only at the end)
    eval_examples: PosInt = 64         # held-out examples per task for that loss
    ckpt_interval: NonNegInt = 500
    keep_last: PosInt | None = 2
    report_examples: NonNegInt = 200   # held-out examples per task in the final generated report
    copy_steps: NonNegInt = 0          # the first steps: copying exercises only (part of ``steps``)
    copy_share: Annotated[Real, Field(ge=0, lt=1)] = 0.25   # then (from the first step by default) this share of the slots
    copy_head: bool = True             # add a copy (pointer) head to the pretrained model

    @model_validator(mode="after")
    def _copy_fits(self):
        if self.copy_steps >= self.steps:
            raise ValueError(f"train.copy_steps={self.copy_steps} leaves none of the {self.steps} steps to the tasks; "
                             f"use --copy-steps below --steps (e.g. --copy-steps {self.steps // 3})")
        return self


def _ft_optim() -> OptimOptions:
    return OptimOptions(lr=2e-3, min_lr=2e-4, warmup=20, weight_decay=0.0)


class FinetuneOptions(_Section):
    base: str                          # the pretrained run's directory
    tasks: TaskOptions = Field(default_factory=TaskOptions)
    parallel: ParallelOptions = Field(default_factory=ParallelOptions)
    optim: OptimOptions = Field(default_factory=_ft_optim)
    train: FinetuneTrainOptions = Field(default_factory=FinetuneTrainOptions)
    run: RunOptions = Field(default_factory=RunOptions)

    @property
    def run_name(self) -> str:
        return self.run.name or f"{Path(self.base).name}-ft"

    @property
    def run_dir(self) -> Path:
        return Path(self.run.runs_dir) / self.run_name

    def effective(self, base: Options) -> Options:
        """The training options of this run: the base run's model and data, the rest from here."""
        t = self.train
        data = base.model_dump()
        data.update(parallel=self.parallel.model_dump(), optim=self.optim.model_dump(),
                    run={"name": self.run_name, "runs_dir": self.run.runs_dir})
        data["model"]["copy_head"] = t.copy_head or bool(data["model"].get("copy_head"))
        data["train"].update(steps=t.steps, batch_size=t.batch_size, seed=t.seed, log_interval=t.log_interval,
                             eval_interval=t.eval_interval, ckpt_interval=t.ckpt_interval, keep_last=t.keep_last)
        return Options.model_validate(data)


def read_finetune(run_dir: Path) -> FinetuneOptions | None:
    path = Path(run_dir) / "finetune.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    data.get("train", {}).setdefault("copy_head", False)     # runs from before the copy head had none
    return FinetuneOptions.model_validate(data)


__all__ = ["FinetuneOptions", "FinetuneTrainOptions", "TaskOptions", "UsageError", "read_finetune"]
