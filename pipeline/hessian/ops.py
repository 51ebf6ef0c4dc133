"""Which rule describes a call in a captured graph: modules, functions, tensor methods, ATen ops.

``rule_for(call)`` looks at one call whose output depends on the input and returns its ``Rule``,
``ALIAS`` (the output is its input: dropout in eval, ``contiguous``), or raises ``Unsupported``
with the reason (a call that would mix the samples of a batch, or random dropout). Calls without a
specific rule get ``General`` (derivatives of that call from ``torch.func``).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import elementwise
from .rules import (
    Add,
    Bilinear,
    Conv,
    Dense,
    Elementwise,
    Fold,
    General,
    LayerNorm,
    LogSoftmax,
    Piece,
    Product,
    Reshape,
    Rule,
    Scale,
    Select,
    Sliding,
    Softmax,
    per_spatial_axis,
)

aten = torch.ops.aten
ALIAS = "alias"


class Unsupported(Exception):
    """A graph the structured engine cannot take; the message says why, in one phrase."""


@dataclass
class Call:
    """One recorded call of a captured graph.

    Attributes:
        kind: ``call_module``, ``call_function`` or ``call_method``.
        target: the module, the function, or the method's name.
        args, kwargs: the concrete arguments (active tensors included).
        inputs: the active tensor arguments, in the order of ``fn``'s parameters.
        out: the output (N, *s) (the selected element of a tuple output).
        fn: the call as a function of its active inputs, constants bound.
        element: which element of a tuple output ``out`` is, or None.
    """

    kind: str
    target: Any
    args: tuple
    kwargs: dict
    inputs: list[Tensor]
    out: Tensor
    fn: Callable[..., Tensor]
    element: int | None = None

    def active(self, v: Any) -> bool:
        return isinstance(v, Tensor) and any(v is t for t in self.inputs)

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Argument ``i`` (after the module, or the input for functions) or keyword ``name``."""
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    @property
    def ndim(self) -> int:
        return self.inputs[0].dim()


# --------------------------------------------------------------------------------------------
# Names: each function, method, module class and ATen op mapped to one canonical name.


def _packet(target: Any) -> Any:
    return getattr(target, "overloadpacket", target)


def _names(table: dict[str, list[Any]]) -> dict[Any, str]:
    return {_packet(t): name for name, targets in table.items() for t in targets}


# name -> (functions and ATen ops, parameter names after the input)
_ELEMENTWISE_FUNCS: dict[str, tuple[list[Any], list[str]]] = {
    "tanh": ([torch.tanh, F.tanh, aten.tanh], []),
    "sigmoid": ([torch.sigmoid, F.sigmoid, aten.sigmoid], []),
    "softplus": ([F.softplus, aten.softplus], ["beta", "threshold"]),
    "gelu": ([F.gelu, aten.gelu], ["approximate"]),
    "silu": ([F.silu, aten.silu], []),
    "elu": ([F.elu, aten.elu], ["alpha"]),
    "relu": ([F.relu, torch.relu, aten.relu], []),
    "leaky_relu": ([F.leaky_relu, aten.leaky_relu], ["negative_slope"]),
    "prelu": ([F.prelu, aten.prelu], ["weight"]),
    "hardtanh": ([F.hardtanh, aten.hardtanh], ["min_val", "max_val"]),
    "relu6": ([F.relu6], []),
    "hardsigmoid": ([F.hardsigmoid, aten.hardsigmoid], []),
    "hardswish": ([F.hardswish, aten.hardswish], []),
    "abs": ([torch.abs, aten.abs], []),
    "exp": ([torch.exp, aten.exp], []),
    "log": ([torch.log, aten.log], []),
    "sin": ([torch.sin, aten.sin], []),
    "cos": ([torch.cos, aten.cos], []),
    "sqrt": ([torch.sqrt, aten.sqrt], []),
    "norm_root": ([elementwise.norm_root], []),
    "rsqrt": ([torch.rsqrt, aten.rsqrt], []),
    "reciprocal": ([torch.reciprocal, aten.reciprocal], []),
    "square": ([torch.square], []),
    "log_sigmoid": ([F.logsigmoid], []),
    "softsign": ([F.softsign], []),
    "mish": ([F.mish, aten.mish], []),
}
_ELEMENTWISE_BY_FN = {
    _packet(f): (name, params) for name, (fns, params) in _ELEMENTWISE_FUNCS.items() for f in fns
}
_ELEMENTWISE_METHODS = {"tanh", "sigmoid", "relu", "exp", "log", "sin", "cos", "sqrt", "rsqrt",
                        "reciprocal", "abs", "square"}  # fmt: skip

# (module class, name, attributes passed as parameters); subclasses first (ReLU6 < Hardtanh).
_ELEMENTWISE_MODULES: list[tuple[type, str, list[str]]] = [
    (nn.Tanh, "tanh", []),
    (nn.Sigmoid, "sigmoid", []),
    (nn.Softplus, "softplus", ["beta", "threshold"]),
    (nn.GELU, "gelu", ["approximate"]),
    (nn.SiLU, "silu", []),
    (nn.ELU, "elu", ["alpha"]),
    (nn.ReLU, "relu", []),
    (nn.LeakyReLU, "leaky_relu", ["negative_slope"]),
    (nn.PReLU, "prelu", ["weight"]),
    (nn.Hardtanh, "hardtanh", ["min_val", "max_val"]),
    (nn.LogSigmoid, "log_sigmoid", []),
    (nn.Softsign, "softsign", []),
    (nn.Mish, "mish", []),
    (nn.Hardsigmoid, "hardsigmoid", []),
    (nn.Hardswish, "hardswish", []),
]

_FUNCS = _names({
    "linear": [F.linear, aten.linear],
    "matmul": [operator.matmul, torch.matmul, torch.mm, torch.bmm, aten.mm, aten.matmul,
               aten.bmm],
    "layer_norm": [F.layer_norm, aten.layer_norm, aten.native_layer_norm],
    "softmax": [F.softmax, torch.softmax, aten.softmax, aten._softmax],
    "log_softmax": [F.log_softmax, torch.log_softmax, aten.log_softmax, aten._log_softmax],
    "addmm": [torch.addmm, aten.addmm],
    "conv": [F.conv1d, F.conv2d, F.conv3d, aten.conv1d, aten.conv2d, aten.conv3d],
    "convolution": [aten.convolution],
    "conv_transpose": [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d],
    "avg_pool": [F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                 F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, aten.avg_pool1d, aten.avg_pool2d,
                 aten.avg_pool3d, aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d,
                 aten.adaptive_avg_pool3d, aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d],
    "max_pool": [F.max_pool1d, F.max_pool2d, F.max_pool3d, F.max_pool1d_with_indices,
                 F.max_pool2d_with_indices, F.max_pool3d_with_indices, aten.max_pool1d,
                 aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices,
                 aten.max_pool3d_with_indices],
    "batch_norm": [F.batch_norm, aten.batch_norm],
    "batch_norm_eval": [aten._native_batch_norm_legit_no_training],
    "dropout": [F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                F.feature_alpha_dropout, aten.dropout, aten.alpha_dropout,
                aten.feature_dropout, aten.feature_alpha_dropout],
    "identity": [torch.clone, aten.clone, aten.contiguous, aten.alias, aten.lift_fresh_copy],
    "reshape": [torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze,
                aten.view, aten._unsafe_view, aten.reshape, aten.flatten, aten.unflatten,
                aten.squeeze, aten.unsqueeze],
    "permute": [torch.permute, aten.permute],
    "transpose": [torch.transpose, torch.swapaxes, torch.swapdims, aten.transpose],
    "movedim": [torch.movedim, torch.moveaxis],
    "getitem": [operator.getitem],
    "narrow": [torch.narrow, aten.narrow],
    "select": [torch.select, aten.select],
    "split": [torch.split, torch.chunk, torch.unbind, torch.tensor_split, aten.split,
              aten.split_with_sizes, aten.chunk, aten.unbind],
    "slice": [aten.slice],
    "sum": [torch.sum, torch.mean, aten.sum, aten.mean],
    "cat": [torch.cat, torch.concat, torch.concatenate, torch.stack, aten.cat, aten.stack],
    "pad": [F.pad, aten.pad, aten.constant_pad_nd],
    "flip": [torch.flip, torch.roll, aten.flip, aten.roll],
    "add": [operator.add, operator.iadd, torch.add, aten.add, aten.rsub],
    "sub": [operator.sub, operator.isub, torch.sub, torch.subtract, aten.sub],
    "mul": [operator.mul, operator.imul, torch.mul, torch.multiply, aten.mul],
    "div": [operator.truediv, operator.itruediv, torch.div, torch.divide, aten.div],
    "neg": [operator.neg, torch.neg, aten.neg],
    "pow": [operator.pow, torch.pow, aten.pow],
})  # fmt: skip

_METHODS = {
    "view": "reshape", "reshape": "reshape", "flatten": "reshape", "unflatten": "reshape",
    "squeeze": "reshape", "unsqueeze": "reshape", "view_as": "reshape", "reshape_as": "reshape",
    "contiguous": "identity", "clone": "identity",
    "permute": "permute", "transpose": "transpose", "swapaxes": "transpose",
    "swapdims": "transpose", "movedim": "movedim", "moveaxis": "movedim",
    "narrow": "narrow", "select": "select", "split": "split", "chunk": "split",
    "unbind": "split", "tensor_split": "split", "sum": "sum", "mean": "sum", "flip": "flip",
    "roll": "flip", "add": "add", "sub": "sub", "mul": "mul", "div": "div", "neg": "neg",
    "pow": "pow", "matmul": "matmul", "mm": "matmul", "bmm": "matmul",
    "softmax": "softmax", "log_softmax": "log_softmax", "to": "cast", "type": "cast",
    "float": "cast", "double": "cast", "type_as": "cast",
}  # fmt: skip


def canonical(call: Call) -> str | None:
    """The canonical name of a call, or None for a call without a specific rule."""
    if call.kind == "call_method":
        name = call.target[:-1] if call.target.endswith("_") else call.target  # in place
        if name in _ELEMENTWISE_METHODS:
            return "elementwise"
        return _METHODS.get(name)
    if call.kind == "call_function":
        target = _packet(call.target)
        if target in _ELEMENTWISE_BY_FN:
            return "elementwise"
        return _FUNCS.get(target)
    return None


# --------------------------------------------------------------------------------------------
# Rules.


def rule_for(call: Call) -> Rule | str:
    """The rule of a call whose output depends on the input (see module doc)."""
    if call.kind == "call_module":
        return _module_rule(call)
    name = canonical(call)
    maker = _MAKERS.get(name)
    rule = maker(call) if maker is not None else None
    return _general(call) if rule is None else rule


def _shapes(call: Call) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    return [tuple(t.shape[1:]) for t in call.inputs], tuple(call.out.shape[1:])


def _general(call: Call) -> General:
    return General(*_shapes(call), fn=call.fn, primals=tuple(call.inputs))


def _fold(call: Call, fn: Callable[..., Tensor], cost: int = 0, adjoint=None) -> Fold:
    return Fold(*_shapes(call), fn=fn, cost=cost, adjoint=adjoint)


def _dims(value: Any, ndim: int) -> list[int]:
    """Axes as non-negative ints (``None``: every axis)."""
    if value is None:
        return list(range(ndim))
    values = value if isinstance(value, (list, tuple, torch.Size)) else [value]
    return [int(v) % ndim for v in values]


def _keeps_batch(call: Call, *dims: Any) -> bool:
    return all(0 not in _dims(d, call.ndim) for d in dims)


def _module_rule(call: Call) -> Rule | str | None:
    m = call.target
    if len(call.inputs) != 1 or not call.active(call.args[0] if call.args else None):
        return _general(call)
    for cls, name, attrs in _ELEMENTWISE_MODULES:
        if isinstance(m, cls):
            return _elementwise(call, name, {a: getattr(m, a) for a in attrs})
    if isinstance(m, nn.Linear):
        return Dense(*_shapes(call), weight=m.weight)
    if isinstance(m, nn.modules.conv._ConvNd) and len(call.args) == 1:
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[m.weight.dim() - 3]
            w = m.weight.detach()
            fn = lambda t: conv(t, w, None, m.stride, m.padding, m.output_padding,  # noqa: E731
                                m.groups, m.dilation)  # fmt: skip
        elif m.padding_mode == "zeros":
            return _conv_rule(call, m.weight, m.stride, m.padding, m.dilation, m.groups)
        else:
            w = m.weight.detach()
            fn = lambda t: m._conv_forward(t, w, None)  # noqa: E731
        return _fold(call, fn, _conv_cost(call, m.weight))
    if isinstance(m, nn.modules.pooling._AdaptiveAvgPoolNd):
        return _fold(call, m, adjoint=_adaptive_pool_adjoint(call, _spatial(type(m).__name__)))
    if isinstance(m, nn.modules.pooling._AvgPoolNd):
        params = [m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                  getattr(m, "divisor_override", None)]  # fmt: skip
        return _avg_pool_rule(call, m, _spatial(type(m).__name__), params)
    if isinstance(m, nn.modules.pooling._MaxPoolNd):
        if m.return_indices and call.element is None:
            return _general(call)
        spatial = _spatial(type(m).__name__)
        return _max_pool(call, spatial, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return _batch_norm(call, m.running_mean, m.running_var, m.weight, m.eps, m.training)
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return ALIAS if not m.training or m.p == 0 else _random_dropout()
    if isinstance(m, nn.Identity):
        return ALIAS
    if isinstance(m, nn.LayerNorm) and not m_mixes_batch(call, m.normalized_shape):
        return _layer_norm_rule(call, m.normalized_shape, m.weight, m.eps)
    if isinstance(m, (nn.Softmax, nn.LogSoftmax)) and m.dim is not None and m.dim % call.ndim:
        return _normalized(call, Softmax if isinstance(m, nn.Softmax) else LogSoftmax, m.dim)
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return Reshape(*_shapes(call))
    return _general(call)


def _elementwise(call: Call, name: str, params: dict[str, Any]) -> Elementwise:
    a = call.inputs[0]
    d1, d2 = elementwise.derivatives(name, a, call.out, **params)
    return Elementwise(*_shapes(call), name=name, d1=d1, d2=d2)


def _elementwise_call(call: Call) -> Rule | None:
    if len(call.inputs) != 1 or not call.active(call.args[0]):
        return None
    if call.kind == "call_method":
        name = call.target.rstrip("_")
        return _elementwise(call, name, {})
    name, names = _ELEMENTWISE_BY_FN[_packet(call.target)]
    params = {p: call.arg(i + 1, p) for i, p in enumerate(names)}
    params = {k: v for k, v in params.items() if v is not None}
    if name == "elu" and (call.arg(2, "scale", 1) != 1 or call.arg(3, "input_scale", 1) != 1):
        return None
    return _elementwise(call, name, params)


def _conv_cost(call: Call, weight: Tensor) -> int:
    return max(call.out[0].numel(), call.inputs[0][0].numel()) * math.prod(weight.shape[1:])


def _linear(call: Call) -> Rule | None:
    w = call.arg(1, "weight")
    if len(call.inputs) != 1 or not call.active(call.args[0]) or call.active(w):
        return None
    return Dense(*_shapes(call), weight=w)


def _matmul(call: Call) -> Rule | None:
    a, b = call.args[0], call.arg(1, "other", call.kwargs.get("mat2"))
    if len(call.inputs) == 1 and call.active(a) and isinstance(b, Tensor) and b.dim() == 2:
        return Dense(*_shapes(call), weight=b.T)
    if len(call.inputs) == 2 and call.active(a) and call.active(b):
        if a.dim() == b.dim() >= 3 and a.shape[:-2] == b.shape[:-2]:
            return Bilinear(*_shapes(call), a=a, b=b)
    return None


def _layer_norm_rule(call: Call, shape, weight, eps) -> Rule:
    v = call.inputs[0]
    m = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
    dims = tuple(range(-m, 0))
    mean = v.mean(dims, keepdim=True)
    inv = torch.rsqrt(v.var(dims, unbiased=False, keepdim=True) + eps)
    return LayerNorm(*_shapes(call), xhat=(v - mean) * inv, inv=inv, weight=weight, m=m)


def _layer_norm(call: Call) -> Rule | None:
    if len(call.inputs) != 1 or not call.active(call.args[0]) or call.element not in (None, 0):
        return None
    shape, weight = call.arg(1, "normalized_shape"), call.arg(2, "weight")
    eps = call.arg(4, "eps", 1e-5)
    if call.active(weight) or m_mixes_batch(call, shape):
        return None
    return _layer_norm_rule(call, shape, weight, eps)


def m_mixes_batch(call: Call, shape) -> bool:
    """Whether normalizing over the last ``len(shape)`` axes reaches the batch axis."""
    m = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
    return m >= call.ndim


def _softmax_dim(call: Call) -> int | None:
    dim = call.arg(1, "dim")
    if dim is None or len(call.inputs) != 1 or not call.active(call.args[0]):
        return None
    if call.kwargs.get("dtype") is not None or (len(call.args) > 2 and call.args[2] not in (
            None, False)):  # fmt: skip
        return None  # a dtype argument (or aten's half_to_float)
    return None if dim % call.ndim == 0 else dim


def _softmax(call: Call) -> Rule | None:
    dim = _softmax_dim(call)
    return None if dim is None else _normalized(call, Softmax, dim)


def _log_softmax(call: Call) -> Rule | None:
    dim = _softmax_dim(call)
    return None if dim is None else _normalized(call, LogSoftmax, dim)


def _normalized(call: Call, rule: type[Softmax] | type[LogSoftmax], dim: int) -> Rule:
    """Softmax or log_softmax along ``dim``, with the probabilities p of the output."""
    return rule(*_shapes(call), p=call.out if rule is Softmax else call.out.exp(), dim=dim)


def _addmm(call: Call) -> Rule | None:
    if call.kwargs.get("beta", 1) != 1 or call.kwargs.get("alpha", 1) != 1:
        return None
    x, w = call.args[1], call.args[2]
    if len(call.inputs) != 1 or not call.active(x) or w.dim() != 2:
        return None
    return Dense(*_shapes(call), weight=w.T)


def _conv(call: Call) -> Rule | None:
    """F.conv{n}d / aten.conv{n}d (input, weight, bias, stride, padding, dilation, groups), and
    the transposed ones: the same call without the bias."""
    w = call.arg(1, "weight")
    if len(call.inputs) != 1 or not call.active(call.args[0]) or call.active(w):
        return None
    w = w.detach()
    names, defaults = ["stride", "padding", "dilation", "groups"], [1, 0, 1, 1]
    params = [call.arg(3 + i, p, d) for i, (p, d) in enumerate(zip(names, defaults, strict=True))]
    if "transpose" not in getattr(call.target, "__name__", ""):
        spatial = w.dim() - 2
        stride, padding, dilation, groups = (
            p if isinstance(p, (str, tuple, list)) or i == 3 else (p,) * spatial
            for i, p in enumerate(params)
        )
        return _conv_rule(call, w, tuple(stride), padding, tuple(dilation), groups)
    rest = list(call.args[3:])
    kwargs = {k: v for k, v in call.kwargs.items() if k != "bias"}
    target = call.target
    return _fold(call, lambda t: target(t, w, None, *rest, **kwargs), _conv_cost(call, w))


def _conv_rule(call: Call, weight, stride, padding, dilation, groups) -> Conv:
    padding = padding if isinstance(padding, str) else tuple(padding)
    shapes = _shapes(call)
    return Conv(
        *shapes,
        fn=None,
        cost=_conv_cost(call, weight),
        weight=weight.detach(),
        stride=tuple(stride),
        padding=padding,
        dilation=tuple(dilation),
        groups=groups,
    )


def _convolution(call: Call) -> Rule | None:
    """aten.convolution (input, weight, bias, stride, padding, dilation, transposed, ...)."""
    w = call.args[1]
    if len(call.inputs) != 1 or not call.active(call.args[0]) or call.active(w):
        return None
    w, rest, target = w.detach(), list(call.args[3:]), call.target
    return _fold(call, lambda t: target(t, w, None, *rest), _conv_cost(call, w))


def _avg_pool(call: Call) -> Rule | None:
    if len(call.inputs) != 1 or not call.active(call.args[0]):
        return None
    target, rest, kwargs = call.target, call.args[1:], call.kwargs
    name = getattr(target, "__name__", str(target))
    spatial = _spatial(name)

    def fn(t):
        return target(t, *rest, **kwargs)

    if "adaptive" in name:
        return _fold(call, fn, adjoint=_adaptive_pool_adjoint(call, spatial))
    names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override"]  # fmt: skip
    defaults = [None, None, 0, False, True, None]
    params = [call.arg(i + 1, p, d) for i, (p, d) in enumerate(zip(names, defaults, strict=True))]
    return _avg_pool_rule(call, fn, spatial, params)


def _avg_pool_rule(call: Call, fn: Callable[[Tensor], Tensor], spatial: int, params) -> Fold:
    """An average pool (module or function) with its closed-form adjoint and, where it is one,
    its window op; ``params``: kernel, stride, padding, ceil_mode, count_include_pad, divisor."""
    fold = _fold(call, fn, adjoint=_avg_pool_adjoint(call, spatial, *params))
    fold.sliding = _avg_sliding(call, spatial, *params)
    return fold


def _pool_axes(spatial: int, kernel, stride, padding) -> tuple[tuple[int, ...], ...]:
    """A pool's kernel, stride (None or []: the kernel) and padding, one int per spatial axis."""
    kernel = per_spatial_axis(kernel, spatial)
    stride = kernel if stride is None or stride == [] else per_spatial_axis(stride, spatial)
    return kernel, stride, per_spatial_axis(padding, spatial)


def _avg_pool_adjoint(call: Call, spatial, kernel, stride, padding, ceil, count_pad, divisor):
    """The transpose of a 2-d or 3-d average pool (``aten.avg_pool{n}d_backward``; the input it
    takes is only read for its shape: an expanded zero); None for 1-d pools."""
    if spatial == 1:
        return None
    backward = {2: aten.avg_pool2d_backward, 3: aten.avg_pool3d_backward}[spatial]
    kernel, stride, padding = _pool_axes(spatial, kernel, stride, padding)
    shape = call.inputs[0].shape[1:]

    def adjoint(u: Tensor) -> tuple[Tensor]:
        zero = u.new_zeros(()).expand(u.shape[0], *shape)
        return (backward(u, zero, kernel, stride, padding, ceil, count_pad, divisor),)

    return adjoint


def _avg_sliding(call: Call, spatial, kernel, stride, padding, ceil, count_pad, divisor):
    """An average pool over (N, C, *sp) as a window op (sums over ``divisor``), where it is
    one: without ``ceil_mode`` (partial windows at the end), and with its zero padding counted;
    None otherwise."""
    h = call.inputs[0]
    kernel, stride, padding = _pool_axes(spatial, kernel, stride, padding)
    if h.dim() != spatial + 2 or ceil or (any(padding) and not count_pad):
        return None
    divisor = int(divisor or math.prod(kernel))
    return Sliding(kernel, stride, padding, (1,) * spatial, divisor=divisor)


def _adaptive_pool_adjoint(call: Call, spatial: int):
    """The transpose of a 2-d or 3-d adaptive average pool; None for 1-d pools."""
    if spatial == 1:
        return None
    backward = {2: aten._adaptive_avg_pool2d_backward, 3: aten._adaptive_avg_pool3d_backward}
    shape = call.inputs[0].shape[1:]

    def adjoint(u: Tensor) -> tuple[Tensor]:
        return (backward[spatial](u, u.new_zeros(()).expand(u.shape[0], *shape)),)

    return adjoint


def _max_pool(call: Call, spatial: int, kernel, stride, padding, dilation, ceil_mode) -> Rule:
    """A max pool over ``spatial`` axes as a selection of each sample's maxima."""
    h = call.inputs[0]
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
    _, index = pool(h, kernel, stride or None, padding, dilation, ceil_mode, return_indices=True)
    if h.dim() == spatial + 2:  # (N, C, *spatial): the pool's indices count within each channel
        plane = math.prod(h.shape[2:])
        channel = torch.arange(h.shape[1], device=h.device)
        index = index + channel.reshape(1, -1, *[1] * spatial) * plane
    sliding = None
    if h.dim() == spatial + 2:
        kernel, stride, padding = _pool_axes(spatial, kernel, stride, padding)
        sliding = Sliding(kernel, stride, padding, per_spatial_axis(dilation, spatial))
    return Select(*_shapes(call), index=index.reshape(h.shape[0], -1), sliding=sliding)


def _spatial(name: str) -> int:
    """1, 2 or 3 from the name of a pool (``max_pool2d``, ``MaxPool3d``)."""
    return int(re.search(r"([123])d", name).group(1))


def _max_pool_call(call: Call) -> Rule | None:
    if len(call.inputs) != 1 or not call.active(call.args[0]) or call.element not in (None, 0):
        return None
    if call.kwargs.get("return_indices") and call.element is None:
        return None
    names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode"]
    defaults = [None, None, 0, 1, False]
    kernel, stride, padding, dilation, ceil = (
        call.arg(i + 1, p, d) for i, (p, d) in enumerate(zip(names, defaults, strict=True))
    )
    name = getattr(call.target, "__name__", str(call.target))
    return _max_pool(call, _spatial(name), kernel, stride, padding, dilation, ceil)


def _batch_norm(call: Call, mean, var, weight, eps, training) -> Rule | str:
    if training or var is None or mean is None:
        raise Unsupported("BatchNorm without running statistics uses batch statistics")
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    ndim = call.ndim
    return Scale(*_shapes(call), factor=scale.reshape(-1, *[1] * (ndim - 2)))


def _batch_norm_call(call: Call) -> Rule | None:
    if len(call.inputs) != 1 or not call.active(call.args[0]):
        return None
    if _packet(call.target) is _packet(aten._native_batch_norm_legit_no_training):
        if call.element not in (None, 0):
            return None
        _, weight, _, mean, var, _, eps = call.args[:7]
        return _batch_norm(call, mean, var, weight, eps, False)
    names = ["running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
    if _packet(call.target) is _packet(aten.batch_norm):
        names = ["weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"]
    v = {p: call.arg(i + 1, p) for i, p in enumerate(names)}
    eps = v["eps"] if v["eps"] is not None else 1e-5
    return _batch_norm(call, v["running_mean"], v["running_var"], v["weight"], eps, v["training"])


def _random_dropout():
    raise Unsupported(
        "dropout is active in eval mode (F.dropout with training=True): the model is random; "
        "pass training=self.training"
    )


def _dropout(call: Call) -> Rule | str | None:
    p = call.arg(1, "p", 0.5)
    if _packet(call.target) in {_packet(aten.dropout), _packet(aten.alpha_dropout),
                                _packet(aten.feature_dropout),
                                _packet(aten.feature_alpha_dropout)}:  # fmt: skip
        training = call.arg(2, "train", True)
    else:
        training = call.arg(2, "training", True)
    return ALIAS if not training or p == 0 else _random_dropout()


def _identity(call: Call) -> Rule | str | None:
    if len(call.inputs) == 1 and call.active(call.args[0]):
        return ALIAS
    return None


def _cast(call: Call) -> Rule | str | None:
    if (
        len(call.inputs) == 1
        and call.active(call.args[0])
        and call.out.dtype == call.inputs[0].dtype
    ):
        return ALIAS
    return None


def _reshape(call: Call) -> Rule | None:
    if len(call.inputs) != 1 or not call.active(call.args[0]):
        return None
    return Reshape(*_shapes(call))


def _permute(call: Call) -> Rule | None:
    dims = call.args[1:] if call.kind == "call_method" else [call.arg(1, "dims")]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    if len(call.inputs) != 1 or _dims(dims[0], call.ndim) != [0]:
        return None
    order = [d % call.ndim for d in dims]
    inverse = [order.index(i) for i in range(len(order))]
    return _fold(call, lambda t: t.permute(*order), adjoint=lambda u: (u.permute(*inverse),))


def _transpose(call: Call) -> Rule | None:
    d0, d1 = call.arg(1, "dim0"), call.arg(2, "dim1")
    if len(call.inputs) != 1 or not _keeps_batch(call, d0, d1):
        return None
    return _fold(call, lambda t: t.transpose(d0, d1), adjoint=lambda u: (u.transpose(d0, d1),))


def _movedim(call: Call) -> Rule | None:
    src, dst = call.arg(1, "source"), call.arg(2, "destination")
    if len(call.inputs) != 1 or not _keeps_batch(call, src, dst):
        return None
    return _fold(call, lambda t: torch.movedim(t, src, dst))


def _getitem(call: Call) -> Rule | None:
    x, index = call.args
    if len(call.inputs) != 1 or not call.active(x) or call.out.shape[:1] != x.shape[:1]:
        return None
    items = index if isinstance(index, tuple) else (index,)
    first = items[0] if items else None
    if any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items):
        return None
    full = isinstance(first, slice) and first == slice(None)
    ellipsis = first is Ellipsis and sum(i is not None for i in items[1:]) < x.dim()
    if not (full or ellipsis):
        return None
    fn = lambda t: t[index]  # noqa: E731
    axis = _piece_axis(items)
    if axis is not None:
        return _fold(call, fn, adjoint=_piece_adjoint(call, axis, fn))
    return _fold(call, fn, adjoint=_gather_adjoint(call, items))


def _gather_adjoint(call: Call, items: tuple) -> Callable[[Tensor], tuple[Tensor]] | None:
    """The transpose of ``t[:, ..., idx]`` with one integer index tensor on one axis (the others
    whole): the entries added back where they were taken (``index_add``); None for any other
    index (torch.func's vjp)."""
    full = slice(None)
    cut = [i for i, item in enumerate(items) if not (isinstance(item, slice) and item == full)]
    if len(cut) != 1 or cut[0] == 0:
        return None
    ax, idx = cut[0], items[cut[0]]
    if not (isinstance(idx, Tensor) and not idx.is_floating_point() and idx.dtype != torch.bool):
        return None
    shape = tuple(call.inputs[0].shape[1:])
    flat = idx.reshape(-1) % shape[ax - 1]  # index_add takes no negative positions

    def adjoint(u: Tensor) -> tuple[Tensor]:
        lead = u.shape[0]
        taken = u.reshape(lead, *shape[: ax - 1], flat.numel(), *shape[ax:])
        return (u.new_zeros(lead, *shape).index_add_(ax, flat, taken),)

    return adjoint


def _reduction_adjoint(call: Call, name: str) -> Callable[[Tensor], tuple[Tensor]] | None:
    """The transpose of a sum or mean over some axes: the adjoint broadcast back over them
    (divided by their size for a mean)."""
    if call.kwargs.get("dtype") is not None or len(call.args) > 3:
        return None
    dims = sorted(_dims(call.arg(1, "dim"), call.ndim))
    keep = bool(call.arg(2, "keepdim", False))
    shape = tuple(call.inputs[0].shape[1:])
    count = math.prod(call.inputs[0].shape[i] for i in dims)
    scale = 1.0 / count if name == "mean" else None

    def adjoint(u: Tensor) -> tuple[Tensor]:
        if not keep:
            for i in dims:
                u = u.unsqueeze(i)
        u = u.expand(u.shape[0], *shape)
        return ((u * scale) if scale is not None else u,)

    return adjoint


def _piece_axis(items: tuple) -> int | None:
    """The one axis that an index (``t[:, a:b]``, ``t[:, :, i]``) takes a piece of, if any."""
    full = slice(None)
    cut = [i for i, item in enumerate(items) if not (isinstance(item, slice) and item == full)]
    if len(cut) != 1 or cut[0] == 0:
        return None
    item = items[cut[0]]
    if type(item) is int or (isinstance(item, slice) and item.step in (None, 1)):
        return cut[0]
    return None


def _positional(call: Call, name: str) -> Rule | None:
    """narrow / select / sum / mean / cat: an op whose axis argument (``dim``, right after the
    input) is not the batch axis."""
    dim = call.arg(1, "dim")
    if (
        name == "sum"
        and call.kind == "call_method"
        and not call.args[1:]
        and "dim" not in call.kwargs
    ):
        return None  # over every axis: mixes the samples
    if name == "cat":
        tensors = call.args[0]
        active = [call.active(t) for t in tensors]
        if sum(active) != len(call.inputs) or not all(isinstance(t, Tensor) for t in tensors):
            return None
        ndim = tensors[0].dim() + (1 if _packet(call.target) in _STACKS else 0)
        dim = 0 if dim is None else dim
        if 0 in _dims(dim, ndim):
            return None
        target, kwargs = call.target, call.kwargs
        if not all(active):
            return _cat_with_constants(call, tensors, active, dim % ndim)
        adjoint = None
        if _packet(target) not in _STACKS:  # the transpose of a concatenation: its pieces
            at, sizes = dim % ndim, [t.shape[dim] for t in tensors]
            adjoint = lambda u: tuple(torch.split(u, sizes, at))  # noqa: E731
        return _fold(call, lambda *ts: target(list(ts), *call.args[1:], **kwargs), adjoint=adjoint)
    if len(call.inputs) != 1 or not call.active(call.args[0]) or dim is None:
        return None
    if not _keeps_batch(call, dim):
        return None
    fn = _rebound(call)
    adjoint = _piece_adjoint(call, dim, fn) if name in ("narrow", "select") else None
    if name == "sum":
        adjoint = _reduction_adjoint(call, _reduction_kind(call))
    return _fold(call, fn, adjoint=adjoint)


def _cat_with_constants(call: Call, tensors, active: list[bool], at: int) -> Rule | None:
    """A concatenation of active tensors with constant ones (a ViT's class token before its
    patches): linear in the active ones, whose tangents are concatenated with zeros where the
    constants were; its transpose takes their pieces back."""
    if _packet(call.target) in _STACKS or any(t.dim() != call.ndim for t in tensors):
        return None
    shapes = [tuple(t.shape[1:]) for t in tensors]
    sizes = [t.shape[at] for t in tensors]
    target, rest, kwargs = call.target, call.args[1:], call.kwargs

    def fn(*ts: Tensor) -> Tensor:
        given = iter(ts)
        parts = [next(given) if a else ts[0].new_zeros(ts[0].shape[0], *s)
                 for a, s in zip(active, shapes, strict=True)]  # fmt: skip
        return target(parts, *rest, **kwargs)

    def adjoint(u: Tensor) -> tuple[Tensor, ...]:
        return tuple(p for p, a in zip(torch.split(u, sizes, at), active, strict=True) if a)

    return _fold(call, fn, adjoint=adjoint)


def _reduction_kind(call: Call) -> str:
    """``sum`` or ``mean`` (both are made by the ``sum`` maker)."""
    name = call.target if call.kind == "call_method" else getattr(call.target, "__name__", "")
    return "mean" if "mean" in str(name) else "sum"


_STACKS = {_packet(torch.stack), _packet(aten.stack)}


def _rebound(call: Call) -> Callable[[Tensor], Tensor]:
    """The call with its (single, first) active argument replaced: ``t -> f(t, *rest)``."""
    rest, kwargs, element = call.args[1:], call.kwargs, call.element
    if call.kind == "call_method":
        name = call.target

        def fn(t):
            return getattr(t, name)(*rest, **kwargs)
    else:
        target = call.target

        def fn(t):
            return target(t, *rest, **kwargs)

    if element is None:
        return fn
    return lambda t: fn(t)[element]


def _split(call: Call) -> Rule | None:
    if len(call.inputs) != 1 or not call.active(call.args[0]) or call.element is None:
        return None
    name = call.target if call.kind == "call_method" else getattr(call.target, "__name__", "")
    at = 0 if "unbind" in str(name) else 1
    dim = call.arg(at + 1, "dim", 0)
    if not _keeps_batch(call, dim):
        return None
    fn = _rebound(call)
    return _fold(call, fn, adjoint=_piece_adjoint(call, dim, fn))


def _slice(call: Call) -> Rule | None:
    dim = call.arg(1, "dim", 0)
    if len(call.inputs) != 1 or not _keeps_batch(call, dim):
        return None
    fn = _rebound(call)
    return _fold(call, fn, adjoint=_piece_adjoint(call, dim, fn))


# (call, argument values, per-sample shape, element) -> (start, length, removed) or None.
_PIECES: dict[tuple, tuple[int, int, bool] | None] = {}


def _piece_adjoint(call: Call, dim: int, fn: Callable[[Tensor], Tensor]) -> Piece | None:
    """The transpose of taking a contiguous piece along ``dim`` (split, chunk, narrow, select,
    slice): zero padding around it. The piece is found once per call site and shape by applying
    ``fn`` to positions along the axis (on the host, then cached: later calls dispatch nothing);
    where it is not contiguous, None (torch.func's vjp)."""
    shape = tuple(call.inputs[0].shape[1:])
    ax = dim % (len(shape) + 1)
    target = call.target if call.kind != "call_module" else id(call.target)
    key = (call.kind, target, repr(call.args[1:]), repr(call.kwargs), shape, call.element)
    if key not in _PIECES:
        _PIECES[key] = _find_piece(fn, shape, ax)
    found = _PIECES[key]
    if found is None:
        return None
    start, length, removed = found
    return Piece(ax - 1, start, length, shape[ax - 1], removed)


def _find_piece(fn, shape: tuple[int, ...], ax: int) -> tuple[int, int, bool] | None:
    size = shape[ax - 1]
    view = [size if i == ax else 1 for i in range(len(shape) + 1)]
    positions = torch.arange(size, dtype=torch.float64).reshape(view).expand(1, *shape)
    piece = fn(positions)
    removed = piece.dim() == positions.dim() - 1
    along = piece.unsqueeze(ax) if removed else piece
    line = along[0].movedim(ax - 1, 0)  # the positions along the axis, first
    index = line.reshape(line.shape[0], -1)[:, 0].tolist()
    start, length = int(index[0]), len(index)
    if index != list(range(start, start + length)):
        return None
    return start, length, removed


def _pad(call: Call) -> Rule | None:
    pad = call.arg(1, "pad")
    if len(call.inputs) != 1 or not call.active(call.args[0]) or len(pad) > 2 * (call.ndim - 1):
        return None
    if _packet(call.target) is _packet(aten.constant_pad_nd):
        return _fold(call, lambda t: F.pad(t, pad))
    mode = call.arg(2, "mode", "constant")
    return _fold(call, lambda t: F.pad(t, pad, mode))


def _flip(call: Call) -> Rule | None:
    name = call.target if call.kind == "call_method" else getattr(call.target, "__name__", "")
    if "roll" in str(name):
        dims = call.arg(2, "dims")
        if dims is None:
            return None
    else:
        dims = call.arg(1, "dims")
    if len(call.inputs) != 1 or not _keeps_batch(call, dims):
        return None
    return _fold(call, _rebound(call))


def _add(call: Call, sign: float = 1.0) -> Rule | None:
    a, b = call.args[0], call.arg(1, "other")
    alpha = call.kwargs.get("alpha", 1)
    if _packet(call.target) is _packet(aten.rsub):
        a, b, sign = b, a, -sign  # rsub(a, b) = b - alpha a
    if not _same_rank(call):
        return None
    signs = (1.0, sign * alpha)
    if call.active(a) and call.active(b):
        return Add(*_shapes(call), signs=signs)
    if call.active(a):
        return Scale(*_shapes(call), factor=None)
    return Scale(*_shapes(call), factor=None if signs[1] == 1 else signs[1])


def _same_rank(call: Call) -> bool:
    return all(t.dim() == call.out.dim() for t in call.inputs)


def _mul(call: Call) -> Rule | None:
    a, b = call.args[0], call.arg(1, "other")
    if call.active(a) and call.active(b):
        if not _same_rank(call) or a.shape[0] != b.shape[0]:
            return None
        return Product(*_shapes(call), a=a, b=b)
    if not _same_rank(call):
        return None
    c = b if call.active(a) else a
    if not isinstance(c, (int, float, Tensor)):
        return None
    return Scale(*_shapes(call), factor=c)


def _div(call: Call) -> Rule | None:
    a, b = call.args[0], call.arg(1, "other")
    mode = call.kwargs.get("rounding_mode")
    if mode is not None or not call.active(a) or call.active(b) or not _same_rank(call):
        return None
    if not isinstance(b, (int, float, Tensor)):
        return None
    return Scale(*_shapes(call), factor=1 / b)


def _neg(call: Call) -> Rule | None:
    return Scale(*_shapes(call), factor=-1.0)


def _pow(call: Call) -> Rule | str | None:
    a, p = call.args[0], call.arg(1, "exponent")
    if not call.active(a) or not isinstance(p, (int, float)) or isinstance(p, bool):
        return None
    if p == 1:
        return ALIAS
    if p == 0:
        return None
    return _elementwise(call, "pow", {"exponent": float(p)})


def _sub(call: Call) -> Rule | None:
    return _add(call, -1.0)


_MAKERS: dict[str, Callable[[Call], Rule | str | None]] = {
    "elementwise": _elementwise_call,
    "linear": _linear,
    "matmul": _matmul,
    "addmm": _addmm,
    "conv": _conv,
    "conv_transpose": _conv,
    "convolution": _convolution,
    "avg_pool": _avg_pool,
    "max_pool": _max_pool_call,
    "batch_norm": _batch_norm_call,
    "batch_norm_eval": _batch_norm_call,
    "dropout": _dropout,
    "identity": _identity,
    "cast": _cast,
    "reshape": _reshape,
    "permute": _permute,
    "transpose": _transpose,
    "movedim": _movedim,
    "getitem": _getitem,
    "narrow": lambda c: _positional(c, "narrow"),
    "select": lambda c: _positional(c, "select"),
    "sum": lambda c: _positional(c, "sum"),
    "cat": lambda c: _positional(c, "cat"),
    "split": _split,
    "slice": _slice,
    "pad": _pad,
    "flip": _flip,
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "div": _div,
    "neg": _neg,
    "pow": _pow,
    "layer_norm": _layer_norm,
    "softmax": _softmax,
    "log_softmax": _log_softmax,
}
