"""Matrix products whose result is known to be symmetric."""

from __future__ import annotations

from torch import Tensor


def symmetric_product(u: Tensor, w: Tensor) -> Tensor:
    """H = U W for U (..., D, F) and W (F, D) when H is known to be symmetric: one product.

    NOTE [symmetric product]: computing only the upper triangle (``triangle_product``: two
    halvings, 3 products and 2 copies, about 5/8 of the arithmetic) is what the symmetry offers.
    Measured: on the 2-core CPU it saved 25% of a product alone (single-threaded, D = 784,
    F = 256: 2.2-2.4 against 3.0-3.3 ms a matrix with 1-8 matrices; nothing with 64, bound by
    writing the output) but 0-12% of a whole call, for 27 more operations (slices and copies) a
    call; on an H200 it was slower (D = 784: 0.0140 against 0.0110 ms a matrix with 16
    matrices, 0.0099 against 0.0085 with 256; ``benchmarks/plans.py --symmetric``). So a call
    makes one product: 62 aten operations on the tanh MLP at D = 784, against 36 for a plain
    batched chain.

    Returns:
        (..., D, D).
    """
    return u @ w


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
