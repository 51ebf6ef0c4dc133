"""Curvature M = d^2 y / dv^2 at a tensor v of the graph, and how one step changes it.

M is per sample and per output: zero (a linear head, and everything above the first nonlinear
step from the top), diagonal (N, K, F) (elementwise steps on a zero or diagonal M), or dense
(N, K, F, F). The planner and the executor share ``transition``, so that they agree on the kind of
M after every step and on what the step costs.

Fast steps (one step between two cuts) and their rules, for y = f(v) and M = M_y:

* elementwise s:   M_v = diag(s') M diag(s') + diag(s'' g)
* constant scale:  M_v = diag(c) M diag(c)
* reshape:         M_v = M (the identity on flat features)
* dense W:         M_v = W^T M W
* LayerNorm over the whole sample: M_v = J^T M J + C with J = diag(gamma) Q / sigma,
  Q = I - (1 1^T + x^ x^T) / E, and C its curvature (``rules.LayerNorm``), as double centering
  and a few rank-one updates of M (no identity-seeded sweep)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .products import symmetric_product
from .rows import Rows
from .rules import ELEMENTWISE_MACS, Dense, Elementwise, LayerNorm, Reshape, Rule, Scale

ZERO, DIAG, DENSE = "zero", "diag", "dense"


@dataclass
class Curvature:
    """M at one tensor: ``kind`` and its value (None, (N, K, F) or (N, K, F, F))."""

    kind: str
    value: Tensor | None = None

    @staticmethod
    def zero() -> Curvature:
        return Curvature(ZERO)


def is_fast(rule: Rule) -> bool:
    """Whether M passes through this step by a closed-form rule (see module doc)."""
    if isinstance(rule, (Elementwise, Scale, Reshape)):
        return len(rule.shapes_in) == 1 and rule.shapes_in[0] == rule.shape_out
    if isinstance(rule, LayerNorm):
        return rule.m == len(rule.shape_out)  # one group: the whole sample
    return isinstance(rule, Dense) and rule.flat


def transition(rule: Rule, kind: str, k: int) -> tuple[str, int]:
    """The kind of M below a fast step, and the step's multiply-adds per sample."""
    f = rule.f_out
    if isinstance(rule, Reshape):
        return kind, 0
    if isinstance(rule, Elementwise):
        if kind == ZERO:
            return (ZERO, 0) if not rule.curved else (DIAG, k * f * ELEMENTWISE_MACS)
        return kind, k * f * (f if kind == DENSE else 1) * ELEMENTWISE_MACS
    if isinstance(rule, Scale):
        if kind == ZERO or rule.factor is None:
            return kind, 0
        return kind, k * f * (f if kind == DENSE else 1) * ELEMENTWISE_MACS
    if isinstance(rule, LayerNorm):
        return DENSE, k * f * f * ELEMENTWISE_MACS * (3 if kind == ZERO else 8)
    # Dense W (F_out, F_in)
    f_in = rule.f_in
    if kind == ZERO:
        return ZERO, 0
    if kind == DIAG:
        return DENSE, k * f * f_in * f_in
    return DENSE, k * f * f_in * (f + f_in)


def through(rule: Rule, m: Curvature, g: Tensor | None) -> Curvature:
    """M below a fast step, from M above it and g = dy/d(output of the step) (N, K, *s)."""
    kind, _ = transition(rule, m.kind, 1)
    if kind == ZERO:
        return Curvature.zero()
    if isinstance(rule, Reshape) or (isinstance(rule, Scale) and rule.factor is None):
        return m  # the identity on flat features (an added constant)
    if isinstance(rule, Elementwise):
        n = rule.d1.shape[0]
        d1 = rule.d1.reshape(n, 1, -1)
        c = rule.curvature(g).reshape(n, g.shape[1], -1) if rule.curved else None
        if m.kind == ZERO:
            return Curvature(DIAG, c)
        if m.kind == DIAG:
            value = d1 * d1 * m.value
            return Curvature(DIAG, value if c is None else value + c)
        value = d1.unsqueeze(-1) * m.value * d1.unsqueeze(-2)
        if c is not None:
            value.diagonal(dim1=-2, dim2=-1).add_(c)
        return Curvature(DENSE, value)
    if isinstance(rule, Scale):
        c = rule.flat_factor(m.value).unsqueeze(1)  # (N or 1, 1, F)
        if m.kind == DIAG:
            return Curvature(DIAG, c * c * m.value)
        return Curvature(DENSE, c.unsqueeze(-1) * m.value * c.unsqueeze(-2))
    if isinstance(rule, LayerNorm):
        return Curvature(DENSE, _layer_norm(rule, m, g))
    w = rule.weight  # Dense
    if m.kind == DIAG:
        return Curvature(DENSE, symmetric_product((m.value.unsqueeze(-1) * w).mT, w))
    return Curvature(DENSE, symmetric_product((m.value @ w).mT, w))  # (M W)^T W = W^T M W


def rows_of(m: Curvature, rows: Rows, like: Tensor) -> Tensor | None:
    """M[rows] as (N, K, R, F) (None for a zero M); all rows of a dense M are M itself, not a
    copy (a copy of every block's Hessians cost a third of a small-D MLP's call)."""
    if m.kind == ZERO:
        return None
    if m.kind == DENSE:
        return m.value if rows.full else m.value.index_select(-2, rows.index)
    index = rows.index
    eye = (index.unsqueeze(-1) == torch.arange(m.value.shape[-1], device=index.device)).to(like)
    return eye * m.value.unsqueeze(2)


def _layer_norm(rule: LayerNorm, m: Curvature, g: Tensor) -> Tensor:
    """J^T M J + C of a LayerNorm over the whole sample (see ``rules.LayerNorm``): (N, K, F, F).

    With c = gamma / sigma, A' = diag(c) M diag(c), P = [1, x^] and Q = I - P P^T / E:
    J^T M J = Q A' Q = A' - P Z^T - Y P^T / E with Y = A' P, Z = Y / E - P (P^T Y)^T / E^2, and
    C = (-(a x^T + x^ a^T) + 3 s x^ x^T / E - s I + s 1 1^T / E) / (E sigma^2). So the result
    is A' plus a product of rank 7 plus a diagonal: M is read once (for Y) and the result
    written twice (A', then A' + U V^T in place), where double centering took a dozen passes.
    """
    n, k = g.shape[:2]
    xhat = rule.xhat.reshape(n, 1, -1)  # (N, 1, F)
    e = xhat.shape[-1]
    inv = rule.inv.reshape(n, 1, 1)
    f = inv * inv / e  # 1 / (E sigma^2)
    gamma = None if rule.weight is None else rule.weight.reshape(-1)
    gg = g.reshape(n, k, e) if gamma is None else g.reshape(n, k, e) * gamma
    a = gg - gg.mean(-1, keepdim=True)  # P (gamma g)
    s = (a * xhat).sum(-1, keepdim=True) * f  # <a, x^> / (E sigma^2)
    xb, ones = xhat.expand(n, k, e), torch.ones_like(a)
    left, right = [a, xb, ones], [-xb * f, 3 * s * xb / e - a * f, s * ones / e]
    out, diag = None, None
    if m.kind != ZERO:
        c = inv.expand(n, 1, e) if gamma is None else inv * gamma  # (N, 1, F)
        p = torch.stack([torch.ones_like(xhat), xhat], -1)  # (N, 1, F, 2)
        if m.kind == DENSE:
            y = c.unsqueeze(-1) * (m.value @ (c.unsqueeze(-1) * p))  # A' P (N, K, F, 2)
            out = c.unsqueeze(-1) * m.value * c.unsqueeze(-2)  # A'
        else:
            diag = c * c * m.value  # A' = diag(c^2 M)
            y = diag.unsqueeze(-1) * p
        z = y / e - p @ (p.mT @ y).mT / (e * e)
        pk = p.expand(n, k, e, 2)
        left += [pk[..., 0], pk[..., 1], y[..., 0], y[..., 1]]
        right += [-z[..., 0], -z[..., 1], -pk[..., 0] / e, -pk[..., 1] / e]
    u, v = torch.stack(left, -1), torch.stack(right, -1)  # (N, K, F, r)
    if out is None:
        out = u @ v.mT
    else:
        flat = (n * k, e, -1)
        out = torch.baddbmm(out.reshape(n * k, e, e), u.reshape(flat), v.reshape(flat).mT)
        out = out.reshape(n, k, e, e)
    d = out.diagonal(dim1=-2, dim2=-1)
    d.sub_(s)
    if diag is not None:
        d.add_(diag)
    return out
