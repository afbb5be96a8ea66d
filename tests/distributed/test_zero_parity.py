"""Parity: every stage × world size trains the same losses, parameters and optimizer state shards
as a single-process torch.optim.AdamW on the same global batch."""
from __future__ import annotations

import functools

import pytest
import torch

from harness import spawn
from zero_cases import Case, run_reference, worker

STAGES = (0, 1, 2, 3)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def cases() -> list[Case]:
    out = [Case(kind, s, dtype) for kind in ("gpt", "uneven") for s in STAGES
           for dtype in (torch.float64, torch.float32)]
    out += [Case("gpt", s, accum=4) for s in STAGES]
    out += [Case("uneven", s, accum=4, no_sync=True) for s in STAGES]
    out += [Case("gpt", s, clip=0.05) for s in STAGES]
    out += [Case("gpt", s, groups=True, clip=0.5, accum=2) for s in STAGES]
    out += [Case("gpt", s, recompute=True, accum=2) for s in (0, 3)]
    out += [Case("gpt", 3, prefetch=False)]
    return out


@functools.lru_cache(maxsize=None)
def reference(case: Case):
    # The reference for accumulation runs the whole batch at once: k micro-batches must equal it.
    return run_reference(Case(case.kind, case.stage, case.dtype, clip=case.clip, groups=case.groups))


def check_case(case: Case, per_rank: list[dict]):
    ref = reference(case)
    tol = TOL[case.dtype]
    got = per_rank[0]
    assert got["losses"] == pytest.approx(ref["losses"], abs=tol, rel=tol), case.name
    assert got["norms"] == pytest.approx(ref["norms"], abs=tol, rel=tol), case.name
    for rank, res in enumerate(per_rank):
        for k, v in ref["params"].items():
            torch.testing.assert_close(res["params"][k], v, atol=tol, rtol=tol,
                                       msg=lambda m: f"{case.name} rank {rank} param {k}: {m}")
        for name, slices in res["state"].items():
            full = ref["state"][name]
            for lo, hi, st in slices:
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(st[key], full[key].reshape(-1)[lo:hi], atol=tol, rtol=tol,
                                               msg=lambda m: f"{case.name} rank {rank} {name}.{key}: {m}")
    # the shards of all ranks cover every element of every parameter exactly once
    for name, p in ref["params"].items():
        if name not in per_rank[0]["state"]:
            continue                       # a tied alias
        covered = sorted((lo, hi) for res in per_rank for lo, hi, _ in res["state"][name])
        if case.stage == 0:
            assert all(c == (0, p.numel()) for c in covered), (case.name, name, covered)
        else:
            flat = [x for c in covered for x in c]
            assert flat[0] == 0 and flat[-1] == p.numel() and all(
                covered[i][1] == covered[i + 1][0] for i in range(len(covered) - 1)), (case.name, name, covered)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_parity_all_stages(world):
    all_cases = cases()
    results = spawn(worker, world, all_cases, timeout=600)
    for case in all_cases:
        check_case(case, [r[case.name] for r in results])
