"""Statistics of stored (D, D) Hessians, streamed from HDF5 in blocks of rows.

NOTE: [row panels] ``/hessian`` is chunked by blocks of whole rows, so reading a column means
reading every row chunk. A symmetry check needs H[I, J] and H[J, I] for every pair of row panels
I <= J: with panels of B rows it reads (D/B)(D/B + 1)/2 panels and holds two (B, D) panels in
memory. B comes from a memory budget: when a whole (D, D) matrix fits (D = 784: 4.7 MiB in
float64), it is one panel and one read; for D = 65,536 and 512 MiB it is 341 rows, so the check
reads the matrix about 96 times: verifying symmetry of very large Hessians is I/O bound.
Everything else (Frobenius norm, trace, diagonal, row norms, products H @ V) comes from the
diagonal panels I = J, one pass over the matrix.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import h5py
import numpy as np

DEFAULT_MEMORY_MB = 512


@dataclass
class MatrixStats:
    """What one streamed pass over a (D, D) Hessian H yields (in float64).

    Attributes:
        frobenius: ||H||_F.
        trace: tr(H).
        symmetry: ||H - H^T||_F / ||H||_F (0 when H = 0).
        diagonal: (D,) diag(H).
        row_norms: (D,) ||H[i, :]||_2.
        products: (D, P) H @ probes, or None without probes.
        worst_pair: (i, j, excess): the entry pair with the largest |H_ij - H_ji| minus
            rtol * max(||H_i||, ||H_j||); None unless ``sym_rtol`` was given.
        nonfinite: (D,) the number of non-finite entries (NaN, inf) of each row.
        tile_asymmetry: (ceil(D / T),) for tiles of T rows: the sum of (H_ij - H_ji)^2 over the
            diagonal tile rows x columns [t T, (t + 1) T), what a block of T rows stores (see
            NOTE: [symmetry from blocks] in ``pipeline.store.statistics``); None unless ``tiles``
            was given (and ``pairs``).
    """

    frobenius: float
    trace: float
    symmetry: float
    diagonal: np.ndarray
    row_norms: np.ndarray
    products: np.ndarray | None = None
    worst_pair: tuple[int, int, float] | None = None
    nonfinite: np.ndarray | None = None
    tile_asymmetry: np.ndarray | None = None


def panel_rows(dset: h5py.Dataset, memory_mb: int = DEFAULT_MEMORY_MB) -> int:
    """Rows B per panel: all D if three float64 (D, D) arrays fit into ``memory_mb`` (two panels
    and a temporary), else a multiple of the chunk rows such that three (B, D) arrays do."""
    d = dset.shape[-1]
    row_bytes = d * 8
    budget = max(1, memory_mb) << 20
    if 3 * d * row_bytes <= budget:
        return d
    chunk_rows = dset.chunks[2] if dset.chunks else 1
    rows = max(1, budget // (3 * row_bytes))
    return int(min(d, max(chunk_rows, rows // chunk_rows * chunk_rows)))


def row_panels(
    dset: h5py.Dataset, n: int, k: int, rows: int, step: int = 1
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(r0, r1, H[n, k, r0:r1, :]) for consecutive panels of ``rows`` rows (every ``step``-th
    panel), one at a time."""
    d = dset.shape[-1]
    for r0 in range(0, d, rows * step):
        r1 = min(d, r0 + rows)
        yield r0, r1, dset[n, k, r0:r1, :]


def matrix_stats(
    dset: h5py.Dataset,
    n: int,
    k: int,
    probes: np.ndarray | None = None,
    sym_rtol: float | None = None,
    memory_mb: int = DEFAULT_MEMORY_MB,
    pairs: bool = True,
    tiles: int | None = None,
) -> MatrixStats:
    """Stream H = dset[n, k] (D, D) once per panel pair; see NOTE: [row panels].

    Args:
        dset: ``/hessian`` (N, K, D, D).
        n: sample position.
        k: output position.
        probes: (D, P) vectors to multiply by H, or None.
        sym_rtol: with it, also find the entry pair that violates |H_ij - H_ji| <=
            sym_rtol * max(||H_i||, ||H_j||) the most (see ``MatrixStats.worst_pair``).
        memory_mb: bound on the two panels held at once.
        pairs: compare H[i, j] with H[j, i] (reads panel pairs); without, one pass over H, and
            ``symmetry`` is NaN.
        tiles: with ``pairs``, also sum the squared asymmetry over the diagonal tiles of this
            many rows (``MatrixStats.tile_asymmetry``).
    """
    d = dset.shape[-1]
    b = panel_rows(dset, memory_mb)
    frob2 = trace = asym2 = 0.0
    diagonal = np.zeros(d)
    row_norms = np.zeros(d)
    products = None if probes is None else np.zeros((d, probes.shape[1]))
    worst: tuple[int, int, float] | None = None
    nonfinite = np.zeros(d, np.int64)
    tile_asym = np.zeros(-(-d // tiles)) if tiles and pairs else None
    for r0, r1, panel in row_panels(dset, n, k, b):
        p = panel.astype(np.float64)
        frob2 += float(np.sum(p * p))
        diagonal[r0:r1] = p[np.arange(r1 - r0), np.arange(r0, r1)]
        trace += float(diagonal[r0:r1].sum())
        row_norms[r0:r1] = np.sqrt(np.sum(p * p, axis=1))
        bad = ~np.isfinite(row_norms[r0:r1])  # a finite norm: a row of finite entries
        if bad.any():
            nonfinite[r0:r1][bad] = (~np.isfinite(p[bad])).sum(1)
        if products is not None:
            products[r0:r1] = p @ probes
        # Pairs (I, J) with J >= I: the diagonal tile first, then the panels below.
        if not pairs:
            continue
        below = ((c0, c1, q.astype(np.float64)) for c0, c1, q in _panels_from(dset, n, k, r1, b))
        for c0, c1, q in itertools.chain([(r0, r1, p)], below):
            diff = p[:, c0:c1] - q[:, r0:r1].T  # H[I, J] - H[J, I]^T
            weight = 1.0 if c0 == r0 else 2.0  # off-diagonal tiles stand for two tiles
            asym2 += weight * float(np.sum(diff * diff))
            if tile_asym is not None:
                _add_tiles(tile_asym, tiles, diff, weight, r0, c0)
            if sym_rtol is not None:
                qn = row_norms[c0:c1] if c0 == r0 else np.sqrt(np.sum(q * q, axis=1))
                scale = np.maximum(row_norms[r0:r1, None], qn[None, :])
                excess = np.abs(diff) - sym_rtol * scale
                i, j = np.unravel_index(int(np.argmax(excess)), excess.shape)
                if worst is None or excess[i, j] > worst[2]:
                    worst = (r0 + int(i), c0 + int(j), float(excess[i, j]))
    frob = float(np.sqrt(frob2))
    symmetry = float(np.sqrt(asym2)) / frob if frob > 0 else 0.0
    if not pairs:
        symmetry = float("nan")
    return MatrixStats(frob, trace, symmetry, diagonal, row_norms, products, worst, nonfinite,
                       tile_asym)  # fmt: skip


def _add_tiles(
    out: np.ndarray, tiles: int, diff: np.ndarray, weight: float, r0: int, c0: int
) -> None:
    """Add weight * diff^2 over the entries of ``diff`` (rows r0..., columns c0...) that lie in
    a diagonal tile of ``tiles`` rows to ``out[tile]``."""
    rows, cols = (r0 + np.arange(diff.shape[0])) // tiles, (c0 + np.arange(diff.shape[1])) // tiles
    for t in range(max(rows[0], cols[0]), min(rows[-1], cols[-1]) + 1):
        sub = diff[rows == t][:, cols == t]
        out[t] += weight * float(np.sum(sub * sub))


def _panels_from(
    dset: h5py.Dataset, n: int, k: int, start: int, rows: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    d = dset.shape[-1]
    for c0 in range(start, d, rows):
        c1 = min(d, c0 + rows)
        yield c0, c1, dset[n, k, c0:c1, :]


def load_matrix(dset: h5py.Dataset, n: int, k: int, memory_mb: int = DEFAULT_MEMORY_MB):
    """H = dset[n, k] as a float64 array if it fits into ``memory_mb``, else None."""
    d = dset.shape[-1]
    if d * d * 8 > max(1, memory_mb) << 20:
        return None
    return dset[n, k].astype(np.float64)


def matvec_operator(
    dset: h5py.Dataset, n: int, k: int, memory_mb: int = DEFAULT_MEMORY_MB
) -> Callable[[np.ndarray], np.ndarray]:
    """v (D,) or (D, P) -> H @ v for H = dset[n, k]: in memory when H fits, else streamed from
    the file in row panels (one pass over H per product)."""
    h = load_matrix(dset, n, k, memory_mb)
    if h is not None:
        return lambda v: h @ v
    b = panel_rows(dset, memory_mb)

    def matvec(v: np.ndarray) -> np.ndarray:
        out = np.zeros_like(v, dtype=np.float64)
        for r0, r1, panel in row_panels(dset, n, k, b):
            out[r0:r1] = panel.astype(np.float64) @ v
        return out

    return matvec


def block_average(
    dset: h5py.Dataset, n: int, k: int, size: int = 256, row_step: int = 1
) -> tuple[np.ndarray, int]:
    """H = dset[n, k] averaged over f x f blocks so that it is at most (size, size).

    Args:
        row_step: read only every ``row_step``-th panel of rows (for matrices too large to read
            within a time budget); a block then averages the rows that were read.

    Returns:
        The (ceil(D/f), ceil(D/f)) averaged matrix and the factor f (1 when D <= size); edge
        blocks average the entries they hold.
    """
    d = dset.shape[-1]
    f = max(1, -(-d // size))
    m = -(-d // f)
    out = np.zeros((m, m))
    row_counts = np.zeros(m)
    col_counts = np.zeros(m)
    np.add.at(col_counts, np.arange(d) // f, 1)
    rows = max(f, panel_rows(dset) // f * f)
    for r0, r1, panel in row_panels(dset, n, k, rows, row_step):
        p = panel.astype(np.float64)
        pad = np.zeros((r1 - r0, m * f))
        pad[:, :d] = p
        colsum = pad.reshape(r1 - r0, m, f).sum(-1)  # (R, m)
        np.add.at(out, np.arange(r0, r1) // f, colsum)
        np.add.at(row_counts, np.arange(r0, r1) // f, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return out / (row_counts[:, None] * col_counts[None, :]), f


SUMMARY = ("trace", "frobenius", "symmetry", "nonfinite")


def stored_stats(result) -> dict[str, np.ndarray]:
    """(N, K) trace, frobenius, symmetry and nonfinite of a result, as stored in the file.

    A file written before they were stored gets them by one streamed pass over each matrix
    (exact symmetry residual; ``nonfinite`` is -1 where a norm is not finite).
    """
    f = result.file
    if all(name in f for name in SUMMARY):
        return {name: f[name][()] for name in SUMMARY}
    n_samples, n_out = f["hessian"].shape[:2]
    out = {name: np.zeros((n_samples, n_out)) for name in SUMMARY}
    for n in range(n_samples):
        for k in range(n_out):
            st = matrix_stats(f["hessian"], n, k)
            out["trace"][n, k], out["frobenius"][n, k] = st.trace, st.frobenius
            out["symmetry"][n, k] = st.symmetry
            out["nonfinite"][n, k] = 0 if np.isfinite(st.frobenius) else -1
    out["nonfinite"] = out["nonfinite"].astype(np.int64)
    return out
