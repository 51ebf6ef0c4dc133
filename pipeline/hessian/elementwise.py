"""Elementwise functions s(a) with closed-form first and second derivatives.

Each entry takes the pre-activations ``a`` and the function's own parameters (``beta``,
``negative_slope``, ...) and returns (s'(a), s''(a)), shaped like ``a``. Functions whose second
derivative is zero almost everywhere are listed in ``PIECEWISE_LINEAR``: they never carry
curvature, so a network built from them and affine maps has zero logit Hessians.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Derivatives = Callable[..., tuple[Tensor, Tensor]]


# The derivatives of tanh and sigmoid are made in one pass each: ``addcmul`` (x + v y z) writes
# one new tensor where the operations written out made three passes (a PINN layer: 15 us for
# 1 - t^2 against 33 us). On the 2-core VM a fresh allocation of a batch's activations costs
# page faults.


def _tanh(a: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    t = torch.tanh(a) if out is None else out
    d1 = torch.addcmul(t.new_ones(()), t, t, value=-1)  # 1 - t^2
    return d1, torch.addcmul(t.new_zeros(()), t, d1, value=-2)  # -2 t (1 - t^2)


def _sigmoid(a: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    p = torch.sigmoid(a) if out is None else out
    d1 = torch.addcmul(p, p, p, value=-1)  # p (1 - p)
    return d1, torch.addcmul(d1, p, d1, value=-2)  # (1 - 2 p) p (1 - p)


def _softplus(a: Tensor, beta: float = 1.0, threshold: float = 20.0) -> tuple[Tensor, Tensor]:
    linear = beta * a > threshold  # torch switches to the identity there
    p = torch.sigmoid(beta * a)
    d1 = torch.where(linear, torch.ones_like(a), p)
    d2 = torch.where(linear, torch.zeros_like(a), beta * p * (1 - p))
    return d1, d2


def _gelu(a: Tensor, approximate: str = "none") -> tuple[Tensor, Tensor]:
    if approximate == "tanh":
        k, c = math.sqrt(2 / math.pi), 0.044715
        u = k * (a + c * a**3)
        du = k * (1 + 3 * c * a * a)
        d2u = 6 * k * c * a
        t = torch.tanh(u)
        sech2 = 1 - t * t
        d1 = 0.5 * (1 + t) + 0.5 * a * sech2 * du
        return d1, sech2 * du + 0.5 * a * sech2 * (d2u - 2 * t * du * du)
    phi = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
    return cdf + a * phi, phi * (2 - a * a)


def _silu(a: Tensor) -> tuple[Tensor, Tensor]:
    p = torch.sigmoid(a)
    return p * (1 + a * (1 - p)), p * (1 - p) * (2 + a * (1 - 2 * p))


def _elu(a: Tensor, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    pos = a > 0
    e = alpha * torch.exp(torch.clamp(a, max=0))
    return torch.where(pos, torch.ones_like(a), e), torch.where(pos, torch.zeros_like(a), e)


def _piecewise(slope_below: Tensor | float, lo: float = 0.0, hi: float | None = None):
    def derivatives(a: Tensor) -> tuple[Tensor, Tensor]:
        inside = a > lo
        if hi is not None:
            inside = inside & (a < hi)
        below = slope_below if isinstance(slope_below, Tensor) else torch.full_like(a, slope_below)
        return torch.where(inside, torch.ones_like(a), below), torch.zeros_like(a)

    return derivatives


def _relu(a: Tensor) -> tuple[Tensor, Tensor]:
    return _piecewise(0.0)(a)


def _leaky_relu(a: Tensor, negative_slope: float = 0.01) -> tuple[Tensor, Tensor]:
    return _piecewise(negative_slope)(a)


def _prelu(a: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """One slope, or one per channel: axis 1 of ``a`` (N, C, ...)."""
    slope = weight.reshape(-1, *[1] * (a.dim() - 2)) if weight.numel() > 1 else weight
    return torch.where(a > 0, torch.ones_like(a), slope.expand_as(a)), torch.zeros_like(a)


def _hardtanh(a: Tensor, min_val: float = -1.0, max_val: float = 1.0) -> tuple[Tensor, Tensor]:
    inside = (a > min_val) & (a < max_val)
    return inside.to(a.dtype), torch.zeros_like(a)


def _relu6(a: Tensor) -> tuple[Tensor, Tensor]:
    return _hardtanh(a, 0.0, 6.0)


def _hardsigmoid(a: Tensor) -> tuple[Tensor, Tensor]:
    """relu6(a + 3) / 6."""
    inside = (a > -3) & (a < 3)
    return inside.to(a.dtype) / 6, torch.zeros_like(a)


def _hardswish(a: Tensor) -> tuple[Tensor, Tensor]:
    """a relu6(a + 3) / 6: a (a + 3) / 6 on (-3, 3), a above, 0 below."""
    inside = (a > -3) & (a < 3)
    d1 = torch.where(inside, (2 * a + 3) / 6, (a >= 3).to(a.dtype))
    return d1, torch.where(inside, torch.full_like(a, 1 / 3), torch.zeros_like(a))


def _abs(a: Tensor) -> tuple[Tensor, Tensor]:
    return torch.sign(a), torch.zeros_like(a)


def _exp(a: Tensor) -> tuple[Tensor, Tensor]:
    e = torch.exp(a)
    return e, e


def _log(a: Tensor) -> tuple[Tensor, Tensor]:
    r = 1 / a
    return r, -r * r


def _sin(a: Tensor) -> tuple[Tensor, Tensor]:
    return torch.cos(a), -torch.sin(a)


def _cos(a: Tensor) -> tuple[Tensor, Tensor]:
    return -torch.sin(a), -torch.cos(a)


def _pow(a: Tensor, exponent: float) -> tuple[Tensor, Tensor]:
    if exponent == 2:
        return 2 * a, torch.full_like(a, 2.0)
    return exponent * a ** (exponent - 1), exponent * (exponent - 1) * a ** (exponent - 2)


def _sqrt(a: Tensor) -> tuple[Tensor, Tensor]:
    return _pow(a, 0.5)


def norm_root(a: Tensor) -> Tensor:
    """sqrt(a) of a sum of squares a >= 0: the last step of a 2-norm as the graph records it
    (NOTE [norms] in ``graph``)."""
    return torch.sqrt(a)


def _norm_root(a: Tensor) -> tuple[Tensor, Tensor]:
    """sqrt's derivatives, taken as zero at a = 0 (the zero vector, where torch's norm takes the
    gradient zero) instead of infinite."""
    positive = a > 0
    safe = torch.where(positive, a, torch.ones_like(a))
    r = torch.rsqrt(safe)
    zero = torch.zeros_like(a)
    return torch.where(positive, 0.5 * r, zero), torch.where(positive, -0.25 * r / safe, zero)


def _rsqrt(a: Tensor) -> tuple[Tensor, Tensor]:
    return _pow(a, -0.5)


def _reciprocal(a: Tensor) -> tuple[Tensor, Tensor]:
    return _pow(a, -1.0)


def _square(a: Tensor) -> tuple[Tensor, Tensor]:
    return _pow(a, 2.0)


def _log_sigmoid(a: Tensor) -> tuple[Tensor, Tensor]:
    p = torch.sigmoid(a)
    return 1 - p, -p * (1 - p)


def _softsign(a: Tensor) -> tuple[Tensor, Tensor]:
    d = 1 + a.abs()
    return 1 / (d * d), -2 * torch.sign(a) / (d * d * d)


def _mish(a: Tensor) -> tuple[Tensor, Tensor]:
    sp = torch.nn.functional.softplus(a)
    t = torch.tanh(sp)
    s = torch.sigmoid(a)
    dt = (1 - t * t) * s  # d tanh(softplus(a)) / da
    d2t = (1 - t * t) * (s * (1 - s) - 2 * t * s * s)
    return t + a * dt, 2 * dt + a * d2t


DERIVATIVES: dict[str, Derivatives] = {
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "softplus": _softplus,
    "gelu": _gelu,
    "silu": _silu,
    "elu": _elu,
    "relu": _relu,
    "leaky_relu": _leaky_relu,
    "prelu": _prelu,
    "hardtanh": _hardtanh,
    "relu6": _relu6,
    "hardsigmoid": _hardsigmoid,
    "hardswish": _hardswish,
    "abs": _abs,
    "exp": _exp,
    "log": _log,
    "sin": _sin,
    "cos": _cos,
    "pow": _pow,
    "sqrt": _sqrt,
    "norm_root": _norm_root,
    "rsqrt": _rsqrt,
    "reciprocal": _reciprocal,
    "square": _square,
    "log_sigmoid": _log_sigmoid,
    "softsign": _softsign,
    "mish": _mish,
}

# Second derivative zero almost everywhere (with affine maps and max pools: zero logit Hessians).
PIECEWISE_LINEAR = frozenset({"relu", "leaky_relu", "prelu", "hardtanh", "relu6", "abs",
                              "hardsigmoid"})  # fmt: skip


# Non-decreasing everywhere (leaky_relu and elu only for the default non-negative parameters:
# the rule checks the sign of s' instead where it matters).
NON_DECREASING = frozenset({"tanh", "sigmoid", "softplus", "relu", "hardtanh", "relu6", "exp",
                            "hardsigmoid",
                            "log_sigmoid", "softsign", "sqrt", "norm_root", "log"})  # fmt: skip

# Functions whose derivatives follow from their output s(a) without computing it again.
FROM_OUTPUT = frozenset({"tanh", "sigmoid"})


def derivatives(name: str, a: Tensor, out: Tensor | None = None, **params) -> tuple[Tensor, Tensor]:
    """(s'(a), s''(a)) of the elementwise function ``name`` with its parameters; ``out`` = s(a),
    when known, saves computing it again (``FROM_OUTPUT``)."""
    if name in FROM_OUTPUT and out is not None:
        return DERIVATIVES[name](a, out=out)
    return DERIVATIVES[name](a, **params)
