"""Extreme eigenvalues of a symmetric operator known only through matrix-vector products.

The Lanczos iteration builds an orthonormal basis Q (m, D) of the Krylov space
span{q, Hq, ..., H^(m-1) q} and the tridiagonal T = Q H Q^T (m, m); the eigenvalues of T (Ritz
values) converge to the extreme eigenvalues of H first. Full reorthogonalisation (twice, against all
previous vectors) keeps Q orthonormal in floating point, so no spurious copies of converged
eigenvalues appear; it costs O(m^2 D) flops and m x D floats, small next to m products with a
streamed (D, D) Hessian. With m >= D the Ritz values are all eigenvalues.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def lanczos(
    matvec: Callable[[np.ndarray], np.ndarray],
    dim: int,
    steps: int,
    seed: int = 0,
    deadline: float | None = None,
) -> np.ndarray:
    """Ritz values of a symmetric (dim, dim) operator after ``steps`` Lanczos steps.

    Args:
        matvec: v (D,) -> H @ v (D,), H symmetric.
        dim: D.
        steps: Krylov dimension m (at most D); stops early on an invariant subspace.
        seed: seed of the random start vector.
        deadline: ``time.monotonic()`` after which no further step starts (at least one runs).

    Returns:
        (m',) Ritz values in ascending order, m' <= m (float64).
    """
    steps = max(1, min(steps, dim))
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(dim)
    basis = np.zeros((steps, dim))
    basis[0] = q / np.linalg.norm(q)
    alpha, beta = [], []
    scale = 0.0
    for j in range(steps):
        w = np.asarray(matvec(basis[j]), dtype=np.float64).reshape(dim)
        alpha.append(float(basis[j] @ w))
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = float(np.linalg.norm(w))
        scale = max(scale, abs(alpha[-1]), b)
        late = deadline is not None and time.monotonic() > deadline
        if j + 1 == steps or b <= 1e-12 * max(scale, 1e-300) or late:
            break
        beta.append(b)
        basis[j + 1] = w / b
    t = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    return np.linalg.eigvalsh(t)


def top_eigenvalues(
    matvec: Callable[[np.ndarray], np.ndarray],
    dim: int,
    k: int = 20,
    steps: int | None = None,
    seed: int = 0,
    deadline: float | None = None,
) -> np.ndarray:
    """The ``k`` Ritz values of largest magnitude, descending by value.

    Args:
        matvec: v (D,) -> H @ v, H symmetric.
        dim: D.
        k: how many eigenvalues.
        steps: Lanczos steps; default min(D, max(3k, k + 40)).
        seed: seed of the start vector.
        deadline: see :func:`lanczos` (fewer steps: the largest converge first).

    Returns:
        (min(k, m),) eigenvalue estimates, sorted descending.
    """
    steps = steps or min(dim, max(3 * k, k + 40))
    ritz = lanczos(matvec, dim, steps, seed, deadline)
    top = ritz[np.argsort(-np.abs(ritz))[:k]]
    return np.sort(top)[::-1]
