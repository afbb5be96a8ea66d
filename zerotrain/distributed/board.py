"""The job's notice board: a few keys in the process group's store through which the ranks tell
each other that one failed (the first report wins), that one finished, and that they are alive.

Keys, under ``zerotrain/<torchrun restart>/<init count>/`` so that a restarted or re-initialised
job never reads an earlier one's notices:

* ``failure`` — JSON ``{"rank", "reason", "time"}`` of the first failure (compare-and-set);
* ``beat/<rank>`` — a counter each rank's watchdog increments every interval;
* ``exit/<rank>`` — JSON ``{"calls", "groups", "step"}`` when a rank finishes normally (its
  collectives in all and per group), and ``exited``, the number of ranks that did.

Only non-blocking store operations are used (check, add, compare-and-set, set; get after check),
so a watchdog never waits on the store.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Failure:
    rank: int
    reason: str           # "ValueError: boom", "stopped responding ...", "diverged: ..."
    time: float           # wall clock of the report, seconds since the epoch

    def describe(self) -> str:
        return f"rank {self.rank} failed: {self.reason}"


class Board:
    def __init__(self, store, *, rank: int, world: int, generation: int):
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"zerotrain/{attempt}/{generation}/", store)
        self.rank, self.world = rank, world

    # ------------------------------------------------------------------ failures
    def post_failure(self, reason: str, *, rank: int | None = None) -> Failure:
        """Report a failure (of this rank unless ``rank``); returns the first one ever reported."""
        mine = {"rank": self.rank if rank is None else rank, "reason": reason, "time": time.time()}
        first = self.store.compare_set("failure", "", json.dumps(mine))
        return Failure(**json.loads(first))

    def failure(self) -> Failure | None:
        if not self.store.check(["failure"]):
            return None
        return Failure(**json.loads(self.store.get("failure")))

    # ------------------------------------------------------------------ liveness
    def beat(self) -> None:
        self.store.add(f"beat/{self.rank}", 1)

    def beats(self, rank: int) -> int:
        return self.store.add(f"beat/{rank}", 0)

    # ------------------------------------------------------------------ normal exits
    def note_exit(self, *, calls: int, groups: dict[str, int], step: int | None) -> None:
        self.store.set(f"exit/{self.rank}", json.dumps({"calls": calls, "groups": groups, "step": step}))
        self.store.add("exited", 1)

    def exited(self) -> int:
        return self.store.add("exited", 0)

    def exit_note(self, rank: int) -> dict | None:
        if not self.store.check([f"exit/{rank}"]):
            return None
        return json.loads(self.store.get(f"exit/{rank}"))
