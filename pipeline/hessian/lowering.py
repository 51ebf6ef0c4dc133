"""A recorded ATen graph made cheaper to replay: fewer view operations, faster bindings.

NOTE [lowering]: a replay runs each node of the trace through Python, and for the small models
replays serve (a PINN, a pair potential, hessQuik's networks) that is a fifth to a half of a
call. Two things make it cheaper, neither changes a value:

- Views. A chain of reshapes (``view``, ``_unsafe_view``, ``unsqueeze``, ``squeeze``) is one
  ``view`` of the chain's first input: a view keeps the row-major order of the elements, so where
  each step of the chain is a view, the last shape is a view of the first tensor too (whether it
  is depends only on where the memory is contiguous, which views do not change). A reshape or an
  ``expand`` to the shape its input has, and a transpose of a transpose of the same two axes, are
  their input. Not done in a graph holding an operation that changes a tensor's shape or strides
  in place (``t_``, ``resize_``, ...): those tell a view from its input.
- Bindings. ``torch.ops.aten.mul.Tensor(a, b)`` goes through the dispatcher's boxed path; the
  generated Python binding ``torch.mul(a, b)`` takes the same arguments in the same order (both
  follow the operator's schema) and runs 0.4-1.4 us faster on the 2-core CPU (``view``: 2.3
  against 0.9 us). An operation is bound to ``torch.<name>`` (or ``torch._C._nn.<name>``) where
  that is a generated binding; ``view``, ``expand``, the ``new_*`` factories and in-place
  operations, whose schemas start with the tensor they act on, to that tensor's method. Others
  (``slice``, ``_to_copy``, ``index``) keep the operator.

``replay`` runs a key eagerly where its lowered graph raises, or (on the CPU, where the comparison
waits for nothing) gives another result than the traced call, bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

aten = torch.ops.aten

_RESHAPES = frozenset({aten.view.default, aten._unsafe_view.default, aten.unsqueeze.default,
                       aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims})  # fmt: skip
# Operations that change a tensor's metadata in place: a view of x and x differ for them.
_RESTRIDES = frozenset({"t_", "transpose_", "unsqueeze_", "squeeze_", "resize_", "resize_as_",
                        "as_strided_", "set_", "swapdims_", "swapaxes_"})  # fmt: skip
# Schemas that start with the tensor they act on and have no ``torch.<name>`` binding.
_METHODS = {"view": "view", "_unsafe_view": "view", "expand": "expand", "new_ones": "new_ones",
            "new_zeros": "new_zeros", "new_empty": "new_empty", "new_full": "new_full"}  # fmt: skip
_BINDINGS = (torch._C._VariableFunctions, torch._C._nn)


def lower(graph: fx.Graph) -> None:
    """Rewrites ``graph`` (recorded by ``replay``, its nodes' ``meta["shape"]`` set) in place."""
    if not any(_name(n.target) in _RESTRIDES for n in graph.nodes if n.op == "call_function"):
        _simplify_views(graph)
        graph.eliminate_dead_code()
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            _bind(node)


def _simplify_views(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op != "call_function" or "shape" not in node.meta:
            continue
        base = node.args[0] if node.args else None
        if not isinstance(base, fx.Node) or "shape" not in base.meta:
            continue
        shape = node.meta["shape"]
        if node.target in _RESHAPES:
            while base.op == "call_function" and base.target in _RESHAPES:
                base = base.args[0]
            if base.meta.get("shape") == shape:
                node.replace_all_uses_with(base)
            else:
                node.target, node.args, node.kwargs = aten.view.default, (base, list(shape)), {}
        elif node.target is aten.alias.default or (
            node.target is aten.expand.default and base.meta["shape"] == shape
        ):
            node.replace_all_uses_with(base)
        elif node.target is aten.slice.Tensor:
            _narrow(node, base)
        elif _is_transpose(node) and _is_transpose(base) and _axes(node) == _axes(base):
            node.replace_all_uses_with(base.args[0])


def _narrow(node: fx.Node, base: fx.Node) -> None:
    """A slice with step 1 as ``narrow`` (a slice of a narrow along the same axis: one
    ``narrow`` of its input); over the whole axis, its input."""
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1 :])[:4]
    if step != 1 or node.kwargs:
        return
    size = base.meta["shape"][dim]
    dim %= len(base.meta["shape"])
    start = start or 0
    lo = min(max(start + size if start < 0 else start, 0), size)
    hi = size if end is None else min(max(end + size if end < 0 else end, lo), size)
    if (lo, hi) == (0, size):
        node.replace_all_uses_with(base)
        return
    length = hi - lo
    if base.op == "call_function" and base.target is aten.narrow.default and base.args[1] == dim:
        base, lo = base.args[0], lo + base.args[2]
    node.target, node.args, node.kwargs = aten.narrow.default, (base, dim, lo, length), {}


def _is_transpose(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (aten.transpose.int, aten.t.default)


def _axes(node: fx.Node) -> frozenset[int]:
    """The two axes a transpose swaps, counted from 0."""
    rank = len(node.meta["shape"])
    if node.target is aten.t.default:
        return frozenset({0, 1} if rank == 2 else ())
    return frozenset(a % rank for a in node.args[1:3])


def _bind(node: fx.Node) -> None:
    name = _name(node.target)
    method = _METHODS.get(name)
    if method is None and name.endswith("_") and not name.startswith("_"):
        method = name if hasattr(Tensor, name) else None  # in place: x.add_(y)
    if method is not None:
        node.op, node.target = "call_method", method
        return
    for namespace in _BINDINGS:
        fn = getattr(namespace, name, None)
        if fn is not None:
            node.target = fn
            return


def _name(target) -> str:
    packet = getattr(target, "_overloadpacket", None)
    return getattr(packet, "__name__", "")
