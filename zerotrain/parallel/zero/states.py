"""The core's states, and every transition between them, in one place.

``ParamState`` and ``GradState`` belong to a unit (``unit.py``) and change only inside it;
``Phase`` belongs to the schedule (``hooks.py``). Anything else asks, never sets.
"""
from __future__ import annotations

import enum


class Phase(enum.Enum):
    """Where the step is, as the schedule sees it.

    IDLE ──model forward──▶ FORWARD ──forward returns──▶ IDLE ──first backward hook──▶ BACKWARD
         ──backward ends──▶ IDLE ──optimizer.step()──▶ STEP ──step returns──▶ IDLE

    A unit forward that runs while the phase is BACKWARD is a recompute (activation
    checkpointing): it only unshards, and its post-forward keeps the parameters for the unit's
    own backward, which reshards them once its gradients are reduced.
    """

    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"
    STEP = "step"


class ParamState(enum.Enum):
    """Whether a unit's full parameters are present.

    SHARDED ──unshard(async)──▶ GATHERING ──wait──▶ UNSHARDED ──reshard──▶ SHARDED

    Stage 3 lives in SHARDED between uses (only the 1/N shard is allocated). Stages 0–2 are
    always UNSHARDED except between a step and the next use, while the post-step all-gather of
    the updated parameters is in flight (GATHERING).
    """

    SHARDED = "sharded"
    GATHERING = "gathering"
    UNSHARDED = "unsharded"


class GradState(enum.Enum):
    """What a unit's gradient buffers hold.

    EMPTY          zeros; nothing accumulated since ``zero_grad()``
    LOCAL          unreduced local gradients only (backward passes inside ``no_sync()``)
    REDUCING       a reduction is in flight; nothing may read or write the buffers
    REDUCED        the reduced gradient (AVG over dp at stage 0, this rank's slice of the SUM
                   at stages 1–3), ready for ``step()``; a further backward accumulates onto it
    REDUCED_LOCAL  REDUCED plus unreduced local gradients from a later ``no_sync()`` backward
    STEPPED        consumed by ``step()`` (scaled in place): the next backward starts afresh
    """

    EMPTY = "empty"
    LOCAL = "local"
    REDUCING = "reducing"
    REDUCED = "reduced"
    REDUCED_LOCAL = "reduced+local"
    STEPPED = "stepped"


class GradEvent(enum.Enum):
    LOCAL = "a backward inside no_sync() produced local gradients"
    REDUCE = "a reduction was issued"
    REDUCED = "the reduction completed"
    STEP = "the optimizer stepped on the gradients"
    ZERO = "zero_grad()"


G = GradState
# (state, event) -> next state. A pair that is missing is a misuse, reported by ``next_grad_state``.
GRAD_TRANSITIONS: dict[tuple[GradState, GradEvent], GradState] = {
    (G.EMPTY, GradEvent.LOCAL): G.LOCAL,
    (G.LOCAL, GradEvent.LOCAL): G.LOCAL,
    (G.REDUCED, GradEvent.LOCAL): G.REDUCED_LOCAL,
    (G.REDUCED_LOCAL, GradEvent.LOCAL): G.REDUCED_LOCAL,
    (G.STEPPED, GradEvent.LOCAL): G.LOCAL,
    **{(s, GradEvent.REDUCE): G.REDUCING
       for s in (G.EMPTY, G.LOCAL, G.REDUCED, G.REDUCED_LOCAL, G.STEPPED)},
    (G.REDUCING, GradEvent.REDUCED): G.REDUCED,
    (G.REDUCED, GradEvent.STEP): G.STEPPED,
    (G.EMPTY, GradEvent.STEP): G.STEPPED,       # a step without a backward: zero gradients
    **{(s, GradEvent.ZERO): G.EMPTY
       for s in (G.EMPTY, G.LOCAL, G.REDUCED, G.REDUCED_LOCAL, G.STEPPED)},
}

# A reduction adds onto what the buffers hold (accumulation over micro-batches) from these states;
# from the others it overwrites.
ACCUMULATES = frozenset({G.REDUCED, G.REDUCED_LOCAL})

_MISUSE = {
    GradEvent.STEP: "step() needs reduced gradients: every backward since the last step ran inside "
                    "no_sync() (run the last micro-batch's backward outside it), or step() was called "
                    "twice without a backward in between",
}


def next_grad_state(state: GradState, event: GradEvent, *, unit: str) -> GradState:
    try:
        return GRAD_TRANSITIONS[state, event]
    except KeyError:
        hint = _MISUSE.get(event, "this is a bug in the schedule")
        raise RuntimeError(f"{unit}: gradients are {state.value}; '{event.value}' cannot happen now: "
                           f"{hint}") from None
