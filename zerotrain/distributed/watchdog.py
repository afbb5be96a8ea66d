"""Bounded failure: when one rank fails, every rank leaves soon, saying which rank failed and why.

``init_distributed`` starts one watchdog thread per rank. It talks to the other ranks through the
process group's store (:mod:`~zerotrain.distributed.board`) — never through a collective, which
is what hangs — every ``interval`` (1 s). What happens, with the default settings:

* **A rank raises.** Before it exits it posts its error (:func:`report_failure`: called by the
  exception hook ``init_distributed`` installs, by ``zerotrain train``'s ranks, and available to
  your own code); its exit handler does not wait for anyone. The peers' collectives fail at once
  (the transport sees the connection close) and raise :class:`PeerFailure` — "rank k failed:
  <its error>" — in place of "connection closed"; a peer busy elsewhere reads the board within
  ``interval`` and leaves after ``grace`` (3 s) if it has not left by itself. Seconds in all.
* **A rank dies without a word** (SIGKILL, out of memory): each rank watches the heartbeat of the
  next one; after ``dead_after`` (15 s; the environment variable ``ZEROTRAIN_DEAD_AFTER`` changes
  it) without one it posts "rank k stopped responding", and the rest follows as above: under 30 s
  in all.
* **A rank finishes while a peer still waits in a collective** (the ranks ran different numbers
  of steps or collectives): a rank that finishes normally posts an exit note with the number of
  collectives it issued; the waiting rank's watchdog sees it and reports the divergence naming
  its pending collective (op, label, step). The finished rank waits for the others at most
  ``exit_wait`` (30 s) and never once a failure is posted.
* **The launcher exits** (``zerotrain train`` killed, torchrun's agent gone): the rank's parent
  process changes; the watchdog calls the stop callbacks (the trainer saves if it can) and leaves
  after ``grace`` if the rank is still running.
* **Anything else** — ranks alive but waiting in different collectives — ends at the collective
  timeout: 300 s by default, ``init_distributed(timeout_s=...)`` or the environment variable
  ``ZEROTRAIN_COLLECTIVE_TIMEOUT`` (seconds) change it, and debug mode
  (``ZEROTRAIN_DEBUG_COLLECTIVES=1``) turns such a mismatch into an immediate, named error.

Under torchrun a failing rank also writes torchrun's error file, and a rank that leaves because of
another's failure dates its own report after the first one, so torchrun's "root cause" is the
rank that failed first.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from . import calls
from .board import Board, Failure
from .errors import CollectiveError, PeerFailure

log = logging.getLogger("zerotrain")
EXIT_FAILED = 1


DEAD_AFTER_ENV = "ZEROTRAIN_DEAD_AFTER"


@dataclass(frozen=True)
class Settings:
    interval: float = 1.0       # seconds between two looks at the board
    dead_after: float = 15.0    # a neighbour silent this long is reported dead
    grace: float = 3.0          # time a rank gets to leave by itself before it is ended
    exit_wait: float = 30.0     # the longest a finished rank waits for the others

    @classmethod
    def from_env(cls) -> "Settings":
        raw = os.environ.get(DEAD_AFTER_ENV)
        try:
            dead_after = float(raw) if raw else cls.dead_after
        except ValueError:
            raise ValueError(f"{DEAD_AFTER_ENV}={raw!r} is not a number of seconds; set it to e.g. 30") from None
        if dead_after < 2 * cls.interval:
            raise ValueError(f"{DEAD_AFTER_ENV}={raw!r}: must be at least {2 * cls.interval:g} seconds")
        return cls(dead_after=dead_after)


class Watchdog:
    def __init__(self, board: Board, settings: Settings, *, parent_pid: int | None):
        self.board, self.settings, self.parent_pid = board, settings, parent_pid
        self.failing = False                 # this rank reported its own failure
        self.on_parent_exit: list = []
        self._stop = threading.Event()
        self._leaving_since: float | None = None
        self._store_down_since: float | None = None
        self._neighbour = (board.rank + 1) % board.world
        self._last_beats, self._last_change = -1, time.monotonic()
        self._thread = threading.Thread(target=self._run, name="zerotrain-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.settings.interval)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval):
            try:
                self._tick(time.monotonic())
                self._store_down_since = None
            except Exception as exc:  # noqa: BLE001 - the store's host may be gone
                self._store_lost(exc)

    def _tick(self, now: float) -> None:
        self.board.beat()
        if self._leaving_since is not None:
            if now - self._leaving_since > self.settings.grace:
                _hard_exit(EXIT_FAILED)
            return
        first = self.board.failure()
        if first is not None and first.rank != self.board.rank and not self.failing:
            return self._peer_failed(first, now)
        self._watch_neighbour(now)
        self._watch_parent(now)
        self._watch_divergence(now)

    def _peer_failed(self, first: Failure, now: float) -> None:
        log.error("%s; leaving", first.describe())
        _write_error_file(f"PeerFailure: {first.describe()}", "", first.time + 1)
        self._leaving_since = now

    def _watch_neighbour(self, now: float) -> None:
        beats = self.board.beats(self._neighbour)
        if beats != self._last_beats:
            self._last_beats, self._last_change = beats, now
        elif now - self._last_change > self.settings.dead_after and self.board.exit_note(self._neighbour) is None:
            self.board.post_failure(f"stopped responding: no sign of life for {self.settings.dead_after:.0f} s "
                                    "(killed, out of memory, or stuck)", rank=self._neighbour)

    def _watch_parent(self, now: float) -> None:
        if self.parent_pid is None or os.getppid() == self.parent_pid:
            return
        log.error("the launcher (pid %d) has exited: stopping this rank", self.parent_pid)
        self.parent_pid = None
        for callback in self.on_parent_exit:
            callback()
        self._leaving_since = now

    def _watch_divergence(self, now: float) -> None:
        pending = calls.inflight()
        if pending is None or now - pending[1] < 2 * self.settings.interval or not self.board.exited():
            return
        message = divergence(self.board, pending[0])
        if message:
            self.failing = True
            first = self.board.post_failure(message)
            log.error("%s", first.describe())
            _write_error_file(f"DistributedError: {first.describe()}", "", first.time)
            _hard_exit(EXIT_FAILED)

    def _store_lost(self, exc: Exception) -> None:
        now = time.monotonic()
        self._store_down_since = self._store_down_since or now
        if now - self._store_down_since > self.settings.dead_after and not self._stop.is_set():
            log.error("lost contact with the job's store for %.0f s (%s): the rank or launcher hosting "
                      "it is gone; leaving", self.settings.dead_after, exc)
            _hard_exit(EXIT_FAILED)

    # ------------------------------------------------------------------ queries
    def wait_for_cause(self, call: calls.Call | None, timeout: float) -> Exception | None:
        """Poll the board for why ``call`` failed: a peer's failure or a peer that finished."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                first = self.board.failure()
                if first is not None and first.rank != self.board.rank:
                    return PeerFailure(first.rank, first.reason, call.describe() if call else "")
                message = divergence(self.board, call) if call is not None and self.board.exited() else None
                if message:
                    return CollectiveError(f"rank {self.board.rank} {message}")
            except Exception:  # noqa: BLE001 - store gone: no cause to learn
                return None
            if time.monotonic() > deadline:
                return None
            time.sleep(self.settings.interval / 4)


def divergence(board: Board, call: calls.Call) -> str | None:
    """Why this rank cannot finish ``call``, if a rank of its group already finished (None if none did)."""
    for peer in calls.group_ranks(call.group):
        note = board.exit_note(peer) if peer != board.rank else None
        # it diverged only if the peer never issued this collective (else this rank is just late)
        if note is not None and note["groups"].get(calls.group_key(call.group), 0) < call.seq:
            steps = note.get("step")
            step = f" and {steps - 1} optimizer steps" if steps is not None else ""
            return (f"waits in {call.describe()} but rank {peer} already finished, after "
                    f"{note['calls']} collectives{step}: the ranks ran different numbers of steps or "
                    "collectives")
    return None


# ---------------------------------------------------------------------- process-wide
_ACTIVE: Watchdog | None = None
_GENERATION = 0


def start(store, *, rank: int, world: int, parent_pid: int | None, settings: Settings | None = None) -> Watchdog:
    global _ACTIVE, _GENERATION
    stop()
    _GENERATION += 1
    try:
        store = store.clone()               # a connection of its own: never queued behind the main thread
    except Exception:  # noqa: BLE001 - stores without clone() are shared
        pass
    board = Board(store, rank=rank, world=world, generation=_GENERATION)
    _ACTIVE = Watchdog(board, settings or Settings.from_env(), parent_pid=parent_pid).start()
    _install_excepthook()
    return _ACTIVE


def stop() -> None:
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.stop()
        _ACTIVE = None


def active() -> Watchdog | None:
    return _ACTIVE


def report_failure(exc: BaseException) -> Failure | None:
    """Tell the other ranks that this rank fails with ``exc``; returns the first failure of the job
    (this one unless another rank reported first). A :class:`PeerFailure` is not a new failure."""
    wd = _ACTIVE
    if wd is None:
        return None
    wd.failing = True
    try:
        if isinstance(exc, PeerFailure):
            first = wd.board.failure() or Failure(exc.rank, exc.reason, time.time())
        else:
            first = wd.board.post_failure(f"{type(exc).__name__}: {exc}")
    except Exception:  # noqa: BLE001 - the store is gone; nobody is left to tell
        return None
    own = first.rank == wd.board.rank
    tb = "".join(traceback.format_exception(exc))
    _write_error_file(f"{type(exc).__name__}: {exc}", tb, first.time if own else first.time + 1)
    return first


def explain(exc: Exception, call: calls.Call | None) -> Exception:
    """The error to raise in place of a collective's transport error ``exc``."""
    where = call.describe() if call is not None else "a collective"
    wd = _ACTIVE
    if wd is not None:
        cause = wd.wait_for_cause(call, wd.settings.dead_after + 2 * wd.settings.interval)
        if cause is not None:
            return cause
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CollectiveError(f"{where} failed and no rank reported why: {first}")


def finish() -> None:
    """This rank is done: say so, and wait until every rank is done, one failed, or ``exit_wait``."""
    wd = _ACTIVE
    if wd is None or wd.failing:
        return
    try:
        wd.board.note_exit(calls=calls.issued(), groups=calls.issued_by_group(), step=calls.current_step())
        deadline = time.monotonic() + wd.settings.exit_wait
        while wd.board.exited() < wd.board.world:
            first = wd.board.failure()
            if first is not None:
                log.warning("%s", first.describe())
                return
            if time.monotonic() > deadline:
                log.warning("not every rank finished within %.0f s of this one; leaving anyway",
                            wd.settings.exit_wait)
                return
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store is gone: the others have left
        return


def _write_error_file(message: str, tb: str, timestamp: float) -> None:
    """torchrun's per-rank error file (its "root cause" is the one with the smallest timestamp)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {"py_callstack": tb or message,
                                                          "timestamp": str(int(timestamp))}}}
    try:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _hard_exit(code: int) -> None:
    for handler in logging.getLogger("zerotrain").handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_HOOKED = False


def _install_excepthook() -> None:
    """An uncaught exception is reported to the other ranks before the traceback is printed."""
    global _HOOKED
    if _HOOKED:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        report_failure(value)
        previous(kind, value, tb)
    sys.excepthook = hook
    _HOOKED = True
