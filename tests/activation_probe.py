"""What a model holds for backward and at its peak, measured on CPU in one forward + backward.

- saved: every tensor autograd saves (``saved_tensors_hooks``), each storage once, parameters
  left out;
- held / peak: the CPU allocator's live bytes (the profiler's ``total_allocated``, counting what
  was allocated while profiling) at the end of the forward, and the most over forward + backward.
Parameter gradients are dropped as soon as they are accumulated (as ZeRO does with the reduced
ones), so the peak is the activations' own. The token ids and targets exist before profiling and
count as held; the loss scalar does not.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def _allocations(prof) -> tuple[list[tuple[int, int]], int]:
    """(time, live bytes) of every CPU allocation event, and the end time of the forward. The
    allocator's running total carries over from earlier profiles, so it is taken relative to the
    total before the first event."""
    events, forward_end = [], []

    def walk(nodes):
        for e in nodes:
            if type(e.extra_fields).__name__ == "_ExtraFields_Allocation":
                events.append((e.start_time_ns, e.extra_fields.total_allocated,
                               e.extra_fields.alloc_size))
            if e.name == "forward":
                forward_end.append(e.end_time_ns)
            walk(e.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    events.sort()
    base = events[0][1] - events[0][2]
    return [(t, total - base) for t, total, _ in events], forward_end[0]


def measure(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> dict[str, int]:
    """{"saved", "held", "peak"} bytes of ``model(idx, targets).backward()``."""
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("forward"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(idx, targets)
        loss.backward()
    events, forward_end = _allocations(prof)
    before = idx.nbytes + targets.nbytes - loss.nbytes      # inputs in, the loss scalar out
    held = [live for t, live in events if t <= forward_end][-1]
    return {"saved": sum(saved.values()), "held": held + before,
            "peak": max(live for _, live in events) + before}
