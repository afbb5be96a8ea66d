"""Bytes: model states per rank measured from live tensors, and bytes communicated per step,
equal DESIGN.md §2's formulas at world size 2 (fp32 Adam)."""
from __future__ import annotations

import pytest
import torch

import zerotrain
from harness import spawn
from models import TinyGPT

N = 2


def _train_one_step(mesh, stage):
    torch.manual_seed(0)
    model = TinyGPT(vocab=512, d=128, n_layer=4, ctx=16)      # ~0.9M parameters
    zerotrain.shard_model(model, stage=stage, mesh=mesh)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-3)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(mesh.rank))
    model(x, x).backward()                                    # warm-up step: allocates everything
    opt.step()
    opt.zero_grad()
    zerotrain.reset_comm_report()
    model(x, x).backward()
    opt.step()
    comm = zerotrain.comm_report()
    mem = zerotrain.memory_report(model, opt)
    units = model.zero_state.units
    return {"mem": mem, "comm": comm, "numel": sum(u.layout.numel for u in units),
            "padded": sum(u.layout.padded for u in units)}


def worker(mesh):
    return {stage: _train_one_step(mesh, stage) for stage in range(4)}


@pytest.fixture(scope="module")
def measured():
    return spawn(worker, N)


# fp32 Adam, bytes per element: (params, grads, optimizer states) at stage s, N ranks
FORMULA = {0: lambda psi: 16 * psi, 1: lambda psi: 8 * psi + 8 * psi / N,
           2: lambda psi: 4 * psi + 12 * psi / N, 3: lambda psi: 16 * psi / N}


@pytest.mark.parametrize("stage", range(4))
def test_model_state_bytes_match_formula(measured, stage):
    for rank_result in measured:
        r = rank_result[stage]
        psi, padded = r["numel"], r["padded"]
        got = r["mem"]["model_states"]
        # Optimizer states cover real elements only; parameter and gradient buffers are padded:
        # the measured figure lies between the formula at Ψ and at the padded Ψ.
        low, high = FORMULA[stage](psi), FORMULA[stage](padded)
        assert low <= got <= high, f"stage {stage}: {got} bytes, formula {low:.0f}..{high:.0f} (Ψ={psi})"
        assert r["mem"]["master"] == 0, "fp32 training must not keep a second master copy"


@pytest.mark.parametrize("stage", range(4))
def test_bytes_communicated_per_step(measured, stage):
    """Logical volume (ZeRO paper's count): 2Ψ at stages 0-2, 3Ψ at stage 3, fp32 elements of the
    padded flat buffers; plus the 4-byte gradient-norm all-reduce (counted as 8) at stages 1-3."""
    r = measured[0][stage]
    comm, psi_bytes = r["comm"], 4 * r["padded"]
    buffers = sum(v["bytes"] for k, v in comm.items() if k != "all_reduce") + \
        comm.get("all_reduce", {}).get("bytes", 0)
    norm_bytes = 0 if stage == 0 else 2 * 4
    expected = (3 if stage == 3 else 2) * psi_bytes + norm_bytes
    assert buffers == expected, f"stage {stage}: {comm}"
    wire = sum(v["wire_bytes"] for v in comm.values())
    assert wire == pytest.approx(expected * (N - 1) / N)
    if stage == 0:
        assert set(comm) == {"all_reduce"}
    elif stage < 3:
        assert comm["reduce_scatter"]["bytes"] == psi_bytes and comm["all_gather"]["bytes"] == psi_bytes
    else:
        assert comm["reduce_scatter"]["bytes"] == psi_bytes and comm["all_gather"]["bytes"] == 2 * psi_bytes
