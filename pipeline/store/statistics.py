"""Per-sample statistics of the Hessians, taken from each block while it is in memory.

A block holds rows I = [r0, r1) of the (D, D) Hessians of samples [s0, s1), all K outputs. From it
alone come the diagonal entries H[i, i] and the row norms ||H[i, :]|| for i in I (stored in
``/diagonal`` and ``/row_norm``), and per (sample, output) partial sums that add up over the row
blocks (``SUMS``): the sum of squares, the trace, the squared asymmetry of the block's diagonal
tile and the number of non-finite entries. ``reduce_sums`` turns them into ``/frobenius``,
``/trace``, ``/symmetry`` and ``/nonfinite``, so nothing re-reads the file for them.

NOTE: [symmetry from blocks] ||H - H^T||_F needs H[i, j] and H[j, i] together, which lie in
different blocks unless a block holds whole Hessians (D <= the block's rows: the usual case up
to D = 4096 with 64 MiB blocks). A block has both for every pair inside its diagonal tile
rows I x columns I, so ``/symmetry`` is exact when blocks hold whole Hessians, and otherwise is
the residual over the diagonal tiles' pairs scaled to all D^2 entries (a sample of the pairs:
rounding-level asymmetry is estimated well; a single wrong pair outside the tiles is missed).
``python -m pipeline.inspect`` computes the exact residual from the file, and ``--verify`` checks
every pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import Plan

SUMS = ("sum_squares", "trace", "asymmetry_squares", "nonfinite")
TILE = 256  # the symmetry residual compares square sub-tiles of this size


@dataclass
class BlockStats:
    """What one block yields: per row (S, K, R) and per (sample, output) partial sums (S, K, 4)."""

    diagonal: np.ndarray  # (S, K, R): H[i, i], in the result's dtype
    row_norm: np.ndarray  # (S, K, R): ||H[i, :]||_2, in the result's dtype
    sums: np.ndarray  # (S, K, 4) float64, in the order of SUMS

    @staticmethod
    def concat(parts: list[BlockStats]) -> BlockStats:
        """The statistics of consecutive pieces of samples (the same rows), as one block's."""
        if len(parts) == 1:
            return parts[0]
        return BlockStats(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                            ("diagonal", "row_norm", "sums")))  # fmt: skip


def block_stats(h: np.ndarray, r0: int) -> BlockStats:
    """Statistics of a block h (S, K, R, D) holding rows [r0, r0 + R).

    Single-threaded numpy (it runs beside the compute, which owns the cores). Squares are summed
    along each row in h's dtype (one pass at memory speed) and the row sums are added in float64;
    a sum that overflows is recomputed in float64. Entries of a nearly symmetric pair differ
    little, so their difference is exact in h's dtype.
    """
    s, k, r, d = h.shape
    i = np.arange(r)
    diagonal = h[:, :, i, r0 + i]
    row_sq = _squares(h, "skrd,skrd->skr")
    tile = h[:, :, :, r0 : r0 + r]  # (S, K, R, R): rows and columns I
    asym = np.zeros((s, k))
    for a0 in range(0, r, TILE):  # square sub-tiles: transposed reads stay in cache
        for b0 in range(a0, r, TILE):
            a = tile[:, :, a0 : a0 + TILE, b0 : b0 + TILE]
            with np.errstate(over="ignore", invalid="ignore"):
                a = a - tile[:, :, b0 : b0 + TILE, a0 : a0 + TILE].swapaxes(-1, -2)
            weight = 1.0 if a0 == b0 else 2.0  # an off-diagonal pair of sub-tiles: twice
            asym += weight * _squares(a, "skij,skij->sk")
    sums = np.stack(
        [row_sq.sum(-1), diagonal.sum(-1, dtype=np.float64), asym, np.zeros((s, k))], -1
    )
    if not np.isfinite(sums[..., 0]).all():  # NaN or inf entries: count them (rare)
        sums[..., 3] = (~np.isfinite(h)).sum((-2, -1))
    return BlockStats(diagonal.copy(), np.sqrt(row_sq).astype(h.dtype), sums)


def _squares(a: np.ndarray, spec: str) -> np.ndarray:
    """Sums of squares by ``np.einsum(spec, a, a)`` in a's dtype, as float64; recomputed in
    float64 where they overflow."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.einsum(spec, a, a).astype(np.float64)
    if not np.isfinite(out).all() and a.dtype != np.float64:
        wide = a.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.einsum(spec, wide, wide)
    return out


def tile_fraction(plan: Plan) -> float:
    """The fraction of a Hessian's D^2 entries that lie in the blocks' diagonal tiles."""
    rows = [b.r1 - b.r0 for b in plan.blocks if b.s0 == 0]
    return sum(r * r for r in rows) / float(plan.dim) ** 2


def reduce_sums(plan: Plan, sums: np.ndarray) -> dict[str, np.ndarray]:
    """(N, K, 4) summed partial sums -> the (N, K) datasets frobenius, trace, symmetry, nonfinite.

    ``symmetry`` is ||H - H^T||_F / ||H||_F (0 for H = 0); see NOTE: [symmetry from blocks].
    """
    frob = np.sqrt(sums[..., 0])
    asym = np.sqrt(sums[..., 2] / tile_fraction(plan))
    symmetry = np.divide(asym, frob, out=np.zeros_like(frob), where=frob > 0)
    symmetry[~np.isfinite(frob)] = np.nan
    return {
        "frobenius": frob,
        "trace": sums[..., 1].copy(),
        "symmetry": symmetry,
        "nonfinite": sums[..., 3].astype(np.int64),
    }
