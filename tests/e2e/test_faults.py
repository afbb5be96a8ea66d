"""Fault injection: what a job does when one of its ranks fails (``zerotrain.distributed.watchdog``).

A PyTorch-style script (``fault_job.py``: ``init_distributed`` + ``shard_model`` + ``ShardedOptimizer``):
* rank k raises at step s (ZeRO stages 0 and 3, world 2 and 3): every rank exits within 30 s of
  the raise, each survivor with ``PeerFailure`` naming rank k and its error; under torchrun the
  root cause is rank k;
* rank 1 runs one step more than rank 0: rank 1's pending collective is named (op, unit label,
  step) in debug mode and without it, and the job ends well within the collective timeout.
``zerotrain train`` (two spawned ranks, faults from ``ZEROTRAIN_FAULT``):
* the launcher is killed in the middle of a step: its ranks are gone within 10 s;
* a rank dies without a word: the launcher names it within 30 s.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
JOB = str(HERE / "fault_job.py")
LIMIT = 30.0


def _env(**extra) -> dict:
    path = os.pathsep.join([str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, PYTHONUNBUFFERED="1", **extra)


def _kill_ranks(out: Path) -> None:
    for pid_file in out.glob("pid.*"):                 # torchrun's ranks live in their own groups
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _direct(world: int, out: Path, *args: str, timeout: float = 120) -> list[tuple[int, str, float]]:
    """Start the ranks ourselves (file:// store, no agent); (exit status, stderr, exit time) per rank."""
    procs, logs = [], []
    for rank in range(world):
        log = open(out / f"stderr.{rank}", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, JOB, "--out", str(out), "--store", str(out / "store"),
                                       *args], env=_env(RANK=str(rank), WORLD_SIZE=str(world)),
                                      stdout=subprocess.DEVNULL, stderr=log))
    ends = [None] * world
    deadline = time.monotonic() + timeout
    try:
        while None in ends and time.monotonic() < deadline:
            for r, p in enumerate(procs):
                if ends[r] is None and p.poll() is not None:
                    ends[r] = time.time()
            time.sleep(0.05)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert None not in ends, f"ranks {[r for r, e in enumerate(ends) if e is None]} still ran after {timeout}s"
    results = []
    for p, log, end in zip(procs, logs, ends):
        log.seek(0)
        results.append((p.returncode, log.read(), end))
        log.close()
    return results


def _torchrun(world: int, out: Path, *args: str, timeout: float = 120, **env) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           "--monitor-interval", "0.2", JOB, "--out", str(out), *args]
    proc = subprocess.Popen(cmd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
        return proc.returncode, log, time.time()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_ranks(out)


@pytest.mark.parametrize("stage,world,rank,step", [(0, 2, 1, 2), (3, 2, 0, 1), (0, 3, 2, 1), (3, 3, 1, 2)])
def test_a_rank_that_raises_ends_every_rank_naming_it(tmp_path, stage, world, rank, step):
    results = _direct(world, tmp_path, "--stage", str(stage), "--raise-rank", str(rank), "--raise-step", str(step))
    raised = float((tmp_path / "raised").read_text())
    error = f"ValueError: boom in the forward of step {step}"
    for r, (code, err, end) in enumerate(results):
        assert code != 0 and end - raised < LIMIT, (r, code, end - raised, err[-2000:])
        if r == rank:
            assert error in err
        else:                          # the survivor names the rank that failed and its error
            assert f"PeerFailure: rank {rank} failed: {error}" in err, err[-3000:]
            assert "Timed out" not in err


def test_torchrun_blames_the_rank_that_raised(tmp_path):
    code, log, end = _torchrun(2, tmp_path, "--stage", "3", "--raise-rank", "1", "--raise-step", "2")
    raised = float((tmp_path / "raised").read_text())
    assert code != 0 and end - raised < LIMIT, log[-3000:]
    root = log[log.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root and "boom in the forward of step 2" in root, root


@pytest.mark.parametrize("debug", ["1", "0"])
def test_a_rank_running_an_extra_step_is_named(tmp_path, debug):
    start = time.time()
    code, log, end = _torchrun(2, tmp_path, "--stage", "3", "--steps", "3", "--extra-rank", "1",
                               ZEROTRAIN_DEBUG_COLLECTIVES=debug)
    assert code != 0 and end - float((tmp_path / "done.0").read_text()) < LIMIT, log[-3000:]
    assert end - start < 120
    root = log[log.index("Root Cause"):]
    # rank 1's first collective of its extra (4th) step: stage 3 gathers the root unit first
    assert "rank      : 1 (local_rank: 1)" in root, root
    assert "waits in collective" in root and "(all_gather 'root' float32" in root and "at step 4" in root, root
    assert "rank 0 already finished, after" in root and "3 optimizer steps" in root, root
