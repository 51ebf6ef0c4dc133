"""Exact input Hessians of piecewise-linear networks (ReLU, LeakyReLU, max-pool, affine layers).

Such a network is affine on each linear region, so almost everywhere z(x) has zero second
derivative: the Hessian of a logit is exactly zero, and the Hessian of a loss l(z(x)) is

    H = J^T A J,    J = dz/dx (C, D),  A = d^2 l / dz^2 (C, C),

C backward passes (``vmap`` of ``jacrev`` over samples) and one matrix product instead of D
Hessian-vector products. Rows: H[rows] = J[:, rows]^T A J.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from .structure import is_piecewise_linear
from .structured import output_derivatives
from .targets import Target


def unsupported(model: nn.Module, target: Target) -> str | None:
    """None for a piecewise-linear ``nn.Sequential``, else the reason it is not one."""
    del target
    if not is_piecewise_linear(model):
        return "not a Sequential of affine and piecewise-linear layers (ReLU, max-pool, ...)"
    return None


def output_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """J = dz/dx for each sample: (N, C, D), by ``vmap`` over samples of ``jacrev``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    shape = x.shape[1:]

    def f(xf: Tensor) -> Tensor:
        return functional_call(model, (params, buffers), (xf.view(shape).unsqueeze(0),))[0]

    return vmap(jacrev(f))(x.reshape(x.shape[0], -1))


def compute(
    model: nn.Module, x: Tensor, target: Target, rows: Tensor, memory_budget: int
) -> tuple[Tensor, Tensor]:
    """Hessian rows (N, K, R, D) and gradients (N, K, D) of a piecewise-linear network.

    Logit targets return zeros without differentiating twice; loss targets J[:, rows]^T A J.
    Samples are processed in chunks of about ``memory_budget`` bytes.
    """
    n, d, r, k = x.shape[0], x[0].numel(), len(rows), target.n_outputs
    with torch.no_grad():
        c = model(x[:1]).shape[-1]
    per_sample = (8 * c * d + 2 * k * r * d) * x.element_size()
    step = max(1, memory_budget // per_sample)
    hess, grads = [], []
    for s in range(0, n, step):
        xs = x[s : s + step]
        sub = target.subset(s, s + xs.shape[0])
        jac = output_jacobian(model, xs)  # (n, C, D)
        with torch.no_grad():
            g_z, a, diag = output_derivatives(model(xs), sub)
            grads.append(g_z @ jac)  # (n, K, D)
            if a is None:
                hess.append(x.new_zeros(xs.shape[0], k, r, d))
                continue
            jr = jac[:, :, rows].mT.unsqueeze(1)  # (n, 1, R, C)
            left = jr * a.unsqueeze(2) if diag else jr @ a  # (n, K, R, C)
            hess.append(left @ jac.unsqueeze(1))
    return torch.cat(hess), torch.cat(grads)
