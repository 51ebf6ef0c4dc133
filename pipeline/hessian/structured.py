"""Exact input Hessians of layer chains by second-order propagation, without an autograd graph.

For a chain x = h_0 -> a_1 = W_1 h_0 + b_1 -> h_1 = s(a_1) -> ... -> z and scalars y_k(z), with
g_l = dy/dh_l and c_l = s''(a_l) * g_l, the Hessian is

    H = sum_l J_l^T diag(c_l) J_l + J_z^T A J_z,     J_l = da_l/dx,  A = d^2 y / dz^2,

which two schedules evaluate (see NOTE [split schedule]):

* backward (DESIGN.md): M = A at the output; per layer going down
  N = diag(s') M diag(s') + diag(c), M <- W^T N W; at the input M is the Hessian.
  Cost ~ F_out F_in (F_out + F_in) per layer and output, independent of the number of rows.
* tangent-adjoint: forward Jacobian columns J_l e_r for the R selected rows (shared by the K
  outputs), then one adjoint sweep U <- W^T (s' * U + c * J e_r) per output. Cost ~ R x (cost of
  the layer) per output: cheap when the input is narrower than the hidden layers, and the only
  schedule that keeps convolutions sparse.

NOTE [split schedule]: the chain is cut at an op index L: ops below L use tangent-adjoint, ops from
L up use the backward M-propagation, joined by U_L = J_L M_L (M is symmetric). L = 0 is the pure
backward method restricted to the rows (W[:, rows]^T N W at the first layer), L = len(ops) the pure
forward one. ``plan_split`` counts the multiply-adds of every admissible L and takes the cheapest;
convolutions and pools are only ever in the tangent part (their dense matrices would cost
F_out F_in memory).

Layers: Linear, Conv1d/2d/3d and average pools (as depthwise convolutions), max pools (a
per-sample selection, linear where the maxima stay put), eval BatchNorm, shape-only layers, and
elementwise activations including PReLU; ``unsupported`` says why anything else is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .targets import Target

_ELEMENTWISE = (
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.SiLU, nn.ELU, nn.ReLU, nn.LeakyReLU, nn.PReLU,
)  # fmt: skip
_SHAPE_ONLY = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)


# --------------------------------------------------------------------------------------------
# Elementwise activations: s', s'' in closed form.


def activation_derivatives(act: nn.Module, a: Tensor) -> tuple[Tensor, Tensor]:
    """First and second derivatives of an elementwise activation at pre-activations ``a``.

    Args:
        act: one of Tanh, Sigmoid, Softplus (beta, threshold), GELU (exact or ``"tanh"``), SiLU,
            ELU (alpha), ReLU, LeakyReLU (negative_slope), PReLU (one slope, or one per channel:
            axis 1 of ``a``).
        a: pre-activations, any shape ((N, C, ...) for a PReLU with C slopes).

    Returns:
        (s'(a), s''(a)), each shaped like ``a``.
    """
    if isinstance(act, nn.Tanh):
        t = torch.tanh(a)
        d1 = 1 - t * t
        return d1, -2 * t * d1
    if isinstance(act, nn.Sigmoid):
        p = torch.sigmoid(a)
        d1 = p * (1 - p)
        return d1, d1 * (1 - 2 * p)
    if isinstance(act, nn.Softplus):
        linear = act.beta * a > act.threshold  # torch switches to the identity there
        p = torch.sigmoid(act.beta * a)
        d1 = torch.where(linear, torch.ones_like(a), p)
        d2 = torch.where(linear, torch.zeros_like(a), act.beta * p * (1 - p))
        return d1, d2
    if isinstance(act, nn.GELU):
        if act.approximate == "tanh":
            k, c = math.sqrt(2 / math.pi), 0.044715
            u = k * (a + c * a**3)
            du = k * (1 + 3 * c * a * a)
            d2u = 6 * k * c * a
            t = torch.tanh(u)
            sech2 = 1 - t * t
            d1 = 0.5 * (1 + t) + 0.5 * a * sech2 * du
            d2 = sech2 * du + 0.5 * a * sech2 * (d2u - 2 * t * du * du)
            return d1, d2
        phi = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
        return cdf + a * phi, phi * (2 - a * a)
    if isinstance(act, nn.SiLU):
        p = torch.sigmoid(a)
        return p * (1 + a * (1 - p)), p * (1 - p) * (2 + a * (1 - 2 * p))
    if isinstance(act, nn.ELU):
        pos = a > 0
        e = act.alpha * torch.exp(torch.clamp(a, max=0))
        return torch.where(pos, torch.ones_like(a), e), torch.where(pos, torch.zeros_like(a), e)
    if isinstance(act, nn.ReLU):
        return (a > 0).to(a.dtype), torch.zeros_like(a)
    if isinstance(act, nn.LeakyReLU):
        d1 = torch.where(a > 0, torch.ones_like(a), torch.full_like(a, act.negative_slope))
        return d1, torch.zeros_like(a)
    if isinstance(act, nn.PReLU):
        slope = act.weight
        if slope.numel() > 1:
            slope = slope.reshape(-1, *[1] * (a.dim() - 2))
        return torch.where(a > 0, torch.ones_like(a), slope), torch.zeros_like(a)
    raise TypeError(f"no closed-form derivatives for {type(act).__name__}")


# --------------------------------------------------------------------------------------------
# The chain: affine ops (linear part only; the bias enters through the forward pass) and
# elementwise activations, acting on flattened per-sample feature vectors.


@dataclass
class Affine:
    """The linear part W of a layer acting on flat features (..., F_in) -> (..., F_out).

    Subclasses say how W acts (``apply``, ``apply_t``) and what W v costs (``macs``). ``dense``
    ones also compute W^T M W (``congruence``), so the M-propagation may pass through them; the
    others stay below the cut (see NOTE [split schedule]).

    Attributes:
        module: the layer.
        in_shape: per-sample input shape; out_shape: per-sample output shape.
    """

    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    dense: ClassVar[bool] = False

    @property
    def f_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def f_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def macs(self) -> int:
        """Multiply-adds of W v for one vector v."""
        raise NotImplementedError

    def apply(self, v: Tensor) -> Tensor:
        """W v for v (..., F_in) -> (..., F_out)."""
        raise NotImplementedError

    def apply_t(self, u: Tensor) -> Tensor:
        """W^T u for u (..., F_out) -> (..., F_in)."""
        raise NotImplementedError

    def congruence(self, m: Tensor, diagonal: bool) -> tuple[Tensor, bool]:
        """W^T M W for M (B, F_out, F_out), or diag(m) with m (B, F_out) when ``diagonal``.

        Returns:
            (W^T M W, whether it is returned as a diagonal (B, F_in)).
        """
        raise NotImplementedError(f"{type(self).__name__} stays below the cut")


@dataclass
class Dense(Affine):
    """nn.Linear: W is its weight (F_out, F_in)."""

    dense = True

    @property
    def macs(self) -> int:
        return self.f_in * self.f_out

    def apply(self, v: Tensor) -> Tensor:
        return F.linear(v, self.module.weight)

    def apply_t(self, u: Tensor) -> Tensor:
        return u @ self.module.weight

    def congruence(self, m: Tensor, diagonal: bool) -> tuple[Tensor, bool]:
        w = self.module.weight
        if diagonal:
            return (m.unsqueeze(-1) * w).mT @ w, False
        return (m @ w).mT @ w, False  # M symmetric: (M W)^T W = W^T M W


@dataclass
class Diagonal(Affine):
    """An eval-mode BatchNorm: W = diag(scale), one factor per channel (the first axis)."""

    dense = True

    @property
    def macs(self) -> int:
        return self.f_in

    def scale(self) -> Tensor:
        """(F,) diagonal of W."""
        m = self.module
        s = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            s = s * m.weight
        per_channel = self.in_shape[0]
        rest = math.prod(self.in_shape[1:])
        return s.reshape(per_channel, 1).expand(per_channel, rest).reshape(-1)

    def apply(self, v: Tensor) -> Tensor:
        return v * self.scale()

    def apply_t(self, u: Tensor) -> Tensor:
        return u * self.scale()

    def congruence(self, m: Tensor, diagonal: bool) -> tuple[Tensor, bool]:
        s = self.scale()
        if diagonal:
            return m * s * s, True
        return s.unsqueeze(-1) * m * s, False


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT_FN = {1: nn.grad.conv1d_input, 2: nn.grad.conv2d_input, 3: nn.grad.conv3d_input}


@dataclass
class Conv(Affine):
    """A zero-padded convolution without bias over n = 1, 2 or 3 spatial dimensions: ConvNd, or
    an average pool as a depthwise convolution with a constant kernel.

    W v is ``F.conv{n}d``, W^T u its adjoint ``nn.grad.conv{n}d_input``. Padding may be larger
    after than before (``padding="same"`` with an even kernel): the excess is an ``F.pad`` of v,
    and W^T u drops it again.

    Attributes:
        weight: (C_out, C_in / groups, *kernel).
        stride, dilation: one per spatial dimension; groups: as in ``F.conv2d``.
        padding: (before, after) zeros per spatial dimension, before <= after.
    """

    weight: Tensor
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def macs(self) -> int:
        return self.f_out * math.prod(self.weight.shape[1:])

    @property
    def _before(self) -> list[int]:
        return [lo for lo, _ in self.padding]

    @property
    def _excess(self) -> list[int]:
        """``F.pad`` widths of the padding beyond ``_before``: (left, right) from the last axis."""
        return [p for lo, hi in reversed(self.padding) for p in (0, hi - lo)]

    def apply(self, v: Tensor) -> Tensor:
        x = v.reshape(-1, *self.in_shape)
        if any(self._excess):
            x = F.pad(x, self._excess)
        conv = _CONV_FN[len(self.stride)]
        y = conv(x, self.weight, None, self.stride, self._before, self.dilation, self.groups)
        return y.reshape(*v.shape[:-1], self.f_out)

    def apply_t(self, u: Tensor) -> Tensor:
        y = u.reshape(-1, *self.out_shape)
        size = [y.shape[0], self.in_shape[0]]
        size += [n + hi - lo for n, (lo, hi) in zip(self.in_shape[1:], self.padding, strict=True)]
        adjoint = _CONV_INPUT_FN[len(self.stride)]
        x = adjoint(size, self.weight, y, self.stride, self._before, self.dilation, self.groups)
        x = x[(..., *(slice(n) for n in self.in_shape[1:]))]  # drop the excess padding
        return x.reshape(*u.shape[:-1], self.f_in)


_MAX_POOL_FN = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@dataclass
class Select(Affine):
    """A max pool: y_j = x_{index_j}, linear wherever the maxima stay where they are.

    The positions differ between samples, so the op describes the batch it was built from.

    Attributes:
        index: (N, F_out) position of each output's maximum in the sample's flat input.
    """

    index: Tensor

    @property
    def macs(self) -> int:
        return self.f_out * ELEMENTWISE_MACS  # a gather moves memory like an elementwise op

    def _index_for(self, t: Tensor) -> Tensor:
        """``index`` as (N, 1, ..., 1, F_out), broadcasting against t (N or 1, ..., F)."""
        return self.index.reshape(len(self.index), *[1] * (t.dim() - 2), self.f_out)

    def apply(self, v: Tensor) -> Tensor:
        return torch.take_along_dim(v, self._index_for(v), dim=-1)

    def apply_t(self, u: Tensor) -> Tensor:
        index = self._index_for(u).expand(*u.shape[:-1], self.f_out)
        return u.new_zeros(*u.shape[:-1], self.f_in).scatter_add_(-1, index, u)


@dataclass
class Activation:
    """An elementwise activation on flat features of per-sample shape ``shape``."""

    module: nn.Module
    shape: tuple[int, ...]

    @property
    def f(self) -> int:
        return math.prod(self.shape)

    def derivatives(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """(s'(a), s''(a)) for flat pre-activations a (N, F)."""
        d1, d2 = activation_derivatives(self.module, a.reshape(-1, *self.shape))
        return d1.reshape(a.shape), d2.reshape(a.shape)


Op = Affine | Activation

# Layers by spatial dimensions (n = 1, 2, 3), and the layers each op kind stands for.
_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_AVG_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADAPTIVE_AVG_POOLS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
_MAX_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_SPATIAL = {**_CONVS, **_AVG_POOLS, **_ADAPTIVE_AVG_POOLS, **_MAX_POOLS}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SUPPORTED = (nn.Linear, *_BATCHNORMS, *_SPATIAL, *_ELEMENTWISE, *_SHAPE_ONLY)


def unsupported(model: nn.Module, target: Target) -> str | None:
    """None when ``model`` is a chain this module handles, else the reason it is not."""
    del target  # every target is supported
    if not isinstance(model, nn.Sequential):
        return f"{type(model).__name__} is not an nn.Sequential chain"
    for name, m in model.named_modules(remove_duplicate=False):
        if list(m.children()):
            if type(m).forward is not nn.Sequential.forward:
                return f"container {name!r} ({type(m).__name__}) is not an nn.Sequential"
            continue
        reason = _layer_unsupported(m)
        if reason:
            return f"layer {name!r}: {reason}"
    return None


def _supported_base(m: nn.Module) -> type[nn.Module] | None:
    """The supported torch layer class that ``m`` is (or subclasses), if any."""
    return next((c for c in type(m).__mro__ if c in _SUPPORTED), None)


def _layer_unsupported(m: nn.Module) -> str | None:
    base = _supported_base(m)
    if base is None:
        return f"{type(m).__name__} is not a supported layer"
    if type(m).forward is not base.forward:
        return f"a {base.__name__} subclass with its own forward"
    if isinstance(m, nn.Flatten) and m.start_dim == 0:
        return "Flatten(start_dim=0) mixes the samples of a batch"
    if base in _CONVS and m.padding_mode != "zeros":
        return f"{base.__name__}(padding_mode={m.padding_mode!r}): only zero padding is supported"
    if base in _BATCHNORMS and (not m.track_running_stats or m.running_var is None):
        return "BatchNorm without running statistics uses batch statistics"
    if base in _AVG_POOLS and m.ceil_mode:
        return f"{base.__name__}(ceil_mode=True): the last windows' divisors depend on the input"
    if base in _AVG_POOLS and not m.count_include_pad and any(_as_tuple(m.padding, 1)):
        return f"{base.__name__}(count_include_pad=False) with padding: border windows differ"
    if base in _MAX_POOLS and m.return_indices:
        return f"{base.__name__}(return_indices=True) returns a pair, not a tensor"
    if base in _ADAPTIVE_AVG_POOLS and set(_as_tuple(m.output_size, 1)) - {1, None}:
        return (
            f"{base.__name__}(output_size={m.output_size}): only sizes 1 and None (global "
            "pooling); others are plain average pools only where they divide the input size"
        )
    return None


def _as_tuple(v: int | tuple | None, n: int) -> tuple:
    """A layer argument given as one value or one per spatial dimension, as a tuple."""
    return tuple(v) if isinstance(v, tuple | list) else (v,) * n


def _forward_leaves(model: nn.Module) -> list[nn.Module]:
    """Leaf layers in the order a (nested) Sequential calls them, repeats included."""
    subs = list(model._modules.values())
    if not subs:
        return [model]
    return [leaf for sub in subs if sub is not None for leaf in _forward_leaves(sub)]


def build_chain(model: nn.Module, x: Tensor) -> tuple[list[Op], list[Tensor], Tensor]:
    """Run the model layer by layer and describe it as ops on flat features.

    Args:
        model: a supported ``nn.Sequential``.
        x: inputs (N, *S).

    Returns:
        ops; the flat input (N, F_in) of each op; the output z (N, C).
    """
    ops: list[Op] = []
    inputs: list[Tensor] = []
    h = x
    for m in _forward_leaves(model):
        out = m(h)
        if not isinstance(m, _SHAPE_ONLY):
            ops.append(_make_op(m, h, out))
            inputs.append(h.reshape(h.shape[0], -1))
        h = out
    return ops, inputs, h.reshape(h.shape[0], -1)


def _make_op(m: nn.Module, h: Tensor, out: Tensor) -> Op:
    """The op of a supported layer ``m`` that maps h (N, *in_shape) to out (N, *out_shape)."""
    if isinstance(m, _ELEMENTWISE):
        return Activation(m, tuple(h.shape[1:]))
    base = _supported_base(m)
    n = _SPATIAL.get(base)
    if n is not None and base not in _CONVS and h.dim() == n + 1:
        h, out = h.unsqueeze(1), out.unsqueeze(1)  # a pool of (N, *spatial): one channel each
    shapes = (m, tuple(h.shape[1:]), tuple(out.shape[1:]))
    if base is nn.Linear:
        return Dense(*shapes)
    if base in _BATCHNORMS:
        return Diagonal(*shapes)
    if h.dim() != n + 2:
        raise ValueError(f"{base.__name__} needs inputs (N, C, {n} sizes), got {tuple(h.shape)}")
    if base in _CONVS:
        return Conv(*shapes, m.weight, m.stride, _conv_padding(m), m.dilation, m.groups)
    if base in _MAX_POOLS:
        return Select(*shapes, _max_pool_index(m, h))
    return _average_pool(m, h, shapes)


def _max_pool_index(m: nn.Module, h: Tensor) -> Tensor:
    """(N, F_out) flat positions of a max pool's maxima in each sample of h (N, C, *spatial)."""
    pool = _MAX_POOL_FN[h.dim() - 2]
    args = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    _, index = pool(h, *args, return_indices=True)
    plane = math.prod(h.shape[2:])  # the pool's indices count within each channel
    channel = torch.arange(h.shape[1], device=h.device).reshape(1, -1, *[1] * (h.dim() - 2))
    return (index + channel * plane).reshape(h.shape[0], -1)


def _average_pool(m: nn.Module, h: Tensor, shapes: tuple) -> Conv:
    """An average pool as a depthwise convolution with the constant kernel 1 / divisor.

    An adaptive pool whose output sizes divide the input sizes is a plain one with kernel =
    stride = input size // output size (``_layer_unsupported`` admits sizes 1 and None only).
    """
    _, in_shape, out_shape = shapes
    n = len(in_shape) - 1
    if isinstance(m, tuple(_ADAPTIVE_AVG_POOLS)):
        if any(i % o for i, o in zip(in_shape[1:], out_shape[1:], strict=True)):
            raise ValueError(f"{m} does not divide the input sizes {in_shape[1:]}")
        kernel = tuple(i // o for i, o in zip(in_shape[1:], out_shape[1:], strict=True))
        stride, padding, divisor = kernel, (0,) * n, None
    else:
        kernel, stride, padding = (_as_tuple(v, n) for v in (m.kernel_size, m.stride, m.padding))
        divisor = getattr(m, "divisor_override", None)  # AvgPool1d has none
    weight = h.new_full((in_shape[0], 1, *kernel), 1 / (divisor or math.prod(kernel)))
    return Conv(*shapes, weight, stride, tuple((p, p) for p in padding), (1,) * n, in_shape[0])


def _conv_padding(m: nn.Module) -> tuple[tuple[int, int], ...]:
    """(before, after) zeros per spatial dimension of a convolution, strings resolved.

    ``"same"`` pads d (k - 1) in all, the odd one after (as torch does); ``"valid"`` none.
    """
    if m.padding == "valid":
        return tuple((0, 0) for _ in m.kernel_size)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        return tuple((t // 2, t - t // 2) for t in total)
    return tuple((p, p) for p in m.padding)


# --------------------------------------------------------------------------------------------
# Output derivatives of the target.


def output_derivatives(z: Tensor, target: Target) -> tuple[Tensor, Tensor | None, bool]:
    """Gradient and Hessian of the K target scalars with respect to the output z.

    Args:
        z: outputs (N, C).
        target: logits by index (A = 0), cross-entropy (A = diag(p) - p p^T) or
            mse (A = 2/C I).

    Returns:
        g (N, K, C); A as (N, K, C, C), or (N, K, C) when diagonal, or None when zero;
        whether A is diagonal.
    """
    n, c = z.shape
    if target.kind == "index":
        g = F.one_hot(target.aux, c).to(z.dtype)
        return g, None, False
    if target.kind == "cross_entropy":
        p = torch.softmax(z, -1)
        g = p - F.one_hot(target.aux, c).to(z.dtype)
        a = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        return g.unsqueeze(1), a.unsqueeze(1), False
    g = 2 * (z - target.aux) / c
    return g.unsqueeze(1), torch.full_like(g, 2 / c).unsqueeze(1), True


# --------------------------------------------------------------------------------------------
# Planning: where to cut the chain.


def plan_split(ops: list[Op], rows: int, k: int, top: str) -> tuple[int, int]:
    """The cut L minimising the multiply-adds per sample, see NOTE [split schedule].

    Args:
        ops: the chain.
        rows: R, the number of Hessian rows.
        k: K, the number of outputs.
        top: the kind of d^2y/dz^2: ``"zero"``, ``"diag"`` or ``"dense"``.

    Returns:
        (L, its multiply-adds per sample).
    """
    lowest = max((i + 1 for i, op in enumerate(ops) if isinstance(op, Affine) and not op.dense),
                 default=0)  # fmt: skip
    best = None
    for cut in range(lowest, len(ops) + 1):
        cost = _cost(ops, cut, rows, k, top)
        if best is None or cost < best[1]:
            best = (cut, cost)
    return best


# What one elementwise multiply (or add) over an element costs, in multiply-adds of a matrix
# product: it moves memory and does one operation. With it, a Tanh below the cut (three passes
# over R x F per output) is dearer than the same Tanh in the M-propagation (F x F): at D = 784 in
# the tanh MLP the cut moves from 2 to 1 and the time from 5.0 to 4.0 ms a sample (2-core CPU).
ELEMENTWISE_MACS = 32


def _width_below(ops: list[Op], cut: int) -> int:
    """Width of the flat features entering op ``cut`` (the output width when cut = len(ops))."""
    if cut < len(ops):
        op = ops[cut]
        return op.f_in if isinstance(op, Affine) else op.f
    op = ops[-1]
    return op.f_out if isinstance(op, Affine) else op.f


def _cost(ops: list[Op], cut: int, r: int, k: int, kind: str) -> int:
    cost = 0
    for op in reversed(ops[cut:]):  # M-propagation, per output
        if isinstance(op, Activation):
            kind = "dense" if kind == "dense" else "diag"
            cost += k * op.f * (op.f if kind == "dense" else 1) * ELEMENTWISE_MACS
        elif kind == "diag" and isinstance(op, Dense):
            cost += k * op.f_out * op.f_in * op.f_in
            kind = "dense"
        elif kind == "dense":
            linear = isinstance(op, Dense)
            cost += k * (op.f_out * op.f_in * (op.f_out + op.f_in) if linear else op.f_in**2)
    width = _width_below(ops, cut)
    live = kind != "zero"
    if kind == "dense" and cut:
        cost += k * r * width * width
    elif kind != "zero":  # a diagonal join, or the rows of M gathered at the input
        cost += k * r * width * ELEMENTWISE_MACS
    first = next((i for i, op in enumerate(ops) if isinstance(op, Affine)), len(ops))
    for i, op in enumerate(ops[:cut]):  # forward tangents, shared by the outputs
        if isinstance(op, Activation):
            cost += r * op.f * ELEMENTWISE_MACS
        elif i != first:
            cost += r * op.macs
    for op in reversed(ops[:cut]):  # adjoint sweep, per output
        if isinstance(op, Activation):
            live = True
            cost += 3 * k * r * op.f * ELEMENTWISE_MACS
        elif live:
            cost += k * r * op.macs
    return cost


# --------------------------------------------------------------------------------------------
# The computation.


def structured_hessian(
    ops: list[Op], inputs: list[Tensor], z: Tensor, target: Target, rows: Tensor, cut: int
) -> tuple[Tensor, Tensor]:
    """Hessian rows and gradients of the target for one batch of samples.

    Args:
        ops: the chain; inputs: the flat input of each op (N, F); z: the output (N, C).
        target: the K scalars; rows: (R,) long row indices; cut: L from ``plan_split``.

    Returns:
        hessian (N, K, R, D) and gradient (N, K, D).
    """
    g, a_top, diag = output_derivatives(z, target)
    n, k = g.shape[:2]

    # Gradient sweep: g_l for every op input, and c_l = s''(a_l) g_l at the activations.
    slopes: dict[int, Tensor] = {}
    curv: dict[int, Tensor] = {}
    for i in reversed(range(len(ops))):
        op = ops[i]
        if isinstance(op, Activation):
            d1, d2 = op.derivatives(inputs[i])
            slopes[i] = d1
            curv[i] = d2.unsqueeze(1) * g
            g = d1.unsqueeze(1) * g
        else:
            g = op.apply_t(g)

    # M-propagation down to the cut; m is None (zero), diagonal (N, K, F) or dense (N, K, F, F).
    m = a_top
    for i in reversed(range(cut, len(ops))):
        op = ops[i]
        if isinstance(op, Activation):
            d1 = slopes[i].unsqueeze(1)
            if m is None:
                m, diag = curv[i], True
            elif diag:
                m = d1 * d1 * m + curv[i]
            else:
                m = d1.unsqueeze(-1) * m * d1.unsqueeze(-2)
                m.diagonal(dim1=-2, dim2=-1).add_(curv[i])
        elif m is not None:
            lead = m.shape[:2]
            flat = m.reshape(-1, *m.shape[2:])
            flat, diag = op.congruence(flat, diag)
            m = flat.reshape(*lead, *flat.shape[1:])

    # Forward tangents J e_r (rows as a batch; the leading 1 broadcasts over samples).
    dim = inputs[0].shape[1] if ops else z.shape[1]
    basis = True  # jac is still the (1, R, D) one-hot basis: W e_r is a column of W
    jac = F.one_hot(rows, dim).to(z.dtype).unsqueeze(0) if cut else None
    tangents: dict[int, Tensor] = {}
    for i in range(cut):
        op = ops[i]
        if isinstance(op, Activation):
            tangents[i] = jac
            jac = slopes[i].unsqueeze(1) * jac
        elif basis and isinstance(op, Dense):
            jac = op.module.weight[:, rows].T.unsqueeze(0)
        else:
            jac = op.apply(jac)
        basis = False

    # Join: U = J M (M symmetric), then the adjoint sweep down to the input.
    if cut == 0:  # pure backward: M at the input, restricted to the rows
        u = m[:, :, rows] if m is not None and not diag else None
        if diag and m is not None:
            u = F.one_hot(rows, dim).to(z.dtype) * m.unsqueeze(2)
    elif m is None:
        u = None
    elif diag:
        u = jac.unsqueeze(1) * m.unsqueeze(2)
    else:
        u = jac.unsqueeze(1) @ m
    full_rows = len(rows) == dim and bool((rows == torch.arange(dim, device=rows.device)).all())
    for i in reversed(range(cut)):
        op = ops[i]
        if isinstance(op, Activation):
            term = curv[i].unsqueeze(2) * tangents[i].unsqueeze(1)
            u = term if u is None else slopes[i][:, None, None, :] * u + term
        elif u is not None:
            if i == 0 and full_rows and isinstance(op, Dense):
                u = symmetric_product(u, op.module.weight)
            else:
                u = op.apply_t(u)
    if u is None:  # linear in x: zero Hessian
        u = z.new_zeros(n, k, len(rows), dim)
    return u.expand(n, k, len(rows), dim), g


def symmetric_product(u: Tensor, w: Tensor) -> Tensor:
    """H = U W for U (..., D, F) and W (F, D) when H is known to be symmetric.

    Only the blocks on and above the diagonal of a b x b block grid are multiplied (b = 16 for
    D >= 512: 136 of 256 blocks); the others are their transposes.

    Returns:
        (..., D, D).
    """
    d = w.shape[1]
    b = 16 if d >= 512 else (2 if d >= 128 else 1)  # b = 16 measured fastest at D = 784
    if b == 1 or (u.device.type == "cpu" and u.shape[:-2].numel() >= 64):
        # Many matrices on a CPU: one large GEMM (u folds into (B*D, F)) beat the block triangle
        # with its transposed copies (measured at D = 784: 2.7 against 3.0 ms a matrix for
        # B = 160). On a GPU the product is compute-bound and the copies are cheap next to it, so
        # the triangle's half of the arithmetic should win there (not yet measured on a GPU).
        return u @ w
    edges = [d * i // b for i in range(b + 1)]
    out = u.new_empty(*u.shape[:-2], d, d)
    for i in range(b):
        ri = slice(edges[i], edges[i + 1])
        top = u[..., ri, :] @ w[:, edges[i] :]  # row block i, columns from block i on
        out[..., ri, edges[i] :] = top
        out[..., edges[i + 1] :, ri] = top[..., edges[i + 1] - edges[i] :].mT
    return out


def _bytes_per_sample(ops: list[Op], cut: int, r: int, k: int, itemsize: int) -> int:
    widths = [_width_below(ops, i) for i in range(len(ops) + 1)]
    m_part = max((w * w for w in widths[cut:]), default=0) * k * 3
    t_part = sum(widths[:cut]) * r + 3 * k * r * max(widths[: cut + 1] or [1])
    return (m_part + t_part + sum(widths) * (k + 4)) * itemsize


def compute(
    model: nn.Module, x: Tensor, target: Target, rows: Tensor, memory_budget: int
) -> tuple[Tensor, Tensor]:
    """Hessian rows (N, K, R, D) and gradients (N, K, D) of a supported chain, see module doc.

    Samples are processed in chunks, and rows in chunks where one sample exceeds
    ``memory_budget`` bytes.
    """
    n, r, k = x.shape[0], len(rows), target.n_outputs
    with torch.no_grad():
        ops, _, z = build_chain(model, x[:1])
        top = "zero" if target.kind == "index" else ("diag" if target.kind == "mse" else "dense")
        cut, _ = plan_split(ops, r, k, top)
        per_sample = _bytes_per_sample(ops, cut, r, k, x.element_size())
        step = max(1, memory_budget // max(per_sample, 1))
        row_step = r if per_sample <= memory_budget else max(1, r * memory_budget // per_sample)
        hess = grads = None
        for s in range(0, n, step):
            ops, inputs, z = build_chain(model, x[s : s + step])
            sub = target.subset(s, s + z.shape[0])
            for c in range(0, r, row_step):
                h, g = structured_hessian(ops, inputs, z, sub, rows[c : c + row_step], cut)
                if step >= n and row_step >= r:
                    return h, g
                if hess is None:
                    hess = x.new_empty(n, k, r, h.shape[-1])
                    grads = x.new_empty(n, k, h.shape[-1])
                hess[s : s + step, :, c : c + row_step] = h
                grads[s : s + step] = g
        return hess, grads
