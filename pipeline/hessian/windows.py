"""Patches: tangents and adjoints of one row each held on a small window of a feature map.

A tensor of the local schedule (NOTE [local] in ``local``) at a slot with per-sample shape
(C, *map) holds, for each row r, the values on the positions of a window of the map only:
(*lead, R, C, *size) instead of (*lead, R, C, *map). Where row r's window lies is given by its
block b_r at the input x (the rows are grouped into blocks of ``block`` positions per spatial
axis): along spatial axis a it starts at ``scale[a] * b_r[a] + shift[a]``. Scale and shift are
static (Python ints), so the windows of one slot differ between rows only through b_r, and two
windows of one slot are static offsets of each other.

Invariant: a patch is zero at the positions of its window outside the map (every operation that
could write there masks: ``Blocks.mask``), so a window op on a patch sees the zero padding it
would see on the whole map.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules import Sliding


@dataclass(frozen=True)
class Window:
    """Where the patches of a slot lie, per spatial axis (see module doc).

    Attributes:
        scale, shift: row r's window starts at scale * b_r + shift.
        size: the window's extent.
        map: the slot's spatial extent.
        blocks: the number of blocks at x (b_r in [0, blocks)).
    """

    scale: tuple[int, ...]
    shift: tuple[int, ...]
    size: tuple[int, ...]
    map: tuple[int, ...]
    blocks: tuple[int, ...]

    @property
    def area(self) -> int:
        return math.prod(self.size)

    def covers(self, fraction: float) -> bool:
        """Whether the window has at least ``fraction`` of the map's positions."""
        return self.area >= fraction * math.prod(self.map)

    def union(self, other: Window) -> Window | None:
        """The smallest window holding both (None: different scales, no static offset)."""
        if other.scale != self.scale or other.map != self.map:
            return None
        lo = tuple(map(min, self.shift, other.shift))
        hi = tuple(max(a + s, b + t) for a, s, b, t in
                   zip(self.shift, self.size, other.shift, other.size, strict=True))  # fmt: skip
        return Window(self.scale, lo, tuple(h - q for h, q in zip(hi, lo, strict=True)),
                      self.map, self.blocks)  # fmt: skip

    def margins(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Zeros to add before and after the map so that every row's window lies inside."""
        lo = tuple(max(0, -s) for s in self.shift)
        ends = zip(self.scale, self.shift, self.size, self.map, self.blocks, strict=True)
        hi = tuple(max(0, c * (b - 1) + s + z - m) for c, s, z, m, b in ends)
        return lo, hi


def cells(w: Window, op: Sliding, out_map: tuple[int, ...]) -> Window | None:
    """The window of a window op's output on patches in ``w``: every output position whose
    input window meets the patch. The patch is first extended down to the op's stride grid, so
    that the output window starts at a static position too; None where the rows' windows are not
    all on that grid (a scale that the stride does not divide)."""
    scale, shift, size = [], [], []
    for c, s0, z, s, p, e in zip(w.scale, w.shift, w.size, op.stride, op.padding, op.reach,
                                 strict=True):  # fmt: skip
        if c % s:
            return None
        delta = (s0 + p) % s  # extension down to the grid
        lead = s * ((e - 1) // s)  # the first output position starts this far before
        scale.append(c // s)
        shift.append((s0 - delta + p - lead) // s)
        size.append((z + delta - 1) // s + lead // s + 1)
    return Window(tuple(scale), tuple(shift), tuple(size), out_map, w.blocks)


def extent(c: Window, op: Sliding, in_map: tuple[int, ...]) -> Window:
    """The input positions that a window op's outputs in ``c`` read: from c * stride - padding,
    (size - 1) * stride + reach of them."""
    return Window(
        tuple(a * s for a, s in zip(c.scale, op.stride, strict=True)),
        tuple(a * s - p for a, s, p in zip(c.shift, op.stride, op.padding, strict=True)),
        tuple((z - 1) * s + e for z, s, e in zip(c.size, op.stride, op.reach, strict=True)),
        in_map,
        c.blocks,
    )


def offsets(src: Window, dst: Window) -> tuple[list[int], list[int]]:
    """Positions of ``dst`` before and after ``src`` along each axis (negative: cut off)."""
    lo = [a - b for a, b in zip(src.shift, dst.shift, strict=True)]
    hi = [
        b + t - a - s for a, s, b, t in zip(src.shift, src.size, dst.shift, dst.size, strict=True)
    ]
    return lo, hi


def pad(t: Tensor, lo: list[int], hi: list[int]) -> Tensor:
    """Zeros added to (negative: positions cut off) the trailing len(lo) axes of t."""
    if not any(lo) and not any(hi):
        return t
    pairs = [p for a, b in zip(reversed(lo), reversed(hi), strict=True) for p in (a, b)]
    return F.pad(t, pairs)


def embed(t: Tensor, src: Window, dst: Window) -> Tensor:
    """Patches t (..., *src.size) on the windows ``dst`` (same scale): (..., *dst.size)."""
    if src == dst:
        return t
    return pad(t, *offsets(src, dst))


def per_block(value: Tensor, w: Window, first: tuple[int, int] | None = None) -> Tensor:
    """A map (*lead, C, *map) at the window of every block: (*lead, blocks, C * area), the
    blocks flat in order (``first``: only those whose first coordinate is in [lo, hi))."""
    nsp = len(w.map)
    lo, hi = w.margins()
    t = pad(value, list(lo), list(hi))
    t = t[(..., *[slice(s + a, None) for s, a in zip(w.shift, lo, strict=True)])]
    for z, c in zip(w.size, w.scale, strict=True):
        t = t.unfold(-nsp, z, c)  # (*lead, C, *blocks, *size) once all are done
    grid = [slice(0, b) for b in w.blocks]
    if first is not None:
        grid[0] = slice(*first)
    t = t[(..., *grid, *[slice(None)] * nsp)]
    t = t.movedim(-2 * nsp - 1, -nsp - 1)  # (*lead, *blocks, C, *size)
    return t.reshape(*value.shape[: -nsp - 1], -1, value.shape[-nsp - 1] * w.area)


def blocks_for(rows, shape: tuple[int, ...], block: tuple[int, ...]) -> Blocks:
    """``Blocks`` of the selected rows (``rows.Rows``); for all rows in order the same every
    call, so its index tensors and masks are kept from call to call (``_every_row``)."""
    if not rows.full:
        return Blocks(rows.index, shape, block)
    out = copy.copy(_every_row(shape, block, rows.index.device))
    out.cache = {}  # the max pools' positions: this batch's
    return out


@functools.lru_cache(maxsize=16)
def _every_row(shape: tuple[int, ...], block: tuple[int, ...], device: torch.device) -> Blocks:
    return Blocks(torch.arange(math.prod(shape), device=device), shape, block)


class Blocks:
    """The selected rows' blocks at x and the index tensors of their windows (built on the
    device from the row indices: nothing is read back).

    Args:
        index: (R,) flat row indices into x's per-sample shape ``shape`` = (C, *sp).
        block: positions per block along each spatial axis.
    """

    def __init__(self, index: Tensor, shape: tuple[int, ...], block: tuple[int, ...]):
        sp = shape[1:]
        self.nsp, self.block, self.r = len(sp), block, index.shape[0]
        coords, rest = [], index
        for extent_ in reversed(sp):
            coords.append(rest % extent_)
            rest = rest // extent_
        coords.reverse()
        self.b = torch.stack([c // k for c, k in zip(coords, block, strict=True)], -1)  # (R, nsp)
        local = rest  # the channel
        for c, k in zip(coords, block, strict=True):
            local = local * k + c % k
        self.local = local  # the row's position in its block's patch (C, *block), flat
        self._index: dict[Window, Tensor] = {}
        self._mask: dict[tuple[Window, torch.dtype], Tensor] = {}
        self._blocks: dict[tuple[int, ...], Tensor] = {}
        self.cache: dict[tuple, Tensor] = {}  # other index tensors of this call (max pools)

    def seed(self, channels: int, like: Tensor) -> Tensor:
        """The tangents e_r as patches (1, R, C, *block) on the window of x."""
        n = channels * math.prod(self.block)
        hot = self.local.unsqueeze(-1) == torch.arange(n, device=self.local.device)
        return hot.to(like.dtype).reshape(1, self.r, channels, *self.block)

    def origin(self, w: Window) -> Tensor:
        """(R, nsp) where each row's window starts."""
        starts = [
            self.b[:, a] * c + s for a, (c, s) in enumerate(zip(w.scale, w.shift, strict=True))
        ]
        return torch.stack(starts, -1)

    def _axes(self, w: Window, start: Tensor) -> list[Tensor]:
        """Per axis, (R, size_a) positions of the window from ``start`` (R, nsp)."""
        return [start[:, a, None] + torch.arange(z, device=start.device)
                for a, z in enumerate(w.size)]  # fmt: skip

    def mask(self, w: Window, like: Tensor) -> Tensor:
        """(R, 1, *size): 1 at the window's positions inside the map, 0 outside."""
        key = (w, like.dtype)
        if key not in self._mask:
            out = None
            for a, pos in enumerate(self._axes(w, self.origin(w))):
                inside = ((pos >= 0) & (pos < w.map[a])).to(like.dtype)
                inside = inside.reshape(self.r, *[1] * a, w.size[a], *[1] * (self.nsp - a - 1))
                out = inside if out is None else out * inside
            self._mask[key] = out.unsqueeze(1)
        return self._mask[key]

    def gather(self, value: Tensor, w: Window) -> Tensor:
        """A map (*lead, C, *map) at each row's window: (*lead, R, C, *size), zero outside.

        The windows of all blocks are views of the padded map (``Tensor.unfold`` with the
        window's scale as step), copied once as (*lead, blocks, C * area); each row then copies
        its block's window whole (``index_select`` of contiguous rows)."""
        lead = value.shape[: -self.nsp - 1]
        out = per_block(value, w).index_select(-2, self.block_index(w.blocks))
        return out.view(*lead, self.r, value.shape[-self.nsp - 1], *w.size)

    def block_index(self, blocks: tuple[int, ...]) -> Tensor:
        """(R,) each row's block, flat over the grid of ``blocks``."""
        if blocks not in self._blocks:
            flat = self.b[:, 0]
            for a in range(1, self.nsp):
                flat = flat * blocks[a] + self.b[:, a]
            self._blocks[blocks] = flat
        return self._blocks[blocks]

    def scatter(self, t: Tensor, w: Window) -> Tensor:
        """Patches (*lead, R, C, *size) as whole maps (*lead, R, C, *map).

        Window positions outside the map are sent to position 0 of the map and added there: the
        patch is zero at them (module doc), so no buffer larger than the maps is needed."""
        lead = t.shape[: -self.nsp]
        out = t.new_zeros(*lead, math.prod(w.map))
        idx = self.map_index(w).reshape(self.r, 1, -1).expand(*lead, -1)
        out.scatter_add_(-1, idx, t.reshape(*lead, -1))
        return out.unflatten(-1, w.map)

    def map_index(self, w: Window) -> Tensor:
        """(R, prod size) flat positions of each row's window in the map, 0 outside it."""
        if w not in self._index:
            flat = inside = None
            for a, pos in enumerate(self._axes(w, self.origin(w))):
                shape = (self.r, *[1] * a, w.size[a], *[1] * (self.nsp - a - 1))
                ok = ((pos >= 0) & (pos < w.map[a])).reshape(shape)
                pos = pos.reshape(shape)
                flat = pos if flat is None else flat * w.map[a] + pos
                inside = ok if inside is None else inside & ok
            self._index[w] = torch.where(inside, flat, 0).reshape(self.r, -1)
        return self._index[w]
