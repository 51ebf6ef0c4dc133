"""Matrix products whose result is known to be symmetric."""

from __future__ import annotations

from torch import Tensor


def symmetric_product(u: Tensor, w: Tensor) -> Tensor:
    """H = U W for U (..., D, F) and W (F, D) when H is known to be symmetric.

    NOTE [symmetric product]: on a CPU with few matrices (at most 16: the number is a
    measurement) of D >= 512 two halvings skip most of the lower triangle: rows [0, D/2) times
    all columns, rows [D/2, 3D/4) times columns [D/2, D), the last quarter times itself, and the
    skipped blocks
    are copied from their transposes: 3 products and 2 copies whatever D is (a fixed number of
    operations, not one per block). Single-threaded CPU time a matrix (``thread_time``), D = 784,
    F = 256: 2.2-2.4 ms against 3.0-3.3 ms for one product with 1-8 matrices, and the same
    (3.8 ms, bound by writing the output) with 64. On a GPU one product, one kernel, is faster
    (H200, D = 784: 0.0110 against 0.0140 ms a matrix with 16 matrices, 0.0085 against 0.0099
    with 256; ``benchmarks/plans.py --device cuda --symmetric``). The triangle adds 27 aten
    operations (slices and copies) to a call; with one product, a call on the tanh MLP at
    D = 784 makes 62, against 36 for a plain batched chain.

    Returns:
        (..., D, D).
    """
    if u.device.type != "cpu" or u.shape[:-2].numel() > 16 or w.shape[1] < 512:
        return u @ w
    return triangle_product(u, w)


def triangle_product(u: Tensor, w: Tensor) -> Tensor:
    """U W (..., D, D) computing about 5/8 of it and mirroring the rest (NOTE [symmetric
    product])."""
    d = w.shape[1]
    out = u.new_empty(*u.shape[:-2], d, d)
    lo = 0
    for level in range(3):
        hi = d if level == 2 else lo + (d - lo) // 2
        top = u[..., lo:hi, :] @ w[:, lo:]  # rows [lo, hi), columns [lo, D)
        out[..., lo:hi, lo:] = top
        if hi < d:
            out[..., hi:, lo:hi] = top[..., hi - lo :].mT
        lo = hi
    return out
