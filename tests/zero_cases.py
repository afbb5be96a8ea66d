"""Training cases shared by the ZeRO tests: one function trains a sharded model on this rank's
slice of the global batch, another trains the single-process reference on the whole batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import zerotrain
from models import make_batch, make_model

GLOBAL_BATCH = 48
STEPS = 5
LR = 1e-2


@dataclass(frozen=True)
class Case:
    kind: str                  # "gpt" | "uneven"
    stage: int
    dtype: torch.dtype = torch.float64
    accum: int = 1             # micro-batches per step
    no_sync: bool = False      # defer reduction on all but the last micro-batch
    clip: float | None = None
    groups: bool = False       # weight-decay exemption + a second lr
    recompute: bool = False    # activation checkpointing per block (non-reentrant)
    prefetch: bool = True

    @property
    def name(self) -> str:
        return (f"{self.kind}-s{self.stage}-{str(self.dtype)[6:]}-k{self.accum}"
                f"{'-nosync' if self.no_sync else ''}{'-clip' if self.clip else ''}{'-groups' if self.groups else ''}"
                f"{'-recompute' if self.recompute else ''}{'' if self.prefetch else '-noprefetch'}")


def param_groups(named_params, case: Case):
    if not case.groups:
        return None
    decay = [p for n, p in named_params if p.dim() >= 2]
    rest = [p for n, p in named_params if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": LR / 2}]


def _zero_missing_grads(model):
    # zerotrain gives a parameter that skipped the forward a zero gradient (weight decay still
    # applies to it); the reference does the same so both run the same maths.
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def run_reference(case: Case):
    model = make_model(case.kind, case.dtype)
    groups = param_groups(list(model.named_parameters()), case) or model.parameters()
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=0.01)
    losses, norms = [], []
    for step in range(STEPS):
        x, y = make_batch(case.kind, GLOBAL_BATCH, step, case.dtype)
        loss = model(x, y)
        loss.backward()
        _zero_missing_grads(model)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), case.clip if case.clip else float("inf"))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        norms.append(norm.item())
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    return {"losses": losses, "norms": norms, "params": {k: v.clone() for k, v in model.state_dict().items()},
            "state": state}


def run_sharded(mesh, case: Case):
    model = make_model(case.kind, case.dtype)
    model.recompute = case.recompute
    zerotrain.shard_model(model, stage=case.stage, mesh=mesh, prefetch=case.prefetch)
    groups = param_groups([(n, p) for n, p in model.named_parameters()], case)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, groups, lr=LR, weight_decay=0.01,
                                     max_grad_norm=case.clip)
    n, r = mesh.dp, mesh.dp_rank
    micro = GLOBAL_BATCH // case.accum
    losses, norms = [], []
    for step in range(STEPS):
        x, y = make_batch(case.kind, GLOBAL_BATCH, step, case.dtype)
        total = 0.0
        for k in range(case.accum):
            xs = x[k * micro:(k + 1) * micro]
            ys = y[k * micro:(k + 1) * micro]
            per = micro // n
            xs, ys = xs[r * per:(r + 1) * per], ys[r * per:(r + 1) * per]
            defer = case.no_sync and k < case.accum - 1
            with (model.no_sync() if defer else _null()):
                loss = model(xs, ys) / case.accum
                loss.backward()
            total += loss.item()
        info = opt.step()
        opt.zero_grad()
        losses.append(total)
        norms.append(info.grad_norm)
    local = {name: local_state(opt, name) for name, _ in model.named_parameters()}
    return {"losses": losses, "norms": norms, "params": model.full_state_dict(), "state": local}


def local_state(opt, name: str) -> list[tuple[int, int, dict]]:
    """This rank's optimizer state of parameter ``name``: (lo, hi, {key: tensor or scalar})."""
    return [(*s.span, {**s.state, **s.scalars}) for s in opt.owned_slices() if s.name == name]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def worker(mesh, cases):
    """Spawned entry: run every case, average per-rank losses into global ones."""
    out = {}
    for case in cases:
        res = run_sharded(mesh, case)
        t = torch.tensor(res["losses"], dtype=torch.float64)
        zerotrain.distributed.comm.all_reduce(t, mesh.dp_group, op="avg")
        res["losses"] = t.tolist()
        out[case.name] = res
    return out
