"""Steps whose outputs nobody reads, left out: a captured graph narrowed to what its output needs.

NOTE [pruning]: a ViT's logits read one token of its last block (``x[:, 0]``, the class token),
but the block computes all of them: its MLP, its attention output and its norms run on 17 tokens
(ViT-Tiny on 3x32x32, patch 8) where 1 is read. The Hessian schedules carry D tangents or
adjoints through every step, so every such step costs D times its forward. Here the demand of
every tensor is found from the output down, as a range of one per-sample axis (``Range``), and
the graph is rewritten so that the steps whose output is needed only on a range compute that
range alone: their inputs are narrowed (``torch.narrow``) where they come from steps that compute
more, sizes given in a ``reshape`` are set to the range's length, and the selection that asked
for the range (the output's ``x[:, 0]``) reads its index from the range's start. Each transfer is
exact by the step's kind (the ``Rule`` it was recorded with, and the ``fx`` call): a row-wise
step (a ``Linear``, a LayerNorm, an activation, a softmax along another axis) needs of its input
what is needed of its output; a matrix product's rows come from its first factor's rows and all
of its second factor (attention: the class token's query against every key and value); sums and
products broadcast; permutes and reshapes map the axis when they keep it whole. Anything else
needs all of its inputs. A range that would spare less than ``MIN_SAVED`` of the graph's counted
work is left alone (the narrows cost copies). ``graph.record`` applies it once per model and input
shape and keeps the narrowed graph only where it gives the recorded output again.

For ViT-Tiny of depth 2 the last block's MLP, projection and norms run on 1 token of 17: 34% of
the tangent-adjoint work counted, 25% of the time measured (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any

import torch
from torch import Tensor, fx

from .rules import (
    Add,
    Bilinear,
    Dense,
    Elementwise,
    LayerNorm,
    LogSoftmax,
    Product,
    Reshape,
    Scale,
    Softmax,
)

log = logging.getLogger(__name__)

Range = tuple[int, int, int]  # (per-sample axis, start, stop); None: all of the tensor
# The least share of the counted work a narrowed graph must spare: a narrow costs a copy of the
# part it takes, once a pass, and the first call at a shape records the graph twice. ViT-Tiny of
# depth 12 spares 5.7% (its last block of 12), of depth 2 32%; a mean over the patches that
# leaves out the class token would spare 1/17 of the last block (0.3% at depth 12).
MIN_SAVED = 0.02

_PERMUTES = {"permute", "transpose"}
_SELECTS = {"getitem", "select", "narrow"}
_RESHAPES = {"reshape", "view"}
_SHAPELESS = {"flatten", "contiguous", "squeeze", "unsqueeze"}  # no sizes among the arguments


def pruned(gm: fx.GraphModule, steps: dict[fx.Node, Any], values: dict[fx.Node, Any],
           slots: dict[fx.Node, int], plain: set[int]) -> fx.GraphModule | None:  # fmt: skip
    """The graph narrowed to what its output needs (NOTE [pruning]), or None where nothing
    worth it is spared.

    Args:
        gm: the captured graph.
        steps: the rule each node was recorded with (nodes that made a step).
        values: each node's value on the recorded batch.
        slots: each node's slot (nodes whose value depends on x); aliases share their input's.
        plain: the slots whose batch axis is first and not in blocks of rows.
    """
    demand, needed = _demands(gm, steps, values, slots, plain)
    region = {n: r for n, r in demand.items() if r is not None}
    total = sum(rule.macs for rule in steps.values())
    saved = sum(steps[n].macs * (1 - (r[2] - r[1]) / values[n].shape[r[0] + 1])
                for n, r in region.items() if n in steps)  # fmt: skip
    if saved < MIN_SAVED * max(total, 1):
        return None
    log.debug("%s narrowed to what its output reads: %.0f%% of the counted work spared",
              type(gm).__name__, 100 * saved / total)  # fmt: skip
    return _rewrite(gm, region, needed, values)


def _demands(gm, steps, values, slots, plain):
    """Each node's demanded range (None: all), from the output down, and each node's demand on
    its active inputs."""
    needs: dict[fx.Node, list[Range | None]] = {}
    demand: dict[fx.Node, Range | None] = {}
    needed: dict[fx.Node, dict[fx.Node, Range | None]] = {}
    for node in reversed(gm.graph.nodes):
        if node.op == "output":
            for n in node.all_input_nodes:
                needs.setdefault(n, []).append(None)
            continue
        if node not in slots:
            continue
        own = _union(needs.get(node, [None]))
        if any(user not in slots and not _sizeless(user) for user in node.users):
            own = None  # a shape, a mask, a tuple made of it: all of it
        ins = _transfer(node, own, steps, values, slots, plain)
        if ins is None:  # the node cannot compute a part: it needs all of its inputs
            own = None
            ins = _transfer(node, None, steps, values, slots, plain) or {}
        demand[node], needed[node] = own, ins
        for n, r in ins.items():
            needs.setdefault(n, []).append(r)
    return demand, needed


def _sizeless(node: fx.Node) -> bool:
    """Whether a node reads only what a part of a tensor shares with all of it (its dtype)."""
    return node.op == "call_function" and node.target is getattr and node.args[1] in _SIZELESS


_SIZELESS = {"dtype", "device", "is_cuda", "layout", "ndim", "requires_grad"}


def _union(ranges: list[Range | None]) -> Range | None:
    if any(r is None for r in ranges) or len({r[0] for r in ranges}) != 1:
        return None
    return ranges[0][0], min(r[1] for r in ranges), max(r[2] for r in ranges)


def _name(node: fx.Node) -> str | None:
    """The call's plain name (``permute``, ``getitem``, ...), for the calls handled by name."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        if node.target is operator.getitem:
            return "getitem"
        return node.target.__name__ if node.target in _TORCH_CALLS else None
    return None


_TORCH_CALLS = {torch.permute, torch.transpose, torch.select, torch.narrow, torch.reshape,
                torch.flatten, torch.squeeze, torch.unsqueeze}  # fmt: skip


def _transfer(node, out: Range | None, steps, values, slots, plain):
    """{active input node: its demanded range} for the node's demanded ``out``; None where the
    node cannot compute only that range."""
    active = [n for n in node.all_input_nodes if n in slots]
    if out is None:
        if _name(node) in _SELECTS and len(active) == 1 and node.args[0] is active[0]:
            return {active[0]: _selected(node, values)}
        return {n: None for n in active}
    if slots[node] not in plain or any(slots[n] not in plain for n in active):
        return None
    rule = steps.get(node)
    if rule is None:  # an alias of its input (dropout in eval, Identity)
        alias = len(active) == 1 and slots[active[0]] == slots[node]
        return {active[0]: out} if alias else None
    a, lo, hi = out
    shape = tuple(values[node].shape[1:])
    if isinstance(rule, (Elementwise, Scale, Add, Product)):
        # (constants broadcast against the output; a Linear's weight acts on the last axis)
        if not _constants_broadcast(node, out, values, slots):
            return None
        if isinstance(rule, Scale) and not _broadcasts(rule.factor, shape, a):
            return None
        return {n: _aligned(out, tuple(values[n].shape[1:]), shape) for n in active}
    if isinstance(rule, Dense):
        return {active[0]: out} if not rule.flat and a < len(shape) - 1 else None
    if isinstance(rule, LayerNorm):
        return {active[0]: out} if a < len(shape) - rule.m else None
    if isinstance(rule, (Softmax, LogSoftmax)):
        return {active[0]: out} if a != rule.dim % (len(shape) + 1) - 1 else None
    if isinstance(rule, Bilinear) and len(active) == 2 and tuple(node.args[:2]) == tuple(active):
        return _matmul(out, active, values, shape)
    if isinstance(rule, Reshape) and len(active) == 1 and node.args[0] is active[0]:
        return _reshaped(node, out, tuple(values[active[0]].shape[1:]), shape)
    name = _name(node)
    if name in _PERMUTES and len(active) == 1 and node.args[0] is active[0]:
        axes = _permutation(node, len(shape) + 1)
        return {active[0]: (axes[a + 1] - 1, lo, hi)} if axes and axes[0] == 0 else None
    if name == "getitem" and len(active) == 1 and node.args[0] is active[0]:
        return _through_index(node, out, values)
    return None


def _aligned(out: Range, shape: tuple[int, ...], like: tuple[int, ...]) -> Range | None:
    """``out`` on an input of ``shape`` that broadcasts against the output's ``like``."""
    a = out[0] - (len(like) - len(shape))
    if a < 0 or shape[a] == 1:
        return None  # the input has no such axis, or one element along it: all of it
    return a, out[1], out[2]


def _broadcasts(c: Any, shape: tuple[int, ...], a: int) -> bool:
    """Whether a constant of the step, against the (batch-first) output of per-sample ``shape``,
    has one element along the per-sample axis ``a`` (so the narrowed step may keep it)."""
    if not isinstance(c, Tensor):
        return True
    axis = c.dim() - (len(shape) - a)
    return axis < 0 or c.shape[axis] == 1


def _constants_broadcast(node: fx.Node, out: Range, values, slots) -> bool:
    """Whether the node's tensor arguments that do not depend on x broadcast along the axis."""
    shape = tuple(values[node].shape[1:])
    args = [n for n in node.all_input_nodes if n not in slots]
    return all(_broadcasts(values.get(n), shape, out[0]) for n in args)


def _matmul(out: Range, active, values, shape) -> dict[fx.Node, Range | None] | None:
    """a @ b: the rows of the output from a's rows, its columns from b's columns."""
    (a, lo, hi), n = out, len(shape)
    first, second = (tuple(values[v].shape[1:]) for v in active)
    if len(first) < 2 or len(second) < 2:
        return None
    if a == n - 2:
        return {active[0]: (len(first) - 2, lo, hi), active[1]: None}
    if a == n - 1:
        return {active[0]: None, active[1]: (len(second) - 1, lo, hi)}
    return {active[0]: _aligned(out, first, shape), active[1]: _aligned(out, second, shape)}


def _reshaped(node: fx.Node, out: Range, before: tuple[int, ...], after: tuple[int, ...]):
    """The axis of the input that a reshape keeps whole as the output's axis, if any."""
    name = _name(node)
    if name not in _RESHAPES | _SHAPELESS or (name in _RESHAPES and _sizes(node) is None):
        return None
    a = out[0]
    for b in range(len(before)):
        if before[b] == after[a] and math.prod(before[:b]) == math.prod(after[:a]):
            return {node.args[0]: (b, out[1], out[2])}
    return None


def _sizes(node: fx.Node) -> tuple[list, bool] | None:
    """A reshape's sizes, and whether they were given as one tuple."""
    args = node.args[1:]
    if node.kwargs or not args:
        return None
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return list(args[0]), True
    return list(args), False


def _permutation(node: fx.Node, rank: int) -> list[int] | None:
    """The input axis of each output axis of a permute or transpose (batch axis included)."""
    args = node.args[1:]
    if node.kwargs:
        return None
    if _name(node) == "transpose":
        if len(args) != 2 or not all(isinstance(v, int) for v in args):
            return None
        i, j = (v % rank for v in args)
        axes = list(range(rank))
        axes[i], axes[j] = j, i
        return axes
    dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)
    if len(dims) != rank or not all(isinstance(d, int) for d in dims):
        return None
    return [d % rank for d in dims]


def _index(node: fx.Node, values) -> list | None:
    """A getitem's index with its Ellipsis expanded, where it is basic indexing (ints, slices of
    ints, None); None otherwise."""
    index = node.args[1]
    index = list(index) if isinstance(index, tuple) else [index]
    for i in index:
        if isinstance(i, bool) or not isinstance(i, (int, slice, type(None), type(Ellipsis))):
            return None
        if isinstance(i, slice) and not all(
            isinstance(v, (int, type(None))) for v in (i.start, i.stop, i.step)
        ):
            return None
    rank = values[node.args[0]].dim()
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    if index.count(Ellipsis) > 1 or used > rank:
        return None
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index[k : k + 1] = [slice(None)] * (rank - used)
    return index


def _entries(index: list, rank: int) -> list[tuple[int | None, Any]]:
    """(input axis, or None for a new one; its entry) per index entry, padded to the rank."""
    out, axis = [], 0
    for i in index:
        out.append((None if i is None else axis, i))
        axis += 0 if i is None else 1
    return out + [(b, slice(None)) for b in range(axis, rank)]


def _selected(node: fx.Node, values) -> Range | None:
    """The range of one per-sample axis that a selection reads (None: all, or several axes)."""
    source = values[node.args[0]]
    if _name(node) in ("select", "narrow"):
        args = list(node.args[1:])
        if node.kwargs or len(args) < 2 or not all(isinstance(v, int) for v in args):
            return None
        axis = args[0] % source.dim()
        start = args[1] % source.shape[axis]
        stop = start + (args[2] if _name(node) == "narrow" else 1)
        return (axis - 1, start, stop) if axis > 0 else None
    index = _index(node, values)
    if index is None:
        return None
    picked = []
    for b, entry in _entries(index, source.dim()):
        if b is None:
            continue
        size = source.shape[b]
        if isinstance(entry, int):
            picked.append((b, entry % size, entry % size + 1))
            continue
        start, stop, step = entry.indices(size)
        if step != 1:
            return None
        if (start, stop) != (0, size):
            picked.append((b, start, max(start, stop)))
    if len(picked) != 1 or picked[0][0] == 0 or picked[0][1] == picked[0][2]:
        return None
    b, start, stop = picked[0]
    return b - 1, start, stop


def _through_index(node: fx.Node, out: Range, values) -> dict[fx.Node, Range] | None:
    """A getitem whose output is needed on a range: the input axis that entry keeps whole."""
    index = _index(node, values)
    if index is None:
        return None
    source = values[node.args[0]]
    kept = [(b, e) for b, e in _entries(index, source.dim()) if not isinstance(e, int)]
    b, entry = kept[out[0] + 1]
    if b is None or entry.indices(source.shape[b]) != (0, source.shape[b], 1):
        return None
    return {node.args[0]: (b - 1, out[1], out[2])}


def _rewrite(gm: fx.GraphModule, region, needed, values) -> fx.GraphModule | None:
    """A copy of the graph in which each node of the region computes its range alone."""
    graph = fx.Graph()
    new: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, new))
    for node in gm.graph.nodes:
        if node in region:
            for n, need in needed[node].items():
                have = region.get(n)
                if need is not None and need != have:
                    start = need[1] - (have[1] if have is not None else 0)
                    with graph.inserting_before(new[node]):
                        part = graph.call_function(
                            torch.narrow, (new[n], need[0] + 1, start, need[2] - need[1])
                        )
                    new[node].replace_input_with(new[n], part)
            if _name(node) in _RESHAPES:
                _resize(new[node], region[node])
        elif any(n in region for n in node.all_input_nodes):
            # only a selection reads part of a node of the region: it indexes from its start
            if _name(node) not in _SELECTS or not _rebase(new[node], region[node.args[0]], values,
                                                         node):  # fmt: skip
                return None
    graph.lint()
    return fx.GraphModule(gm, graph, type(gm).__name__)


def _resize(node: fx.Node, r: Range) -> None:
    """A reshape of the region: its size along the range's axis, the range's length."""
    sizes, packed = _sizes(node)
    if sizes[r[0] + 1] == -1:
        return
    sizes[r[0] + 1] = r[2] - r[1]
    node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)


def _rebase(copy: fx.Node, r: Range, values, node: fx.Node) -> bool:
    """The selection's position along the range's axis counted from the range's start."""
    size = values[node.args[0]].shape[r[0] + 1]
    if _name(node) in ("select", "narrow"):
        args = list(copy.args)
        if args[1] % values[node.args[0]].dim() != r[0] + 1:
            return False
        args[2] = args[2] % size - r[1]
        copy.args = tuple(args)
        return True
    index = _index(node, values)
    entries = _entries(index, values[node.args[0]].dim())
    at = next(k for k, (b, _) in enumerate(entries) if b == r[0] + 1)
    entry = entries[at][1]
    if isinstance(entry, int):
        entry = entry % size - r[1]
    else:
        start, stop, _ = entry.indices(size)
        entry = slice(start - r[1], stop - r[1])
    index = [e for _, e in entries]
    index[at] = entry
    copy.args = (copy.args[0], tuple(index))
    return True
