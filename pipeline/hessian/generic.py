"""Hessian rows of any ``torch.func``-transformable module: forward or reverse over reverse.

Row r of the Hessian of y_k at x is H_k e_r, the Hessian-vector product with a basis vector.
Forward over reverse computes it as ``jvp(grad y_k, (x,), (e_r,))``; reverse over reverse as
``vjp(grad y_k, x)(e_r)`` (H is symmetric). Both are ``vmap``-ed over the selected basis vectors,
the K outputs and the samples, so a block of rows is one batched computation, never a Python loop
over rows. Memory grows with the number of directions batched at once: ``max_directions`` bounds it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from .rules import differentiable_twice
from .targets import Target


def _flat_fn(model: nn.Module, target: Target, shape: torch.Size):
    """One sample's K scalars as a function of its flattened input: (D,), aux -> (K,)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(xf: Tensor, aux: Tensor) -> Tensor:
        z = functional_call(model, (params, buffers), (xf.view(shape).unsqueeze(0),))
        return target.select(z.squeeze(0), aux)

    return differentiable_twice(f)


def _basis(rows: Tensor, dim: int, like: Tensor) -> Tensor:
    """(R, D) unit vectors e_r for r in rows."""
    return torch.nn.functional.one_hot(rows.to(like.device), dim).to(like.dtype)


def forward_over_reverse(
    model: nn.Module, x: Tensor, target: Target, rows: Tensor, max_directions: int
) -> tuple[Tensor, Tensor]:
    """Hessian rows by ``vmap`` of ``jvp(jacrev(f))`` over basis vectors and samples.

    Args:
        model: maps (B, *S) to (B, C).
        x: inputs (N, *S).
        target: the K scalar functions of the output, aux first axis N.
        rows: (R,) long indices into the flattened input (D = prod(S)).
        max_directions: upper bound on samples x rows computed in one vectorized call.

    Returns:
        hessian (N, K, R, D) and gradient (N, K, D).
    """
    f = _flat_fn(model, target, x.shape[1:])
    jac = jacrev(f)  # (D,), aux -> (K, D)
    basis = _basis(rows, x[0].numel(), x)

    def one_sample(xf: Tensor, aux: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        def hvp(v: Tensor) -> tuple[Tensor, Tensor]:
            return jvp(lambda u: jac(u, aux), (xf,), (v,))

        g, h = vmap(hvp)(e)  # g (R, K, D) is the unbatched primal, expanded; h (R, K, D)
        return g[0], h.transpose(0, 1)

    return _batched(one_sample, x, target, basis, max_directions)


def reverse_over_reverse(
    model: nn.Module, x: Tensor, target: Target, rows: Tensor, max_directions: int
) -> tuple[Tensor, Tensor]:
    """Hessian rows by ``vmap`` of the ``vjp`` of ``jacrev(f)``: for ops without forward-mode AD.

    Same arguments and returns as :func:`forward_over_reverse`.
    """
    f = _flat_fn(model, target, x.shape[1:])
    jac = jacrev(f)
    basis = _basis(rows, x[0].numel(), x)

    def one_sample(xf: Tensor, aux: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        g, pullback = vjp(lambda u: jac(u, aux), xf)  # g (K, D)
        onehot_k = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)

        def row(ok: Tensor, er: Tensor) -> Tensor:
            return pullback(ok[:, None] * er[None, :])[0]

        h = vmap(lambda ok: vmap(lambda er: row(ok, er))(e))(onehot_k)  # (K, R, D)
        return g, h

    return _batched(one_sample, x, target, basis, max_directions)


def _batched(one_sample, x: Tensor, target: Target, basis: Tensor, max_directions: int):
    """Run ``one_sample`` over samples and basis vectors in chunks of at most max_directions."""
    n, r = x.shape[0], basis.shape[0]
    xf = x.reshape(n, -1)
    max_directions = max(1, int(max_directions))
    if r <= max_directions:
        try:
            return _samples_at_once(one_sample, xf, target, basis, max(1, max_directions // r))
        except RuntimeError as err:
            if "control flow" not in str(err):
                raise
            # The forward branches on the values of its input: vmap over samples cannot
            # follow that, so samples go one at a time below (only the rows are vmapped).
    grads, hess = [], []
    for s in range(n):  # one sample, rows in chunks
        parts = [
            one_sample(xf[s], target.aux[s], basis[c : c + max_directions])
            for c in range(0, r, max_directions)
        ]
        grads.append(parts[0][0])
        hess.append(torch.cat([h for _, h in parts], dim=1))
    return torch.stack(hess), torch.stack(grads)


def _samples_at_once(one_sample, xf: Tensor, target: Target, basis: Tensor, step: int):
    """Several whole samples per vectorized call."""
    grads, hess = [], []
    # The basis is batched over samples too (an expanded view, no copy): with an unbatched
    # cotangent, the double backward of some ops (layer_norm) adds a per-sample tensor in place
    # into a shared one, which vmap refuses.
    fn = vmap(one_sample)
    for s in range(0, xf.shape[0], step):
        xs = xf[s : s + step]
        g, h = fn(xs, target.aux[s : s + step], basis.expand(len(xs), *basis.shape))
        grads.append(g)
        hess.append(h)
    return torch.cat(hess), torch.cat(grads)
