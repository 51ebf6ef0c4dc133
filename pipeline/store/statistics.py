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
import torch
from torch import Tensor

from ..plan import Plan

SUMS = ("sum_squares", "trace", "asymmetry_squares", "nonfinite")
PANEL_BYTES = 8 << 20  # float64 temporaries are taken over panels of rows of about this size


@dataclass
class BlockStats:
    """What one block yields: per row (S, K, R) and per (sample, output) partial sums (S, K, 4)."""

    diagonal: np.ndarray  # (S, K, R): H[i, i], in the result's dtype
    row_norm: np.ndarray  # (S, K, R): ||H[i, :]||_2, in the result's dtype
    sums: np.ndarray  # (S, K, 4) float64, in the order of SUMS


def block_stats(h: Tensor, r0: int) -> BlockStats:
    """Statistics of a block h (S, K, R, D) holding rows [r0, r0 + R), on h's device.

    Sums are taken in float64 over panels of rows, so temporaries stay small.
    """
    s, k, r, d = h.shape
    i = torch.arange(r, device=h.device)
    diagonal = h[:, :, i, r0 + i]
    tile = h[:, :, :, r0 : r0 + r]  # (S, K, R, R): rows and columns I
    row_sq = torch.empty((s, k, r), dtype=torch.float64, device=h.device)
    asym = torch.zeros((s, k), dtype=torch.float64, device=h.device)
    step = max(1, PANEL_BYTES // max(1, s * k * d * 8))
    for j in range(0, r, step):
        p = h[:, :, j : j + step].double()
        row_sq[:, :, j : j + step] = (p * p).sum(-1)
        a = tile[:, :, j : j + step, :].double() - tile[:, :, :, j : j + step].double().mT
        asym += (a * a).sum((-2, -1))
    sums = torch.stack(
        [row_sq.sum(-1), diagonal.double().sum(-1), asym, torch.zeros_like(asym)], -1
    )
    bad = ~torch.isfinite(sums[..., 0])
    if bool(bad.any()):  # a NaN or inf somewhere: count them (rare, so not counted otherwise)
        sums[..., 3] = (~torch.isfinite(h)).sum((-2, -1)).double()
    return BlockStats(
        diagonal.cpu().numpy(),
        row_sq.sqrt().to(h.dtype).cpu().numpy(),
        sums.cpu().numpy(),
    )


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
