"""The core's explicit states, in one process: the schedule's phase (recompute inside backward),
the gradient-state table, and a trace that shows gathers and prefetches in the right order."""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

import zerotrain
from models import TinyGPT, make_batch
from zerotrain.parallel.zero.states import (GRAD_TRANSITIONS, GradEvent, GradState, ParamState, Phase,
                                            next_grad_state)


def _gpt(n_layer=4):
    torch.manual_seed(0)
    return TinyGPT(d=8, n_layer=n_layer).double()


def _train(model, steps=3, *, recompute=False, trace=False):
    model.recompute = recompute
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-2)
    losses, norms = [], []
    for step in range(steps):
        if trace and step == steps - 1:
            model.zero_state.schedule.trace = []
        x, y = make_batch("gpt", 4, step)
        loss = model(x, y)
        loss.backward()
        info = opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        norms.append(info.grad_norm)
    return losses, norms


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("early_stop", [True, False])
def test_recompute_during_backward_keeps_the_unit_and_trains_bitwise_the_same(stage, early_stop):
    plain = _train(zerotrain.shard_model(_gpt(), stage=stage))
    with set_checkpoint_early_stop(early_stop):
        recomputed = _train(zerotrain.shard_model(_gpt(), stage=stage), recompute=True)
    assert recomputed == plain            # bitwise: losses and gradient norms


def test_recompute_runs_forward_hooks_inside_backward_phase():
    model = zerotrain.shard_model(_gpt(), stage=3)
    with set_checkpoint_early_stop(False):
        _train(model, steps=2, recompute=True, trace=True)
    trace = model.zero_state.schedule.trace
    blocks = {u.index for u in model.zero_state.units if u is not model.zero_state.root}
    recomputes = [e for e in trace if e.phase is Phase.BACKWARD and e.event == "pre_forward"]
    assert {e.unit for e in recomputes} == blocks, "every block is recomputed once, in backward"
    # the unit is already gathered for its backward when the recompute starts, and the recompute's
    # post-forward does not free it: its reduction (later) is what reshards it
    assert all(e.state is ParamState.UNSHARDED for e in recomputes)
    for e in recomputes:
        after = trace[trace.index(e):]
        reduce_at = next(i for i, x in enumerate(after) if x.event == "reduce" and x.unit == e.unit)
        assert all(x.state is ParamState.UNSHARDED for x in after[:reduce_at] if x.unit == e.unit)


def _forward_and_backward_events(trace):
    fwd = [e for e in trace if e.phase is Phase.FORWARD]
    bwd = [e for e in trace if e.phase is Phase.BACKWARD]
    return fwd, bwd


def test_trace_each_unit_is_prefetched_one_ahead_in_forward_and_backward():
    model = zerotrain.shard_model(_gpt(), stage=3)
    _train(model, steps=2, trace=True)
    zs = model.zero_state
    fwd, bwd = _forward_and_backward_events(zs.schedule.trace)
    order = [e.unit for e in fwd if e.event == "pre_forward"]
    blocks = [u.index for u in zs.units if u is not zs.root]
    assert order == [zs.root.index] + blocks
    units = [zs.root.index] + blocks
    for j, unit in enumerate(units):
        pre = next(e for e in fwd if e.event == "pre_forward" and e.unit == unit)
        # gathered (or gathering) before its own forward: the unit before it prefetched it
        assert pre.state is (ParamState.GATHERING if j > 0 else ParamState.SHARDED), (unit, pre)
        nxt = fwd[fwd.index(pre) + 1]
        if j + 1 < len(units):
            assert (nxt.event, nxt.unit, nxt.state) == ("prefetch", units[j + 1], ParamState.SHARDED)
    pre_bwd = [e for e in bwd if e.event == "pre_backward"]
    assert [e.unit for e in pre_bwd] == [zs.root.index] + blocks[::-1]
    for e in pre_bwd[2:]:                 # the root and the last block start cold
        assert e.state is ParamState.GATHERING, e
    prefetched = [e.unit for e in bwd if e.event == "prefetch"]
    assert prefetched == blocks[::-1][1:] + [zs.root.index]
    reduced = [e.unit for e in bwd if e.event == "reduce"]
    assert reduced == blocks[::-1] + [zs.root.index], "fixed order: blocks in reverse, root last"


def test_without_prefetch_nothing_is_gathered_ahead_and_results_are_bitwise_equal():
    with_prefetch = _train(zerotrain.shard_model(_gpt(), stage=3))
    model = zerotrain.shard_model(_gpt(), stage=3, prefetch=False)
    assert _train(model, trace=True) == with_prefetch
    trace = model.zero_state.schedule.trace
    assert not [e for e in trace if e.event == "prefetch"]
    assert all(e.state is ParamState.SHARDED for e in trace if e.event in ("pre_forward", "pre_backward"))


def test_phases_follow_forward_backward_step():
    model = zerotrain.shard_model(_gpt(2), stage=2)
    _train(model, steps=1, trace=True)
    phases = [(e.phase, e.event) for e in model.zero_state.schedule.trace
              if e.event in ("begin_forward", "end_forward", "begin_backward", "end_backward",
                             "begin_step", "end_step")]
    assert phases == [(Phase.FORWARD, "begin_forward"), (Phase.IDLE, "end_forward"),
                      (Phase.BACKWARD, "begin_backward"), (Phase.IDLE, "end_backward"),
                      (Phase.STEP, "begin_step"), (Phase.IDLE, "end_step")]
    assert model.zero_state.schedule.phase is Phase.IDLE


# ------------------------------------------------------------------------- gradient states
def test_every_gradient_transition_is_in_the_table_or_refused():
    for state in GradState:
        for event in GradEvent:
            if (state, event) in GRAD_TRANSITIONS:
                assert isinstance(next_grad_state(state, event, unit="u"), GradState)
            else:
                with pytest.raises(RuntimeError, match="cannot happen now"):
                    next_grad_state(state, event, unit="u")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_grad_states_through_accumulation_and_step(stage):
    model = zerotrain.shard_model(_gpt(2), stage=stage)
    opt = zerotrain.ShardedOptimizer(model, torch.optim.AdamW, lr=1e-2)
    units = model.zero_state.units
    states = lambda: {u.grad_state for u in units}  # noqa: E731
    assert states() == {GradState.EMPTY}
    x, y = make_batch("gpt", 4, 0)
    with model.no_sync():
        model(x, y).backward()
    assert states() == {GradState.LOCAL}
    model(x, y).backward()
    assert states() == {GradState.REDUCED}
    with model.no_sync():
        model(x, y).backward()
    assert states() == {GradState.REDUCED_LOCAL}
    with pytest.raises(RuntimeError, match="no_sync"):
        opt.step()                         # the last backward's gradients were never reduced
    model(x, y).backward()
    opt.step()
    assert states() == {GradState.STEPPED}
    with pytest.raises(RuntimeError, match="twice"):
        opt.step()
    opt.zero_grad()
    assert states() == {GradState.EMPTY}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_after_a_step_the_next_backward_starts_afresh_without_zero_grad(stage):
    """Gradients a step consumed are never added to the next ones, at every stage alike."""
    def run(zero_between):
        model = zerotrain.shard_model(_gpt(2), stage=stage)
        opt = zerotrain.ShardedOptimizer(model, torch.optim.SGD, lr=0.1)
        for step in range(3):
            x, y = make_batch("gpt", 4, step)
            model(x, y).backward()
            opt.step()
            if zero_between:
                opt.zero_grad()
        return model.full_state_dict()
    a, b = run(True), run(False)
    assert all(torch.equal(a[k], b[k]) for k in a)
