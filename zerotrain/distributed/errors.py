"""Errors of a distributed job: what a rank raises when the job, not its own code, went wrong."""
from __future__ import annotations


class DistributedError(RuntimeError):
    """The job failed across ranks (a peer failed, ranks diverged, a collective broke)."""


class PeerFailure(DistributedError):
    """Another rank failed first; this rank leaves. ``rank`` and ``reason`` name the first failure."""

    def __init__(self, rank: int, reason: str, where: str = ""):
        self.rank, self.reason, self.where = rank, reason, where
        super().__init__(f"rank {rank} failed: {reason}" + (f" (this rank was in {where})" if where else ""))

    def __reduce__(self):
        return (type(self), (self.rank, self.reason, self.where))


class CollectiveMismatch(DistributedError):
    """Debug mode: the ranks of a group issued different collectives at the same position."""


class CollectiveError(DistributedError):
    """A collective failed and no rank reported why (a peer's process vanished, a timeout)."""
