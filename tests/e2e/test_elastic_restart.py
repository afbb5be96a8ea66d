"""Fault tolerance under torchrun: SIGKILL one rank mid-training; torchrun (--max-restarts) restarts
the group, which resumes from the latest checkpoint and finishes with the losses of a run never
interrupted (fp32, ZeRO-3, dropout on: the RNG state is restored too)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import elastic_train
from harness import spawn

STEPS, SAVE_EVERY, PAUSE_AT = 20, 5, 13
HERE = Path(__file__).resolve().parent


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"torchrun exited ({proc.returncode}) before {path.name} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not appear within {timeout:.0f}s")
        time.sleep(0.05)


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _losses(path: Path) -> dict[int, float]:
    return {int(s): float(v) for s, v in (line.split() for line in path.read_text().splitlines())}


def test_kill_one_rank_torchrun_restarts_and_resumes(tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "2", "--monitor-interval", "0.2", str(HERE / "elastic_train.py"),
           "--ckpt", str(ckpt), "--out", str(out), "--steps", str(STEPS), "--save-every", str(SAVE_EVERY),
           "--pause-at", str(PAUSE_AT)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        _wait_for(out / "paused.1", proc, timeout=120)
        _kill_pid(int((out / "pid.0.1").read_text()))          # SIGKILL rank 1 of the first attempt
        try:
            log, _ = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            pytest.fail("torchrun did not finish within 150s after the kill")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid_file in out.glob("pid.*"):                     # ranks live in their own process groups
            _kill_pid(int(pid_file.read_text()))
        proc.wait(timeout=10)
    assert proc.returncode == 0, log[-4000:]
    final = json.loads((out / "final.json").read_text())
    assert final["attempt"] == 1, "the group was not restarted"
    first, resumed = _losses(out / "losses.0.txt"), _losses(out / "losses.1.txt")
    assert sorted(first) == list(range(PAUSE_AT))
    resume_step = (PAUSE_AT // SAVE_EVERY) * SAVE_EVERY
    assert sorted(resumed) == list(range(resume_step, STEPS)), "did not resume from the latest checkpoint"
    reference = dict(spawn(elastic_train.reference, 2, STEPS)[0])
    assert first == {s: reference[s] for s in first}
    assert resumed == {s: reference[s] for s in resumed}            # bitwise, through the final step
    assert dict((s, v) for s, v in final["losses"]) == resumed
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step00000015", "step00000020"]
