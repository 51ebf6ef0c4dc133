"""Steps of a captured graph on patches (``windows``): which steps can act on them, on which
windows, and how.

Tangents are (B, R, C, *size) and adjoints (N, K, R, C, *size), on the windows of ``windows``;
a step acts on patches when it is

* a window op (``rules.Sliding``): a convolution or an average pool, applied to the patch
  extended by the zeros its output window reads (a convolution with full padding), its adjoint
  by the transposed convolution (``avg_pool``'s backward); or a max pool (``Select``), by the
  positions of its maxima relative to the window;
* elementwise, its factors gathered at the window;
* a constant scale by channel (eval BatchNorm, a product with a scalar);
(elementwise steps and scales only where their input has the output's shape)
* an add of inputs of the output's shape (residual adds), each patch placed on the union window.

Anything else (a reshape into a dense layer, products of branches, a per-sample normalisation)
is refused here (None) and the local schedule runs it densely.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules import (
    ELEMENTWISE_MACS,
    Add,
    Elementwise,
    Fold,
    Rule,
    Scale,
    Select,
    Sliding,
    conv_input,
)
from .windows import Blocks, Window, cells, embed, extent, pad

aten = torch.ops.aten
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def sliding(rule: Rule) -> Sliding | None:
    """The step as a window op (convolutions, average and max pools), if it is one."""
    if isinstance(rule, (Fold, Select)):
        return rule.sliding
    return None


def _spatial(shape: tuple[int, ...], nsp: int) -> tuple[int, ...] | None:
    """The map of a per-sample shape (C, *map) with ``nsp`` spatial axes."""
    return tuple(shape[1:]) if len(shape) == nsp + 1 else None


def _pointwise(rule: Rule) -> bool:
    """An elementwise step, or a scale by a constant per channel (or a scalar, or none), whose
    input has the output's shape."""
    if not isinstance(rule, (Elementwise, Scale)) or rule.shapes_in[0] != rule.shape_out:
        return False
    f = rule.factor if isinstance(rule, Scale) else None
    if not isinstance(f, Tensor):
        return True
    ndim = len(rule.shape_out)
    return f.dim() <= ndim and all(n == 1 for n in f.shape[max(0, f.dim() - ndim + 1) :])


def out_window(rule: Rule, ins: list[Window | None]) -> Window | None:
    """The window of the step's output tangents from those of its inputs' (None: no tangent);
    None where the step cannot act on these patches."""
    given = [w for w in ins if w is not None]
    if not given or len(given) != len(ins) and not isinstance(rule, Add):
        return None
    nsp = len(given[0].map)
    out_map = _spatial(rule.shape_out, nsp)
    if out_map is None or any(_spatial(s, nsp) is None for s in rule.shapes_in):
        return None
    op = sliding(rule)
    if op is not None:
        return cells(given[0], op, out_map)
    if _pointwise(rule):
        return given[0]
    if isinstance(rule, Add) and all(s == rule.shape_out for s in rule.shapes_in):
        out = given[0]
        for w in given[1:]:
            out = out.union(w) if out is not None else None
        return out
    return None


def in_windows(rule: Rule, w: Window) -> list[Window] | None:
    """The windows of the adjoints of a step's inputs from the window of its output's adjoint;
    None where the step cannot act on these patches."""
    nsp = len(w.map)
    if any(_spatial(s, nsp) is None for s in rule.shapes_in):
        return None
    op = sliding(rule)
    if op is not None:
        return [extent(w, op, _spatial(rule.shapes_in[0], nsp))]
    if _pointwise(rule):
        return [w]
    if isinstance(rule, Add) and all(s == rule.shape_out for s in rule.shapes_in):
        return [w] * len(rule.shapes_in)
    return None


def macs(rule: Rule, w: Window) -> int:
    """Multiply-adds per row of the step on patches whose output window is ``w`` (tangents; for
    adjoints, the window of the output's adjoint): its arithmetic plus the elementwise passes
    over the patch that the patches add (zeros around it, masks, factors gathered at the
    window), which are as costly as a small convolution's arithmetic."""
    area = rule.shape_out[0] * w.area
    op = sliding(rule)
    if op is not None and op.weight is not None:
        return w.area * op.weight.numel() + 2 * area * ELEMENTWISE_MACS
    passes = {Select: 3, Scale: 1, Add: 2 * len(rule.shapes_in)}.get(type(rule), 2)
    return passes * area * ELEMENTWISE_MACS


def jvp(rule: Rule, ts: list[Tensor | None], ins: list[Window | None], out: Window,
        blocks: Blocks) -> Tensor:  # fmt: skip
    """The step's output tangents (B, R, C, *out.size) from the inputs' patches."""
    op = sliding(rule)
    if isinstance(rule, Select):
        return _select_jvp(rule, ts[0], ins[0], out, blocks)
    if op is not None:
        e = extent(out, op, ins[0].map)
        t = ts[0]
        y = _conv(t.reshape(-1, *t.shape[2:]), ins[0], e, op)
        return y.reshape(*t.shape[:2], *y.shape[1:]).mul_(blocks.mask(out, y))
    if isinstance(rule, Elementwise):
        return blocks.gather(rule.d1, out) * ts[0]
    if isinstance(rule, Scale):
        return ts[0] if rule.factor is None else ts[0] * rule.factor
    total = None  # Add
    for s, t, w in zip(rule.signs, ts, ins, strict=True):
        if t is not None:
            term = embed(t if s == 1 else s * t, w, out)
            total = term if total is None else total + term
    return total


def vjp(rule: Rule, u: Tensor, w: Window, blocks: Blocks) -> list[tuple[Tensor, Window]]:
    """The adjoints of the step's inputs (N, K, R, C, *size) with their windows
    (``in_windows``) from the output's adjoint u on ``w``."""
    op = sliding(rule)
    if isinstance(rule, Select):
        return [_select_vjp(rule, u, w, blocks)]
    if op is not None:
        e = extent(w, op, _spatial(rule.shapes_in[0], len(w.map)))
        nsp = len(w.size)
        v = _conv_t(u.reshape(-1, *u.shape[-nsp - 1 :]), op, e.size)
        return [(v.reshape(*u.shape[: -nsp - 1], *v.shape[1:]).mul_(blocks.mask(e, v)), e)]
    if isinstance(rule, Elementwise):
        return [(blocks.gather(rule.d1, w).unsqueeze(1) * u, w)]
    if isinstance(rule, Scale):
        return [(u if rule.factor is None else u * rule.factor, w)]
    return [(u if s == 1 else s * u, w) for s in rule.signs]  # Add


def _conv(t: Tensor, w: Window, e: Window, op: Sliding) -> Tensor:
    """The window op on patches t (B', C, *w.size) extended to e, its output's window: a
    convolution's own padding where the zeros before and after agree."""
    lo = [a - b for a, b in zip(w.shift, e.shift, strict=True)]
    hi = [z - a - s for z, a, s in zip(e.size, lo, w.size, strict=True)]
    nsp = len(w.size)
    if op.weight is None:  # an average pool
        t = pad(t, lo, hi)
        if nsp == 1:  # avg_pool1d has no divisor: as a depthwise convolution
            return _CONV[1](t, _box(op, t), None, op.stride, 0, 1, t.shape[1])
        pool = F.avg_pool2d if nsp == 2 else F.avg_pool3d
        return pool(t, op.kernel, op.stride, 0, False, True, op.divisor)
    same = [max(0, min(a, b)) for a, b in zip(lo, hi, strict=True)]
    t = pad(t, [a - s for a, s in zip(lo, same, strict=True)],
            [b - s for b, s in zip(hi, same, strict=True)])  # fmt: skip
    return _CONV[nsp](t, op.weight, None, op.stride, same, op.dilation, op.groups)


def _conv_t(u: Tensor, op: Sliding, size: tuple[int, ...]) -> Tensor:
    """The transpose of a window op (no padding) on (B', C, *cells): (B', C_in, *size)."""
    nsp = len(size)
    if op.weight is not None:
        return conv_input(u, op.weight, size, op.stride, 0, op.dilation, op.groups)
    if nsp == 1:
        return _CONV_T[1](u, _box(op, u), None, op.stride, 0, 0, u.shape[1])
    backward = aten.avg_pool2d_backward if nsp == 2 else aten.avg_pool3d_backward
    zero = u.new_zeros(()).expand(*u.shape[:2], *size)  # read for its shape only
    return backward(u, zero, op.kernel, op.stride, [0] * nsp, False, True, op.divisor)


def _box(op: Sliding, like: Tensor) -> Tensor:
    """An average pool's depthwise weight (C, 1, *kernel): 1 / divisor."""
    return like.new_full((like.shape[1], 1, *op.kernel), 1.0 / op.divisor)


def _select_index(rule: Select, c: Window, e: Window, blocks: Blocks) -> Tensor:
    """(N, R, C, prod c.size): where each output position of c takes its maximum from, as a
    flat position in the window e of its inputs (``extent``).

    Output position j of the window (per axis) reads e from j * stride on, so the flat
    position is a static part, sum over axes of j * stride * (e's stride), plus that of the
    maximum within the output position's own input window (``rel``), gathered once from the
    map; at output positions outside the map it reads 0 (the result there is masked)."""
    key = (id(rule), c)
    if key not in blocks.cache:
        op, n, channels = rule.sliding, rule.index.shape[0], rule.shapes_in[0][0]
        in_map, out_map = tuple(rule.shapes_in[0][1:]), tuple(rule.shape_out[1:])
        pos = (rule.index % math.prod(in_map)).reshape(n, channels, *out_map)
        rel, static, stride = None, None, math.prod(in_map)
        for a, (m, s, p) in enumerate(zip(in_map, op.stride, op.padding, strict=True)):
            stride //= m
            cell = torch.arange(out_map[a], device=pos.device) * s - p
            coord = pos // stride % m - cell.reshape(-1, *[1] * (len(in_map) - a - 1))
            step = math.prod(e.size[a + 1 :])
            rel = coord * step if rel is None else rel + coord * step
            j = torch.arange(c.size[a], device=pos.device) * s * step
            j = j.reshape(-1, *[1] * (len(in_map) - a - 1))
            static = j if static is None else static + j
        idx = blocks.gather(rel, c) + static
        blocks.cache[key] = idx.flatten(-len(in_map))
    return blocks.cache[key]


def _select_jvp(rule: Select, t: Tensor, w: Window, out: Window, blocks: Blocks) -> Tensor:
    e = extent(out, rule.sliding, w.map)
    t = embed(t, w, e).flatten(-len(w.size))  # (B, R, C, prod e.size)
    idx = _select_index(rule, out, e, blocks)
    y = torch.gather(t.expand(idx.shape[0], *t.shape[1:]), -1, idx)
    return y.unflatten(-1, out.size) * blocks.mask(out, y)


def _select_vjp(rule: Select, u: Tensor, w: Window, blocks: Blocks) -> tuple[Tensor, Window]:
    nsp = len(w.size)
    e = extent(w, rule.sliding, _spatial(rule.shapes_in[0], nsp))
    idx = _select_index(rule, w, e, blocks).unsqueeze(1)  # (N, 1, R, C, prod w.size)
    flat = u.flatten(-nsp)
    idx = idx.expand(*flat.shape)
    out = flat.new_zeros(*flat.shape[:-1], e.area)
    out.scatter_add_(-1, idx, flat)
    return out.unflatten(-1, e.size), e
