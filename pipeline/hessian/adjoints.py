"""Adjoints pulled back through the linear parts of recorded steps, summed where a slot feeds
several steps; the transposes of taking pieces (chunk, split, narrow, select) are kept apart and
joined by one concatenation."""

from __future__ import annotations

import torch
from torch import Tensor


def pull(steps, seeds: dict[int, Tensor], keep: bool) -> dict[int, Tensor]:
    """Adjoints (N, E, *s) pulled back through the linear parts of ``steps`` from ``seeds``,
    summed where a slot feeds several steps; ``keep``: every slot's, else those not pulled on."""
    adj: dict[int, Tensor | Padded] = dict(seeds)
    for step in reversed(steps):
        u = take(adj, step.out, keep)
        if u is None:
            continue
        piece = getattr(step.rule, "piece", None)
        if piece is not None:
            accumulate(adj, step.inputs[0], Padded.of(u, piece, 2))
            continue
        for v, c in zip(step.inputs, step.rule.vjp(u), strict=True):
            accumulate(adj, v, c)
    return {v: _joined(p) for v, p in adj.items()}


class Padded:
    """An adjoint that is zero outside pieces along one axis: what the transposes of taking
    pieces (chunk, split, narrow, select) add up to. Kept apart until the slot is read, then
    joined by one concatenation (zero padding and a sum per piece would write the whole tensor
    once per piece)."""

    def __init__(self, axis: int, size: int, parts: list[tuple[int, Tensor]]):
        self.axis, self.size, self.parts = axis, size, parts

    @staticmethod
    def of(u: Tensor, piece, lead: int) -> Padded:
        """The adjoint u of taking the piece ``piece`` (``rules.Piece``), with ``lead`` axes
        before the sample's."""
        return Padded(lead + piece.axis, piece.size, [(piece.start, piece.lift(u, lead))])

    def join(self) -> Tensor:
        parts = sorted(self.parts, key=lambda p: p[0])
        lead = [max(p.shape[i] for _, p in parts) for i in range(self.axis)]
        parts = [(a, p.expand(*lead, *p.shape[self.axis :])) for a, p in parts]
        ends = [a + p.shape[self.axis] for a, p in parts]
        if any(e > a for e, (a, _) in zip(ends[:-1], parts[1:], strict=True)):  # overlapping
            first = parts[0][1]
            shape = (*first.shape[: self.axis], self.size, *first.shape[self.axis + 1 :])
            out = first.new_zeros(shape)
            for a, p in parts:
                out.narrow(self.axis, a, p.shape[self.axis]).add_(p)
            return out
        pieces, at = [], 0
        for (a, p), e in zip(parts, ends, strict=True):
            if a > at:
                pieces.append(self._zeros(p, a - at))
            pieces.append(p)
            at = e
        if at < self.size:
            pieces.append(self._zeros(parts[-1][1], self.size - at))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, self.axis)

    def _zeros(self, like: Tensor, length: int) -> Tensor:
        shape = list(like.shape)
        shape[self.axis] = length
        return like.new_zeros(shape)


def _joined(p: Tensor | Padded) -> Tensor:
    return p.join() if isinstance(p, Padded) else p


def take(adj: dict[int, Tensor | Padded], v: int, keep: bool) -> Tensor | None:
    """adj[v] as a tensor (None: none), left in ``adj`` when ``keep``."""
    p = adj.get(v) if keep else adj.pop(v, None)
    if isinstance(p, Padded):
        p = p.join()
        if keep:
            adj[v] = p
    return p


def accumulate(adj: dict[int, Tensor | Padded], v: int, p: Tensor | Padded | None) -> None:
    """adj[v] += p (p None: nothing); pieces along the same axis stay apart."""
    if p is None:
        return
    q = adj.get(v)
    if q is None:
        adj[v] = p
    elif isinstance(p, Padded) and isinstance(q, Padded) and (p.axis, p.size) == (q.axis, q.size):
        adj[v] = Padded(q.axis, q.size, q.parts + p.parts)
    else:
        adj[v] = _joined(q) + _joined(p)
