"""What the wrapped optimizer sees, and the public view of what a rank owns.

A ``Piece`` is a run of consecutive parameter slices of one unit and one param group inside this
rank's owned region (``ParamSlice``, from the unit), handed to the wrapped torch optimizer as one
1-D tensor: a view of the master. Stage 0 hands each parameter over whole, in its own shape.

``OwnedSlice`` is one parameter's part of a piece with everything kept for it: the master and
reduced-gradient views and the views of each optimizer-state tensor. Checkpoint save/load and
anything else that needs "this rank's share of parameter X" walk ``ShardedOptimizer.owned_slices()``
instead of the optimizer's internals.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .unit import ParamSlice


@dataclass
class Piece:
    group: int
    slices: list[ParamSlice] = field(default_factory=list)
    tensor: torch.Tensor | None = None        # the master view the wrapped optimizer updates

    @property
    def unit(self):
        return self.slices[0].unit

    @property
    def flat(self) -> tuple[int, int]:
        return self.slices[0].flat[0], self.slices[-1].flat[1]

    def grad_view(self) -> torch.Tensor:
        lo = self.unit.region[0]
        g = self.unit.step_grads()[self.flat[0] - lo:self.flat[1] - lo]
        return g.view(self.tensor.shape)


def build_pieces(units, group_of: dict[int, int], *, shaped: bool) -> list[Piece]:
    """Merge each unit's owned slices into maximal runs of one param group; ``shaped``: one piece
    per parameter in the parameter's own shape (stage 0 holds whole parameters)."""
    pieces: list[Piece] = []
    for u in units:
        first = len(pieces)
        for s in u.owned_slices():
            gi = group_of.get(id(s.param))
            if gi is None:
                continue
            last = pieces[-1] if len(pieces) > first else None
            if not shaped and last and last.group == gi and last.flat[1] == s.flat[0]:
                last.slices.append(s)
            else:
                pieces.append(Piece(gi, [s]))
        lo = u.region[0]
        for pc in pieces[first:]:
            pc.tensor = u.master[pc.flat[0] - lo:pc.flat[1] - lo]
            if shaped:
                pc.tensor = pc.tensor.view(pc.slices[0].param.shape)
    return pieces


@dataclass(frozen=True)
class OwnedSlice:
    """One parameter's share on this rank: ``span`` [lo, hi) of its flattened elements."""
    slice: ParamSlice
    piece: Piece
    state: dict          # optimizer-state key -> 1-D view of this slice (element-wise states)
    scalars: dict        # optimizer-state key -> per-piece scalar (e.g. Adam's ``step``)

    @property
    def name(self) -> str:
        return self.slice.name

    @property
    def param(self) -> torch.nn.Parameter:
        return self.slice.param

    @property
    def span(self) -> tuple[int, int]:
        return self.slice.span

    @property
    def master(self) -> torch.Tensor:
        return self.slice.master

    @property
    def grad(self) -> torch.Tensor:
        return self.slice.grad

    @property
    def within(self) -> slice:
        """Where this slice sits inside its piece's (flattened) tensors."""
        start = self.slice.flat[0] - self.piece.flat[0]
        return slice(start, start + self.slice.flat[1] - self.slice.flat[0])


def owned(piece: Piece, piece_state: dict) -> list[OwnedSlice]:
    tensors = {k: v for k, v in piece_state.items() if torch.is_tensor(v) and v.dim() > 0}
    scalars = {k: v for k, v in piece_state.items() if k not in tensors}
    for key, v in tensors.items():
        if v.shape != piece.tensor.shape:
            raise ValueError(f"optimizer state {key!r} of {piece.slices[0].name} has shape {tuple(v.shape)}, "
                             f"not the parameter's {tuple(piece.tensor.shape)}; only element-wise optimizer "
                             "states can be sharded and resharded")
    out = []
    for s in piece.slices:
        placeholder = OwnedSlice(s, piece, {}, scalars)
        views = {k: v.reshape(-1)[placeholder.within] for k, v in tensors.items()}
        out.append(OwnedSlice(s, piece, views, scalars))
    return out
