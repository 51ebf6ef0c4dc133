"""A few exact eigenpairs of input Hessians: dense ``eigh`` for small D, block Lanczos beyond.

Small D (``dense_limit``, and one sample's K Hessians within the budget): the Hessians come from
the chosen method (``METHODS``), are symmetrised, and ``torch.linalg.eigh`` gives every
eigenpair; the k wanted ones are kept.

Larger D: block Lanczos with full reorthogonalisation, one independent problem per (sample,
output), all advanced together. Each step applies H to a block V of b orthonormal vectors by
exact Hessian-vector products, H v = jvp(grad y_k, (x,), (v,)) (forward over reverse; reverse
over reverse, vjp(grad y_k)(v), where an op lacks forward-mode AD), ``vmap``-ed over the
samples, the K outputs and the b vectors. Both the basis Q (D x m) and HQ are kept, so the
Rayleigh quotient T = Q^T H Q is assembled exactly from the products (no reliance on the
three-term recurrence), and the next block is HV orthogonalised twice against all of Q (classical
Gram-Schmidt twice) and then among itself (QR); a column that vanishes there (the Krylov space
became invariant) is replaced by a random one, which keeps Q orthonormal. The Ritz pairs
(theta, Q y) of T are the estimates, and since H Q is at hand their residuals
||H Q y - theta Q y|| are the true residuals of the returned pairs, not an estimate from the
recurrence. It stops when the k wanted pairs of every problem have residual <= tol * |lambda|_max
(the largest |Ritz value| of the problem), or when the basis reaches its limit (D, ``max_krylov``
or the budget): then it warns and returns the residuals as they are. With m = D the Ritz pairs
are the exact eigenpairs.

Mass weighting (``masses``: m_i per coordinate, e.g. each atom's mass repeated for x, y, z): the
eigenpairs of M^-1/2 H M^-1/2 with M = diag(m), whose eigenvalues are the squared angular
frequencies of the normal modes and whose eigenvectors are the modes in mass-weighted
coordinates (the Cartesian displacement of a mode is M^-1/2 v, up to its norm). The dense path
weights each Hessian before ``eigh``; Lanczos applies M^-1/2 H M^-1/2 v = w * H (w * v) with
w = m^-1/2, so nothing else changes (residuals are those of the weighted operator).

Memory: the basis and its image, 2 m D numbers per problem, plus the products' working set;
never D x D per sample on the Lanczos path.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from . import caches, double_backward
from .allocator import CALLER, reusing_large_buffers
from .diagonal import eval_mode
from .errors import ArgumentError
from .generic import _flat_fn
from .methods import _directions, choose_method, default_memory_budget
from .rows import select_rows
from .targets import Target

WHICH = ("LM", "LA", "SA")
DENSE_LIMIT = 2048
MAX_KRYLOV = 1024  # basis vectors per problem, unless the budget allows fewer


@reusing_large_buffers
def eigen(
    model: nn.Module,
    x: Tensor,
    target: Target,
    k: int,
    which: str = "LM",
    tol: float = 1e-8,
    budget: int | None = None,
    method: str = "auto",
    *,
    dense_limit: int = DENSE_LIMIT,
    max_krylov: int | None = None,
    seed: int = 0,
    masses: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """k eigenpairs of each sample's Hessian of each output (with ``masses``: of its
    mass-weighted Hessian M^-1/2 H M^-1/2).

    Args:
        model: maps (B, *S) to (B, C); used in eval mode for the call.
        x: inputs (N, *S); target: the K scalar functions of the output (``make_target``).
        k: how many eigenpairs, 1 <= k <= D.
        which: ``"LM"`` largest magnitude, ``"LA"`` largest algebraic, ``"SA"`` smallest
            algebraic.
        tol: Lanczos stops when every residual <= tol * |lambda|_max; a tol below 100 machine
            epsilons of x's dtype is taken as that (the products are no more accurate).
        budget: bytes of working memory (default: ``default_memory_budget`` of x's device).
        method: the method of the dense Hessians (``"auto"`` or a name in ``METHODS``); on the
            Lanczos path ``"reverse_over_reverse"`` selects reverse-mode products, any other
            value forward over reverse (falling back to reverse mode where that fails).
        dense_limit: the largest D for the dense path (0: always Lanczos).
        max_krylov: the most basis vectors per problem (default ``MAX_KRYLOV``, at most D).
        seed: of the Lanczos start blocks (the results are deterministic for a seed).
        masses: positive masses per input coordinate, (D,) for every sample or (N, D); None:
            the Hessian itself.

    Returns:
        values (N, K, k), ordered by ``which`` (LM: decreasing |lambda|; LA: decreasing; SA:
        increasing); vectors (N, K, k, D), unit norm, the entry of largest magnitude positive;
        residuals (N, K, k) = ||H v - lambda v||. x's dtype and device.

    Raises:
        ArgumentError: k outside 1..D (``k``), an unknown ``which`` or a negative ``tol``, or an
            unknown method or one that does not support the model (``method``), masses of
            another shape or not positive and finite (``masses``).
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ArgumentError("x must be a batch (N, *S) of inputs", "x")
    caches.check(model)
    d = x.shape[1:].numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
        raise ArgumentError(f"k must be an integer in 1..D = {d}, got {k!r}", "k")
    if which not in WHICH:
        raise ArgumentError(f"which must be one of {list(WHICH)}, got {which!r}", "which")
    if not tol >= 0:
        raise ArgumentError(f"tol must be >= 0, got {tol!r}", "tol")
    weights = _mass_weights(masses, x)
    budget = budget or default_memory_budget(x.device)
    with eval_mode(model):
        choice = choose_method(method, model, target, x, checked=True)
        n_out = target.n_outputs
        if d <= dense_limit and 3 * n_out * d * d * x.element_size() <= budget:
            return _dense(choice.compute, model, x, target, k, which, budget, weights)
        reverse = method == "reverse_over_reverse"
        return _lanczos(model, x, target, k, which, tol, budget, max_krylov, seed, reverse,
                        weights, autograd=choice.name == "autograd")  # fmt: skip


def _mass_weights(masses: Tensor | None, x: Tensor) -> Tensor | None:
    """w = masses^-1/2 as (N, D) in x's dtype and device, or None."""
    if masses is None:
        return None
    n, d = x.shape[0], x.shape[1:].numel()
    m = torch.as_tensor(masses)
    if m.shape not in ((d,), (n, d)):
        raise ArgumentError(
            f"masses must have shape ({d},) or ({n}, {d}) (one per input coordinate), got "
            f"{tuple(m.shape)}",
            "masses",
        )
    m = m.to(device=x.device, dtype=x.dtype)
    if not bool(torch.isfinite(m).all()) or not bool((m > 0).all()):
        raise ArgumentError("masses must be positive and finite", "masses")
    return m.rsqrt().expand(n, d)


# --- dense ---------------------------------------------------------------------------------


def _dense(compute, model, x: Tensor, target: Target, k: int, which: str, budget: int,
           weights: Tensor | None = None):  # fmt: skip
    n, d, n_out = x.shape[0], x.shape[1:].numel(), target.n_outputs
    step = max(1, budget // (3 * n_out * d * d * x.element_size()))
    values, vectors, residuals = [], [], []
    rows = select_rows(None, d, x.device)
    for s in range(0, n, step):
        h, _ = compute(model, x[s : s + step], target.subset(s, s + step), rows, budget)
        h = (h + h.mT) / 2
        if weights is not None:  # M^-1/2 H M^-1/2
            w = weights[s : s + step, None]  # (b, 1, D)
            h = w.unsqueeze(-1) * h * w.unsqueeze(-2)
        theta, y = torch.linalg.eigh(h)  # ascending; columns of y
        idx = _select(theta, which, k)
        lam = theta.gather(-1, idx)
        vec = y.gather(-1, idx.unsqueeze(-2).expand(*y.shape[:-1], k)).mT  # (b, K, k, D)
        vec = _fix_sign(vec)
        res = (vec @ h - lam.unsqueeze(-1) * vec).norm(dim=-1)  # H symmetric: (H v)^T = v^T H
        values.append(lam)
        vectors.append(vec)
        residuals.append(res)
    return torch.cat(values), torch.cat(vectors), torch.cat(residuals)


def _select(theta: Tensor, which: str, k: int) -> Tensor:
    """Indices (..., k) of the wanted values of ascending ``theta`` (..., m), in their order."""
    m = theta.shape[-1]
    if which == "SA":
        return torch.arange(k, device=theta.device).expand(*theta.shape[:-1], k)
    if which == "LA":
        return torch.arange(m - 1, m - 1 - k, -1, device=theta.device).expand(*theta.shape[:-1], k)
    return theta.abs().argsort(dim=-1, descending=True, stable=True)[..., :k]


def _fix_sign(vec: Tensor) -> Tensor:
    """Each vector (..., D) with its entry of largest magnitude made positive."""
    top = vec.gather(-1, vec.abs().argmax(-1, keepdim=True))
    return vec * torch.where(top < 0, -1.0, 1.0).to(vec.dtype)


# --- block Lanczos -------------------------------------------------------------------------


def _products(model: nn.Module, target: Target, shape: torch.Size, reverse: bool):
    """(xf (n, D), aux (n, ...), V (n, K, b, D)) -> H_k v for every sample, output and vector."""
    f = _flat_fn(model, target, shape)

    def phi(u: Tensor, aux: Tensor, w: Tensor) -> Tensor:  # y_k as <w, y> with w one-hot
        return (f(u, aux) * w).sum()

    dphi = grad(phi)

    def forward(u, aux, w, v):
        return jvp(lambda u_: dphi(u_, aux, w), (u,), (v,))[1]

    def backward(u, aux, w, v):
        return vjp(lambda u_: dphi(u_, aux, w), u)[1](v)[0]

    def batched(one):
        per_vector = vmap(one, in_dims=(None, None, None, 0))
        per_output = vmap(per_vector, in_dims=(None, None, 0, 0))
        return vmap(per_output, in_dims=(0, 0, None, 0))

    state = {"fn": batched(backward if reverse else forward), "reverse": reverse}

    def apply(xf: Tensor, aux: Tensor, v: Tensor) -> Tensor:
        eye = torch.eye(v.shape[1], dtype=xf.dtype, device=xf.device)
        try:
            return state["fn"](xf, aux, eye, v)
        except (RuntimeError, NotImplementedError):
            if state["reverse"]:
                raise
            state["fn"], state["reverse"] = batched(backward), True  # no forward-mode AD
            return state["fn"](xf, aux, eye, v)

    return apply


def _autograd_products(model: nn.Module, x: Tensor, target: Target):
    """``_products``' signature over ``double_backward.products`` of the samples x (n, *S): for
    models only plain autograd takes (their gradient graphs built once per chunk)."""
    apply = double_backward.products(model, x, target)
    return lambda _xf, _aux, v: apply(v)


def _lanczos(model, x, target, k, which, tol, budget, max_krylov, seed, reverse, weights=None,
             autograd=False):  # fmt: skip
    n, d, n_out = x.shape[0], x.shape[1:].numel(), target.n_outputs
    block = min(d, max(k, 2))
    per_direction = max(1, _directions(model, x, n_out, budget))  # (sample, vector) pairs
    step = max(1, min(n, per_direction // block))
    item = x.element_size()
    limit = min(d, max_krylov or MAX_KRYLOV, max(block, budget // (4 * step * n_out * d * item)))
    limit = max(block, limit)
    tol = max(tol, 100 * torch.finfo(x.dtype).eps)
    apply = None if autograd else _products(model, target, x.shape[1:], reverse)
    gen = torch.Generator().manual_seed(seed)
    out, short = ([], [], []), []
    for s in range(0, n, step):
        xf = x[s : s + step].reshape(-1, d)
        aux = target.aux[s : s + step]
        if autograd:
            apply = _autograd_products(model, x[s : s + step], target.subset(s, s + step))
        products = apply if weights is None else _weighted(apply, weights[s : s + step])
        with torch.no_grad():
            part = _block_lanczos(products, xf, aux, n_out, k, which, tol, block, limit, gen)
        for acc, t in zip(out, part[:3], strict=True):
            acc.append(t)
        if part[3] is not None:
            short.append(part[3])
    if short:
        m, worst = min(s[0] for s in short), max(s[1] for s in short)
        warnings.warn(
            f"eigen: block Lanczos stopped at its Krylov limit of {m} vectors before reaching "
            f"tol={tol:g} (largest residual {worst:.2e} x |lambda|_max); the residuals say how "
            "far each pair is from exact (raise max_krylov or the budget)",
            stacklevel=CALLER + 1,  # (eigen -> _lanczos)
        )
    return tuple(torch.cat(t) for t in out)


def _weighted(apply, w: Tensor):
    """The products of M^-1/2 H M^-1/2: w * H (w * v) for weights w (n, D) of n samples."""
    w = w[:, None, None, :]  # against V (n, K, b, D)

    def weighted(xf: Tensor, aux: Tensor, v: Tensor) -> Tensor:
        return apply(xf, aux, v * w) * w

    return weighted


def _block_lanczos(apply, xf, aux, n_out, k, which, tol, block, limit, gen):
    """One chunk of samples: values (n, K, k), vectors (n, K, k, D), residuals (n, K, k), and
    (basis size, largest relative residual) where it stopped short of tol, else None.

    Vectors are rows: the basis Q (B, m, D) and its image HQ (B, m, D), in buffers that double
    as they fill (memory follows the basis actually built, not ``limit``)."""
    n, d = xf.shape
    bsz = n * n_out  # independent problems, ordered (sample, output)

    def hv(v: Tensor) -> Tensor:  # (B, b, D) -> (B, b, D)
        return apply(xf, aux, v.reshape(n, n_out, -1, d)).reshape(bsz, -1, d)

    cap = min(limit, 8 * block)
    q, hq = xf.new_empty(bsz, cap, d), xf.new_empty(bsz, cap, d)
    t = xf.new_zeros(bsz, limit, limit)
    v = _orthonormal_block(None, _random(gen, bsz, block, d, xf), gen, xf.new_zeros(bsz))
    m = 0
    while True:
        b = v.shape[1]
        if m + b > cap:
            cap = min(limit, 2 * cap)
            q, hq = _grown(q, cap), _grown(hq, cap)
        w = hv(v)
        q[:, m : m + b], hq[:, m : m + b] = v, w
        t[:, : m + b, m : m + b] = q[:, : m + b] @ w.mT
        t[:, m : m + b, :m] = t[:, :m, m : m + b].mT
        m += b
        tm = t[:, :m, :m]
        theta, y = torch.linalg.eigh((tm + tm.mT) / 2)
        idx = _select(theta, which, min(k, m))
        lam = theta.gather(-1, idx)
        ys = y.gather(-1, idx.unsqueeze(-2).expand(bsz, m, idx.shape[-1])).mT  # (B, k, m)
        vec = ys @ q[:, :m]  # (B, k, D)
        res = (ys @ hq[:, :m] - lam.unsqueeze(-1) * vec).norm(dim=-1)  # (B, k)
        scale = theta.abs().amax(-1)
        done = m >= k and bool((res <= tol * scale.unsqueeze(-1)).all())
        if done or m + 1 > limit or m >= d:
            break
        nxt = min(block, limit - m, d - m)
        v = _orthonormal_block(q[:, :m], w[:, :nxt], gen, scale)
    short = None
    if not done and m < d:
        worst = float((res / scale.clamp_min(torch.finfo(res.dtype).tiny).unsqueeze(-1)).max())
        short = (m, worst)
    shape = (n, n_out, k)
    return lam.reshape(shape), _fix_sign(vec).reshape(*shape, d), res.reshape(shape), short


def _grown(buf: Tensor, cap: int) -> Tensor:
    out = buf.new_empty(buf.shape[0], cap, buf.shape[2])
    out[:, : buf.shape[1]] = buf
    return out


def _random(gen: torch.Generator, bsz: int, b: int, d: int, like: Tensor) -> Tensor:
    return torch.randn(bsz, b, d, generator=gen, dtype=like.dtype).to(like.device)


def _orthonormal_block(q: Tensor | None, w: Tensor, gen, scale: Tensor) -> Tensor:
    """Rows w (B, b, D) orthogonalised twice against the rows of q (B, m, D) and made
    orthonormal; rows that vanish (relative to ``scale``, or to their norm before) are replaced
    by random ones."""
    eps = torch.finfo(w.dtype).eps
    for _ in range(4):
        before = w.norm(dim=-1)
        if q is not None:
            for _ in range(2):
                w = w - (w @ q.mT) @ q
        v, r = torch.linalg.qr(w.mT)
        kept = r.diagonal(dim1=-2, dim2=-1).abs()
        small = kept <= eps**0.5 * torch.maximum(before, scale.unsqueeze(-1))
        if not bool(small.any()):
            return v.mT
        w = torch.where(small.unsqueeze(-1), _random(gen, *w.shape, w), w)
    raise RuntimeError("eigen: could not extend the Krylov basis with independent vectors")
