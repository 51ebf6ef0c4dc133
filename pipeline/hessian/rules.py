"""Local derivatives of one step y = f(v_1, ..., v_m) of a captured graph.

Tensors that carry derivatives have one extra axis after the batch axis (NOTE [layout]):

* tangents t = dv/dx e_r: (B, E, *s) for E directions, B = 1 while they are the same for every
  sample (below the first nonlinear step), else N;
* adjoints u: (N, E, *s) for E cotangents (the K outputs, or K x R second-order adjoints).

A rule gives the linear part of the step (``jvp``: t_y = sum_i df/dv_i t_i; ``vjp``:
u_i = (df/dv_i)^T u_y) and, when f is nonlinear, its second-order term (``second``): the
contribution sum_j d^2 <g, f> / dv_i dv_j t_j to the second-order adjoint of each input, with
g = dy_k/dy the first-order adjoint of the output, for K outputs and R tangents at once:
(N, K, *s_out) and (B, R, *s_in) -> (N, K, R, *s_in).

NOTE [layout]: the extra axis sits at position 1, so that per-sample constants (N, *s) broadcast
against it with one ``unsqueeze(1)``, and ops that act per sample run on the folded batch
(B * E, *s) when their arguments do not name the batch size (``Fold``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jvp, vjp, vmap

from . import elementwise

# What one elementwise multiply (or add) over an element costs, in multiply-adds of a matrix
# product: it moves memory and does one operation (fitted on the tanh MLP; see planner).
ELEMENTWISE_MACS = 32
# Cost factor of a step whose derivatives come from torch.func (several passes and vmap).
GENERAL_FACTOR = 8


def fold(t: Tensor) -> Tensor:
    """(B, E, *s) -> (B * E, *s)."""
    return t.reshape(-1, *t.shape[2:])


def unfold(t: Tensor, lead: tuple[int, int]) -> Tensor:
    """(B * E, *s) -> (B, E, *s)."""
    return t.reshape(*lead, *t.shape[1:])


def lift(c: Tensor | float, ndim: int) -> Tensor | float:
    """A constant that broadcasts against a primal of ``ndim`` axes, made to broadcast against
    (B, E, *s): one axis inserted after the batch axis when it has one."""
    if isinstance(c, Tensor) and c.dim() == ndim:
        return c.unsqueeze(1)
    return c


def outer(c: Tensor, t: Tensor) -> Tensor:
    """c (N, K, *s) times t (B, R, *s) -> (N, K, R, *s)."""
    return c.unsqueeze(2) * t.unsqueeze(1)


@dataclass
class Rule:
    """Derivatives of a step; subclasses say how it acts.

    Attributes:
        shapes_in: per-sample shape of each active input; shape_out: of the output.
    """

    shapes_in: list[tuple[int, ...]]
    shape_out: tuple[int, ...]

    # "linear" (no second-order term), "elementwise" (a diagonal one), "product", "general".
    kind = "linear"
    # True for nonlinear steps whose second derivative is zero almost everywhere (ReLU, max).
    piecewise = False

    @property
    def f_in(self) -> int:
        return math.prod(self.shapes_in[0])

    @property
    def f_out(self) -> int:
        return math.prod(self.shape_out)

    @property
    def curved(self) -> bool:
        """Whether the step has a second-order term."""
        return self.kind != "linear" and not self.piecewise

    @property
    def macs(self) -> int:
        """Multiply-adds of one tangent (or one adjoint) through the step, per sample."""
        return (sum(math.prod(s) for s in self.shapes_in) + self.f_out) * ELEMENTWISE_MACS

    def jvp(self, ts: list[Tensor | None]) -> Tensor | None:
        raise NotImplementedError

    def vjp(self, u: Tensor) -> list[Tensor | None]:
        raise NotImplementedError

    def second(self, g: Tensor, ts: list[Tensor | None]) -> list[Tensor | None]:
        """Second-order terms (N, K, R, *s_i) for g (N, K, *s_out), ts (B, R, *s_i)."""
        return [None] * len(ts)


@dataclass
class Dense(Rule):
    """y = v W^T (+ b) over the last axis; W (F_out, F_in) a constant (Linear, matmul)."""

    weight: Tensor = None

    @property
    def macs(self) -> int:
        return self.f_out * self.weight.shape[1]

    @property
    def flat(self) -> bool:
        """Whether the per-sample input is a vector (then W is the whole map)."""
        return len(self.shapes_in[0]) == 1

    def jvp(self, ts):
        t = ts[0]
        if direction_major(t):  # one product on the stored layout, which the result keeps
            return torch.nn.functional.linear(t.transpose(0, 1), self.weight).transpose(0, 1)
        return torch.nn.functional.linear(t, self.weight)

    def vjp(self, u):
        return [narrow_product(u, self.weight)]


def direction_major(t: Tensor) -> bool:
    """Tangents (B, R, ...) stored as (R, B, ...) (the outer schedule makes them so after an
    elementwise step on a Jacobian shared by the samples: ``propagate._jvp``)."""
    return t.dim() > 2 and not t.is_contiguous() and t.transpose(0, 1).is_contiguous()


def narrow_product(a: Tensor, w: Tensor) -> Tensor:
    """a (..., F) @ w (F, E); for a narrow E on the CPU as (w^T a^T)^T, which MKL runs 2x faster
    (4096 x 32 x 2: 63 against 127 us; the gradient at a PINN's input, E = 2)."""
    if w.shape[1] > NARROW or a.device.type != "cpu" or a.dim() < 2:
        return a @ w
    flat = a.reshape(-1, a.shape[-1])
    return (w.mT @ flat.mT).mT.reshape(*a.shape[:-1], w.shape[1])


NARROW = 4  # outputs up to which ``narrow_product`` transposes


@dataclass(frozen=True)
class Sliding:
    """A window op over the trailing spatial axes of (N, C, *sp), per spatial axis: kernel,
    stride, zero padding and dilation; ``weight`` (C_out, C_in / groups, *kernel) for a
    convolution, ``divisor`` for an average pool (the sum of each window over it, zero padding
    included), neither for a max pool. The local schedule applies it to patches (``windows``,
    NOTE [local] in ``local``)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    weight: Tensor | None = None
    groups: int = 1
    divisor: int | None = None

    @property
    def reach(self) -> tuple[int, ...]:
        """The extent of one window: dilation * (kernel - 1) + 1 per axis."""
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel, strict=True))


@dataclass(frozen=True)
class Piece:
    """The transpose of taking a contiguous piece of ``length`` along per-sample axis ``axis``
    (0-based) of an input of ``size`` there, starting at ``start`` (split, chunk, narrow,
    select, slices): zero padding around it. ``removed``: the piece drops the axis (select).

    Called on folded adjoints (B', *s_out) it pads them; the adjoint sweeps instead collect the
    pieces of one slot and join them with one concatenation (``adjoints.Padded``)."""

    axis: int
    start: int
    length: int
    size: int
    removed: bool

    def __call__(self, u: Tensor) -> tuple[Tensor]:
        return (pad_piece(u, self, 1),)

    def lift(self, u: Tensor, lead: int) -> Tensor:
        """u with the piece's axis back where it was removed; ``lead`` axes before the sample's."""
        return u.unsqueeze(lead + self.axis) if self.removed else u


def pad_piece(u: Tensor, piece: Piece, lead: int) -> Tensor:
    """The piece u (``lead`` leading axes, then the per-sample axes) zero-padded to the input."""
    u = piece.lift(u, lead)
    after = u.dim() - lead - piece.axis - 1  # axes after the piece's: F.pad counts from the last
    pads = [0, 0] * after + [piece.start, piece.size - piece.start - piece.length]
    return torch.nn.functional.pad(u, pads)


@dataclass
class Fold(Rule):
    """A linear map that acts on each sample alike, applied to the folded batch (NOTE [layout]).

    Attributes:
        fn: the map on (B', *s_in) for any B' (several inputs for a concatenation).
        cost: multiply-adds per sample of one application.
        adjoint: its transpose on (B', *s_out), one tensor per input, where known in closed form
            (else ``torch.func.vjp`` of ``fn`` at zero gives it).
        sliding: the map as a window op, where it is one (convolutions, average pools).
    """

    fn: Callable[..., Tensor] = None
    cost: int = 0
    adjoint: Callable[[Tensor], tuple[Tensor, ...]] | None = None
    sliding: Sliding | None = None

    @property
    def macs(self) -> int:
        return self.cost or self.f_out * ELEMENTWISE_MACS

    @property
    def piece(self) -> Piece | None:
        """The step as taking a piece of its input, where it is one."""
        return self.adjoint if isinstance(self.adjoint, Piece) else None

    def jvp(self, ts):
        if any(t is None for t in ts):
            ts = [self._zeros(i, ts) if t is None else t for i, t in enumerate(ts)]
        lead = _lead(ts)
        ts = [t.expand(*lead, *t.shape[2:]) for t in ts]
        return unfold(self.fn(*[fold(t) for t in ts]), lead)

    def vjp(self, u):
        lead = tuple(u.shape[:2])
        if self.adjoint is not None:
            return [unfold(v, lead) for v in self.adjoint(fold(u))]
        zero = u.new_zeros(())
        zeros = [zero.expand(lead[0] * lead[1], *s) for s in self.shapes_in]
        _, pullback = vjp(self.fn, *zeros)
        return [unfold(v, lead) for v in pullback(fold(u))]

    def _zeros(self, i: int, ts: list[Tensor | None]) -> Tensor:
        like = next(t for t in ts if t is not None)
        return like.new_zeros(*like.shape[:2], *self.shapes_in[i])


def _lead(ts: list[Tensor]) -> tuple[int, int]:
    return max(t.shape[0] for t in ts), ts[0].shape[1]


@dataclass
class Reshape(Rule):
    """A per-sample reshape (view, flatten, squeeze, ...): the identity on flat features."""

    def jvp(self, ts):
        t = ts[0]
        return t.reshape(*t.shape[:2], *self.shape_out)

    def vjp(self, u):
        return [u.reshape(*u.shape[:2], *self.shapes_in[0])]


@dataclass
class Scale(Rule):
    """y = c * v (+ constant): a constant factor (BatchNorm in eval, products and quotients with
    constants, negation); ``factor`` broadcasts against the primal (N, *s)."""

    factor: Tensor | float | None = None  # None: the identity (an added constant)

    def _c(self) -> Tensor | float:
        return lift(self.factor, len(self.shape_out) + 1)

    def jvp(self, ts):
        out = ts[0] if self.factor is None else ts[0] * self._c()
        return broadcast(out, self.shape_out)

    def vjp(self, u):
        return [unbroadcast(u if self.factor is None else u * self._c(), self.shapes_in[0])]

    def flat_factor(self, like: Tensor) -> Tensor | None:
        """The factor as (N or 1, F): the diagonal of the map on flat features (None: 1)."""
        if self.factor is None:
            return None
        c = torch.as_tensor(self.factor, dtype=like.dtype, device=like.device)
        ndim = len(self.shape_out) + 1
        if c.dim() < ndim:
            c = c.reshape(*[1] * (ndim - c.dim()), *c.shape)
        return c.expand(c.shape[0], *self.shape_out).reshape(c.shape[0], -1)


def unbroadcast(u: Tensor, shape: tuple[int, ...], lead: int = 2) -> Tensor:
    """Sum u (``lead`` axes, then *s_out) over the per-sample axes where ``shape`` (same rank)
    broadcast."""
    axes = [lead + i for i, (a, b) in enumerate(zip(shape, u.shape[lead:], strict=True))
            if a != b]  # fmt: skip
    return u.sum(axes, keepdim=True) if axes else u


def broadcast(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Tangents t (B, E, *s) of an input that broadcast against the output, expanded to the
    output's per-sample ``shape`` (a constant added to a narrower input widens it)."""
    return t if tuple(t.shape[2:]) == tuple(shape) else t.expand(*t.shape[:2], *shape)


@dataclass
class Add(Rule):
    """y = sum_i sign_i v_i (+ constant); inputs of the output's rank, broadcasting."""

    signs: tuple[float, ...] = ()

    def jvp(self, ts):
        out = None
        for s, t in zip(self.signs, ts, strict=True):
            if t is not None:
                term = t if s == 1 else s * t
                out = term if out is None else out + term
        return None if out is None else broadcast(out, self.shape_out)

    def vjp(self, u):
        return [unbroadcast(u if s == 1 else s * u, shape)
                for s, shape in zip(self.signs, self.shapes_in, strict=True)]  # fmt: skip


@dataclass
class Elementwise(Rule):
    """y = s(v) elementwise, with closed-form s' and s'' (``elementwise.DERIVATIVES``).

    Attributes:
        d1, d2: s'(v), s''(v) at the recorded input, (N, *s).
    """

    name: str = ""
    d1: Tensor = None
    d2: Tensor = None

    kind = "elementwise"

    @property
    def piecewise(self) -> bool:
        return self.name in elementwise.PIECEWISE_LINEAR

    @property
    def macs(self) -> int:
        return self.f_out * ELEMENTWISE_MACS

    def jvp(self, ts):
        return self.d1.unsqueeze(1) * ts[0]

    def vjp(self, u):
        return [self.d1.unsqueeze(1) * u]

    def curvature(self, g: Tensor) -> Tensor:
        """c = s''(v) g: (N, K, *s) for g (N, K, *s)."""
        return self.d2.unsqueeze(1) * g

    def second(self, g, ts):
        return [outer(self.curvature(g), ts[0])]

    def non_decreasing(self) -> bool:
        """Whether s never decreases (then a max pool after it may go before it)."""
        return self.name in elementwise.NON_DECREASING

    def second_adjoint(self, u: Tensor, g: Tensor, t: Tensor) -> Tensor:
        """s' U + (s'' g) t in two passes: U (N, K, R, *s), g (N, K, *s), t (B, R, *s)."""
        d1 = self.d1[:, None, None]
        return (u * d1).addcmul_(self.curvature(g).unsqueeze(2), t.unsqueeze(1))


@dataclass
class Product(Rule):
    """y = a * b of two inputs of the output's rank that broadcast against each other (a filter
    (E, F) times a cutoff (E, 1)): J_y = b J_a + a J_b, and the second-order terms g J_b (to a)
    and g J_a (to b), each summed over the axes where its input broadcast."""

    a: Tensor = None
    b: Tensor = None

    kind = "product"

    def jvp(self, ts):
        ta, tb = ts
        out = None if ta is None else self.b.unsqueeze(1) * ta
        if tb is not None:
            term = self.a.unsqueeze(1) * tb
            out = term if out is None else out + term
        return broadcast(out, self.shape_out)

    def vjp(self, u):
        sa, sb = self.shapes_in
        return [unbroadcast(self.b.unsqueeze(1) * u, sa), unbroadcast(self.a.unsqueeze(1) * u, sb)]

    def second(self, g, ts):
        ta, tb = ts
        sa, sb = self.shapes_in
        return [None if tb is None else unbroadcast(outer(g, tb), sa, 3),
                None if ta is None else unbroadcast(outer(g, ta), sb, 3)]  # fmt: skip


@dataclass
class Select(Rule):
    """A max pool: y_j = v_{index_j}, linear wherever the maxima stay where they are.

    Attributes:
        index: (N, F_out) position of each output's maximum in the sample's flat input.
        sliding: the pool's windows (None for a pool over inputs without a channel axis).
    """

    index: Tensor = None
    sliding: Sliding | None = None

    kind = "select"
    piecewise = True

    def _index(self, t: Tensor) -> Tensor:
        return self.index.unsqueeze(1).expand(self.index.shape[0], t.shape[1], -1)

    def jvp(self, ts):
        t = ts[0].reshape(*ts[0].shape[:2], -1)
        if t.shape[0] != self.index.shape[0]:
            t = t.expand(self.index.shape[0], *t.shape[1:])
        out = torch.gather(t, -1, self._index(t))
        return out.reshape(*out.shape[:2], *self.shape_out)

    def vjp(self, u):
        flat = u.reshape(*u.shape[:2], -1)
        if flat.shape[0] != self.index.shape[0]:  # a seed shared by the samples (NOTE [shared
            flat = flat.expand(self.index.shape[0], *flat.shape[1:])  # seeds]): one a sample
        out = flat.new_zeros(*flat.shape[:2], self.f_in)
        out.scatter_add_(-1, self._index(flat), flat)
        return [out.reshape(*flat.shape[:2], *self.shapes_in[0])]


@dataclass
class Gather(Rule):
    """y[e] = v[index[e]] along the first per-sample axis (the rows of a sample's block, NOTE
    [blocks] in ``blocks``): atom features taken onto the edges of a graph.

    Attributes:
        index: (1, E) rows of the input, the same for every sample (a fixed molecule's edges),
            or (N, E) each sample's own (a neighbour list found from the positions).
    """

    index: Tensor = None

    def jvp(self, ts):
        t = ts[0]  # (B, R, n, *f) -> (max(B, N'), R, E, *f)
        if self.index.shape[0] == 1:
            return t.index_select(2, self.index[0])
        n = self.index.shape[0]
        t = t.expand(n, *t.shape[1:])
        return torch.gather(t, 2, _along(self.index, t.shape, 2))

    def vjp(self, u):
        n = max(u.shape[0], self.index.shape[0])
        out = u.new_zeros(n, u.shape[1], self.shapes_in[0][0], *u.shape[3:])
        if self.index.shape[0] == 1:
            return [out.index_add_(2, self.index[0], u)]
        u = u.expand(n, *u.shape[1:])
        return [out.scatter_add_(2, _along(self.index, u.shape, 2), u)]


@dataclass
class Scatter(Rule):
    """y = y0 + alpha * (v summed onto rows ``index`` of the first per-sample axis): messages
    summed onto atoms, atoms onto their molecule (``index_add``, ``scatter_add``, ``index_put``
    with ``accumulate``); the transpose of ``Gather``.

    Attributes:
        index: (1, E) or (N, E) target row of each source row; rows of padding (NOTE [blocks])
            point at ``size``, one row past the end, which is dropped.
        size: target rows per sample.
        into: the first input is the target y0 (else y0 is a constant and the source is the only
            input).
        alpha: the factor of the source.
    """

    index: Tensor = None
    size: int = 0
    into: bool = False
    alpha: float = 1.0

    def jvp(self, ts):
        t, base = ts[-1], ts[0] if self.into else None
        if t is None:
            return base
        if self.alpha != 1:
            t = t * self.alpha
        if self.index.shape[0] == 1:
            out = t.new_zeros(t.shape[0], t.shape[1], self.size, *t.shape[3:])
            out.index_add_(2, self.index[0], t)
        else:
            n = self.index.shape[0]
            t = t.expand(n, *t.shape[1:])
            out = t.new_zeros(n, t.shape[1], self.size + 1, *t.shape[3:])
            out = out.scatter_add_(2, _along(self.index, t.shape, 2), t).narrow(2, 0, self.size)
        return out if base is None else out + base

    def vjp(self, u):
        if self.index.shape[0] == 1:
            v = u.index_select(2, self.index[0])
        else:
            n = self.index.shape[0]
            padded = torch.cat([u, u.new_zeros(*u.shape[:2], 1, *u.shape[3:])], 2)
            padded = padded.expand(n, *padded.shape[1:])
            e = self.index.shape[1]
            v = torch.gather(padded, 2, _along(self.index, (*u.shape[:2], e, *u.shape[3:]), 2,
                                               n))  # fmt: skip
        if self.alpha != 1:
            v = v * self.alpha
        return [u, v] if self.into else [v]


def _along(index: Tensor, shape, axis: int, n: int | None = None) -> Tensor:
    """index (N, E) as an index of ``torch.gather`` along ``axis`` of a tensor of ``shape``
    (N, R, E, *f) (its first axis ``n`` where given): expanded, no copy."""
    n = index.shape[0] if n is None else n
    view = [index.shape[0]] + [1] * (axis - 1) + [index.shape[1]] + [1] * (len(shape) - axis - 1)
    return index.reshape(view).expand(n, *shape[1:axis], index.shape[1], *shape[axis + 1 :])


@dataclass
class General(Rule):
    """Any differentiable step: derivatives from ``torch.func`` for this step only.

    Attributes:
        fn: the step as a function of its active inputs (constants bound), on (N, *s).
        primals: the recorded inputs.
    """

    fn: Callable[..., Tensor] = None
    primals: tuple[Tensor, ...] = ()
    _pullback: Callable | None = field(default=None, repr=False)
    _out_zero: Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        self.fn = differentiable_twice(self.fn)

    kind = "general"

    @property
    def macs(self) -> int:
        return super().macs * GENERAL_FACTOR

    def _expanded(self, ts: list[Tensor | None], e: int) -> list[Tensor]:
        return [
            p.new_zeros(p.shape[0], e, *p.shape[1:])
            if t is None
            else t.expand(p.shape[0], *t.shape[1:])
            for p, t in zip(self.primals, ts, strict=True)
        ]

    def jvp(self, ts):
        e = next(t for t in ts if t is not None).shape[1]
        tangents = self._expanded(ts, e)

        def push(*tt):
            return jvp(self.fn, self.primals, tt)[1]

        try:
            return _over_axis_1(push)(*tangents)
        except (RuntimeError, NotImplementedError) as err:
            if not is_missing_forward_ad(err):
                raise
        # J t as the transpose of u -> J^T u (linear), where forward-mode AD is missing.
        pullback, zero = self._pullback_fn(), self._zero_output()

        def pull_t(*tt):
            return vjp(pullback, zero)[1](tuple(tt))[0]

        return _over_axis_1(pull_t)(*tangents)

    def _zero_output(self) -> Tensor:
        """A zero like the step's output: where its (linear) pullback is differentiated."""
        if self._out_zero is None:
            with torch.no_grad():
                self._out_zero = torch.zeros_like(self.fn(*self.primals))
        return self._out_zero

    def _pullback_fn(self):
        if self._pullback is None:
            self._pullback = vjp(self.fn, *self.primals)[1]
        return self._pullback

    def vjp(self, u):
        return list(_over_axis_1(self._pullback_fn())(u))

    def second(self, g, ts):
        n, k = g.shape[:2]
        r = next(t for t in ts if t is not None).shape[1]
        tangents = [t.unsqueeze(1).expand(n, k, *t.shape[1:]).reshape(n, k * r, *t.shape[2:])
                    for t in self._expanded(ts, r)]  # fmt: skip
        cot = g.unsqueeze(2).expand(n, k, r, *g.shape[2:]).reshape(n, k * r, *g.shape[2:])

        def term(gg, *tt):
            return jvp(lambda *v: vjp(self.fn, *v)[1](gg), self.primals, tt)[1]

        def term_reverse(gg, *tt):  # C t = d/dv <d<g, f>/dv, t>, where forward AD is missing
            def inner(*v):
                grads = vjp(self.fn, *v)[1](gg)
                return sum((a * b).sum() for a, b in zip(grads, tt, strict=True))

            return torch.func.grad(inner, argnums=tuple(range(len(tt))))(*self.primals)

        try:
            out = _over_axis_1(term)(cot, *tangents)
        except (RuntimeError, NotImplementedError) as err:
            if not is_missing_forward_ad(err):
                raise
            out = _over_axis_1(term_reverse)(cot, *tangents)
        return [o.reshape(n, k, r, *o.shape[2:]) for o in out]


def _over_axis_1(fn: Callable) -> Callable:
    """``vmap(fn, in_dims=1, out_dims=1)``, with the batch axis moved to 1 after the map: where
    an output does not depend on the mapped inputs (the gradient of nn.MultiheadAttention's
    weights with respect to its value), vmap's ``out_dims=1`` expands it to the wrong shape."""

    def mapped(*args):
        out = vmap(fn, in_dims=1, out_dims=0)(*args)
        if isinstance(out, Tensor):
            return out.movedim(0, 1)
        return type(out)(o.movedim(0, 1) for o in out)

    return mapped


def is_missing_forward_ad(err: Exception) -> bool:
    """Whether an error says that an op lacks forward-mode AD (then reverse over reverse works)."""
    msg = str(err).lower()
    return any(s in msg for s in ("forward ad", "forward-mode", "forward mode", "jvp"))


class _TwiceDifferentiable(torch.overrides.TorchFunctionMode):
    """hardsigmoid and hardswish as clamps: torch's own backward of them has no derivative
    (``derivative for aten::hardsigmoid_backward is not implemented``), the clamp's has."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.hardsigmoid, F.hardswish):
            x = args[0]
            gate = torch.clamp(x + 3, 0, 6) / 6
            return gate if func is F.hardsigmoid else x * gate
        return func(*args, **kwargs)


def differentiable_twice(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` with ops whose fused kernels torch cannot differentiate twice replaced by their
    math: scaled dot-product attention on its math backend (the flash and memory-efficient
    kernels have no forward-mode AD and no double backward), hardsigmoid and hardswish as
    clamps."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def wrapped(*args, **kwargs):
        with sdpa_kernel([SDPBackend.MATH]), _TwiceDifferentiable():
            return fn(*args, **kwargs)

    return wrapped


def _axis(dim: int, ndim: int, extra: int) -> int:
    """Axis ``dim`` of a primal with ``ndim`` axes, in a tensor with ``extra`` axes after the
    batch axis (non-negative: the batch axis is never one)."""
    return dim % ndim + extra


@dataclass
class LayerNorm(Rule):
    """y = gamma * (v - mean) / sigma + beta over the last ``m`` axes (E elements per group).

    With x^ = (v - mean) / sigma, P the centering projector and f = <gamma g, x^>, per group:
    J t = gamma / sigma (P t - x^ <x^, t> / E), and with a = P (gamma g), s = <a, x^>:
    d^2 f = (-(a x^T + x^ a^T) - s P + 3 s x^ x^T / E) / (E sigma^2).

    Attributes:
        xhat: (N, *s) normalized input; inv: 1 / sigma (N, *lead, 1, ..., 1); weight: gamma or
        None; m: number of normalized axes.
    """

    xhat: Tensor = None
    inv: Tensor = None
    weight: Tensor | None = None
    m: int = 1

    kind = "general"

    @property
    def macs(self) -> int:
        return 8 * self.f_out * ELEMENTWISE_MACS

    def _mean(self, t: Tensor) -> Tensor:
        return t.mean(dim=tuple(range(-self.m, 0)), keepdim=True)

    def _project(self, t: Tensor, xhat: Tensor, scale: Tensor) -> Tensor:
        """scale (P - x^ x^T / E) t per group: three passes over t."""
        out = torch.addcmul(t - self._mean(t), xhat, self._mean(xhat * t), value=-1)
        return out.mul_(scale)

    def _scale(self, inv: Tensor) -> Tensor:
        """gamma / sigma (N, 1, *s or 1s)."""
        return inv if self.weight is None else inv * self.weight

    def jvp(self, ts):
        xhat, inv = self.xhat.unsqueeze(1), self.inv.unsqueeze(1)
        return self._project(ts[0], xhat, self._scale(inv))

    def vjp(self, u):
        xhat, inv = self.xhat.unsqueeze(1), self.inv.unsqueeze(1)
        return [self._project(u if self.weight is None else u * self.weight, xhat, inv)]

    def second(self, g, ts):
        t = ts[0].unsqueeze(1)  # (B, 1, R, *s)
        gt = g if self.weight is None else g * self.weight
        a = (gt - self._mean(gt)).unsqueeze(2)  # (N, K, 1, *s)
        xhat = self.xhat[:, None, None]
        inv2 = (self.inv * self.inv)[:, None, None]
        s = self._mean(a * xhat) * inv2  # <a, x^> / (E sigma^2)
        xt = self._mean(xhat * t)  # <x^, t> / E
        at = self._mean(a * t)  # <a, t> / E
        # -s (t - mean t) - a xt / sigma^2 + x^ (3 s xt - at / sigma^2), in four passes
        out = (t * -s).addcmul_(a, xt * inv2, value=-1)
        out.addcmul_(xhat, 3 * s * xt - at * inv2)
        return [out.add_(s * self._mean(t))]


@dataclass
class _Normalized(Rule):
    """A step normalizing along the axis ``dim`` with the probabilities p (N, *s)."""

    p: Tensor = None
    dim: int = -1

    kind = "general"

    @property
    def macs(self) -> int:
        return 4 * self.f_out * ELEMENTWISE_MACS

    def _sum(self, t: Tensor, extra: int) -> Tensor:
        """Sum along ``dim`` of t with ``extra`` axes after the batch axis."""
        return t.sum(_axis(self.dim, self.p.dim(), extra), keepdim=True)


@dataclass
class Softmax(_Normalized):
    """p = softmax(v) along ``dim``: J t = p (t - <p, t>); with w = p (g - <p, g>),
    d^2 <g, p> t = w t - w <p, t> - p <w, t>."""

    def jvp(self, ts):
        p = self.p.unsqueeze(1)
        return p * (ts[0] - self._sum(p * ts[0], 1))

    def vjp(self, u):
        p = self.p.unsqueeze(1)
        return [p * (u - self._sum(p * u, 1))]

    def second(self, g, ts):
        p = self.p.unsqueeze(1)
        w = (p * (g - self._sum(p * g, 1))).unsqueeze(2)  # (N, K, 1, *s)
        t = ts[0].unsqueeze(1)
        p = p.unsqueeze(2)
        return [w * t - w * self._sum(p * t, 2) - p * self._sum(w * t, 2)]


@dataclass
class LogSoftmax(_Normalized):
    """y = log_softmax(v) along ``dim``, p = exp(y): J t = t - <p, t>;
    d^2 <g, y> = -(sum g) (diag(p) - p p^T)."""

    def jvp(self, ts):
        return ts[0] - self._sum(self.p.unsqueeze(1) * ts[0], 1)

    def vjp(self, u):
        return [u - self.p.unsqueeze(1) * self._sum(u, 1)]

    def second(self, g, ts):
        total = self._sum(g, 1).unsqueeze(2)  # (N, K, 1, ...)
        p, t = self.p[:, None, None], ts[0].unsqueeze(1)
        return [-total * (p * t - p * self._sum(p * t, 2))]


@dataclass
class Bilinear(Rule):
    """y = a @ b of two inputs with the same batch axes: J = (t_a) b + a (t_b); the
    second-order terms g (t_b)^T (to a) and (t_a)^T g (to b)."""

    a: Tensor = None
    b: Tensor = None

    kind = "product"

    @property
    def macs(self) -> int:
        n, k = self.a.shape[-2:]
        m = self.b.shape[-1]
        return 2 * math.prod(self.a.shape[1:-2]) * n * k * m

    def _eq(self, left: str, right: str, out: str) -> str:
        """An einsum over (batch axes, per-sample batch axes ``...``, two matrix axes): the
        constant factor is not expanded over the E (or R) axis, as ``@`` would copy it."""
        bt = "abcdefgh"[: self.a.dim() - 3]
        return ",".join(x.replace("...", bt) for x in (left, right)) + "->" + out.replace("...", bt)

    def jvp(self, ts):
        ta, tb = ts
        out = None
        if ta is not None:
            out = torch.einsum(self._eq("NR...ik", "N...kj", "NR...ij"), ta, self.b)
        if tb is not None:
            term = torch.einsum(self._eq("N...ik", "NR...kj", "NR...ij"), self.a, tb)
            out = term if out is None else out + term
        return out

    def vjp(self, u):
        return [
            torch.einsum(self._eq("NE...ij", "N...kj", "NE...ik"), u, self.b),
            torch.einsum(self._eq("N...ik", "NE...ij", "NE...kj"), self.a, u),
        ]

    def second(self, g, ts):
        ta, tb = ts
        return [
            None if tb is None else torch.einsum(self._eq("NK...ij", "NR...kj", "NKR...ik"), g, tb),
            None if ta is None else torch.einsum(self._eq("NR...ik", "NK...ij", "NKR...kj"), ta, g),
        ]


_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
         3: torch.nn.functional.conv3d}  # fmt: skip
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
               3: torch.nn.grad.conv3d_input}  # fmt: skip


@dataclass
class Conv(Fold):
    """A zero-padded convolution without its bias: W t is ``F.conv{n}d``, W^T u its adjoint
    ``nn.grad.conv{n}d_input`` (the input gradient alone, never the weight's).

    Attributes:
        weight: (C_out, C_in / groups, *kernel), detached; stride, dilation: per spatial axis;
        padding: per spatial axis, or "same" / "valid"; groups: as in ``F.conv2d``.
    """

    weight: Tensor = None
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    def __post_init__(self):
        spatial = self.weight.dim() - 2
        conv, args = _CONV[spatial], (self.stride, self.padding, self.dilation, self.groups)
        self.fn = lambda t: conv(t, self.weight, None, *args)
        self._numeric = _numeric_padding(self.padding, self.weight, self.dilation)
        if self._numeric is not None and len(self.shapes_in[0]) == spatial + 1:
            per_axis = [per_spatial_axis(v, spatial)
                        for v in (self.stride, self._numeric, self.dilation)]  # fmt: skip
            self.sliding = Sliding(tuple(self.weight.shape[2:]), *per_axis, self.weight,
                                   self.groups)  # fmt: skip

    def vjp(self, u):
        if self._numeric is None:  # "same" with an odd total: more zeros after than before
            return super().vjp(u)
        lead = tuple(u.shape[:2])
        out = conv_input(fold(u), self.weight, self.shapes_in[0][1:], self.stride,
                         self._numeric, self.dilation, self.groups)  # fmt: skip
        return [unfold(out, lead)]


# Input channels up to which the adjoint of a stride-1 convolution on the CPU is computed as the
# convolution with the flipped kernel (NOTE [flipped adjoint]).
FLIPPED_ADJOINT_CHANNELS = 8


def conv_input(u: Tensor, weight: Tensor, size, stride, padding, dilation, groups: int) -> Tensor:
    """W^T u of a zero-padded convolution, its input gradient: u (B', C_out, *out) ->
    (B', C_in, *size).

    NOTE [flipped adjoint]: with stride 1 the adjoint is the convolution with the kernel
    flipped and its in and out channels swapped, padded by reach - 1 - padding. On the CPU
    (torch 2.13, oneDNN, one thread) that is 2-2.5x faster than the transposed convolution
    (``conv{n}d_input``) for the 1-6 channels of an input image (e.g. (344, 6, 24, 24) to one
    channel, 5 x 5 kernel: 4.4 against 11.1 ms), the same at 32 and slower at 64 -> 32
    channels (10.3 against 5.9 ms); the transposed one is kept elsewhere, and on GPUs.
    """
    nsp = weight.dim() - 2
    stride, padding, dilation = (per_spatial_axis(v, nsp) for v in (stride, padding, dilation))
    c_out, c_in, kernel = weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:])
    if (groups == 1 and stride == kernel and not any(padding) and all(d == 1 for d in dilation)
            and tuple(size[-nsp:]) == tuple(o * k for o, k in zip(u.shape[2:], kernel,
                                                                   strict=True))):  # fmt: skip
        return _patches_adjoint(u, weight)
    full = [d * (k - 1) - p for d, k, p in zip(dilation, kernel, padding, strict=True)]
    if (u.device.type == "cpu" and c_in <= FLIPPED_ADJOINT_CHANNELS and min(full) >= 0
            and all(s == 1 for s in stride)):  # fmt: skip
        w = weight.reshape(groups, c_out // groups, weight.shape[1], *kernel).transpose(1, 2)
        w = w.reshape(c_in, c_out // groups, *kernel).flip(list(range(2, nsp + 2)))
        return _CONV[nsp](u, w, None, 1, full, dilation, groups)
    return _CONV_INPUT[nsp]([u.shape[0], c_in, *size], weight, u, stride, padding, dilation,
                            groups)  # fmt: skip


def _patches_adjoint(u: Tensor, weight: Tensor) -> Tensor:
    """W^T u of a convolution whose stride is its kernel (a ViT's or a Mixer's patch
    embedding: the patches do not overlap): one matrix product with the kernel, each output
    position's channels to its patch, then the patches put in place. On the CPU 4x faster than
    the transposed convolution (a ViT-Tiny's embedding adjoint for 3072 rows: 52 against 221 ms),
    and the same numbers."""
    n, c_out, out = u.shape[0], u.shape[1], tuple(u.shape[2:])
    c_in, kernel = weight.shape[1], tuple(weight.shape[2:])
    nsp = len(kernel)
    patches = u.movedim(1, -1).reshape(-1, c_out) @ weight.reshape(c_out, -1)
    patches = patches.reshape(n, *out, c_in, *kernel)  # (B', *out, C_in, *kernel)
    order = [0, nsp + 1] + [a for i in range(nsp) for a in (1 + i, nsp + 2 + i)]
    return patches.permute(order).reshape(
        n, c_in, *(o * k for o, k in zip(out, kernel, strict=True))
    )


def per_spatial_axis(v, spatial: int) -> tuple[int, ...]:
    """An int or a sequence (of one value, or one per axis) as one int per spatial axis."""
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    return tuple(int(a) for a in (v * spatial if len(v) == 1 else v))


def _numeric_padding(padding, weight: Tensor, dilation) -> tuple[int, ...] | None:
    """Padding as numbers per spatial axis; None where "same" pads more after than before."""
    spatial = weight.dim() - 2
    if padding == "valid":
        return (0,) * spatial
    if padding == "same":
        dil = per_spatial_axis(dilation, spatial)
        total = [d * (k - 1) for d, k in zip(dil, weight.shape[2:], strict=True)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return per_spatial_axis(padding, spatial)
