"""Samples concatenated along one axis (graph networks, interatomic potentials), recorded on
batch-first values.

NOTE [blocks]: message-passing models concatenate the B samples of a batch into one node axis
(``pos.reshape(-1, 3)``: B * n atoms), gather atom features onto the edges of the graph
(``h[src]``, ``index_select``), and sum messages back onto the atoms and the atoms onto their
molecule (``index_add``, ``scatter_add``). Such a tensor holds each sample as a block of rows of
its axis 0 (the blocks in sample order); its layout is ``Blocks``: the rows of each sample.

The recorder (``graph``) keeps every value batch-first; a tensor in blocks is kept as
(B, W, *f), W the rows of the largest block, each sample's rows first and the rest padding, a
copy of one of that sample's rows (or of some real row where a sample has none). Each step of
the model on such tensors becomes a step on these values:

* a call that acts on each row alike (a Linear layer, an activation, a product, a sum over the
  features) keeps the blocks: its rule is made on the rows as if each were a sample, and then
  widened to the blocks (``_widen``): the derivative tensors it holds (s'(a), a factor) laid out
  in blocks, a ``Fold`` or ``General`` step applied to all rows at once;
* a gather across the axis with an integer index (``index_select``, ``x[idx]``, ``gather``, a
  boolean mask) is a ``rules.Gather`` when every gathered row lies in the block of the sample its
  output row belongs to (checked on the index values; refused otherwise, with the reason), with
  the index local to each block: one index (1, E) for all samples when every block's is the same
  (a fixed molecule's edges: tangents shared by the samples stay shared), else (N, E);
* a scatter-add across the axis (``index_add``, ``scatter_add``, ``index_put`` with
  ``accumulate``) is a ``rules.Scatter`` under the same check, into the blocks of its target: the
  target tensor's own, or for a fresh constant (``torch.zeros(B)``, ``zeros_like``) blocks of its
  length / B rows;
* reshapes move between the layouts: (B, n, 3) -> (B * n, 3) starts blocks of n rows, and a
  reshape of equal blocks back to B rows (``e.view(B, n).sum(1)``), or a scatter into blocks of one
  row (the energy of each molecule), ends them.

Padding is harmless: rows never mix but in gathers and scatters, gathers read real rows only,
and scatters drop padded rows, so first- and second-order adjoints are zero there, and tangents,
values and derivatives there are finite copies of real ones.

Index tensors are constants of the recorded tape (integers carry no derivative). One that does
not depend on the input (a buffer, ``arange`` offsets) is analysed with the tracing of a replay
(``replay``) suspended, so that a replay keeps the analysis and recomputes only the local indices
from the index; one that depends on it (a radius neighbour list: ``nonzero`` of a function of the
positions) is read in the open, and a call holding such a read is never replayed.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

from .ops import ALIAS, Call, Unsupported, canonical, rule_for
from .rules import (
    Add,
    Bilinear,
    Dense,
    Elementwise,
    Fold,
    Gather,
    General,
    LayerNorm,
    LogSoftmax,
    Piece,
    Product,
    Reshape,
    Rule,
    Scale,
    Scatter,
    Softmax,
)

# (rule, input slots, value (N, *s)) -> the new slot
AddStep = Callable[[Rule, list[int], Tensor], int]


@dataclass(frozen=True)
class Blocks:
    """The rows of axis 0 of a tensor that belong to each sample, samples in order.

    Attributes:
        counts: rows of each of the B samples.
    """

    counts: tuple[int, ...]

    @property
    def samples(self) -> int:
        return len(self.counts)

    @property
    def width(self) -> int:
        """W: rows of the largest block (the per-sample row axis of the batch-first value)."""
        return max(self.counts, default=0)

    @property
    def length(self) -> int:
        return sum(self.counts)

    @property
    def uniform(self) -> bool:
        """Whether every sample has the same rows (then there is no padding)."""
        return len(set(self.counts)) <= 1

    def offsets(self, device) -> Tensor:
        """(B,) the first row of each sample."""
        starts = [0]
        for c in self.counts[:-1]:
            starts.append(starts[-1] + c)
        return torch.tensor(starts, dtype=torch.long, device=device)

    def owner(self, rows: Tensor) -> Tensor:
        """The sample of each row in ``rows`` (any shape, values in [0, length))."""
        ends = self.offsets(rows.device) + torch.tensor(self.counts, device=rows.device)
        return torch.bucketize(rows, ends, right=True)

    def rows(self, device) -> Tensor:
        """(B, W): the row of axis 0 at each position of the batch-first layout; padding copies
        the sample's first row (or the first row of the first sample that has rows)."""
        return _block_rows(self.counts, torch.device(device))

    def pads(self, device) -> Tensor:
        """(B, W) True at the padding."""
        at = torch.arange(self.width, device=device)
        return at >= torch.tensor(self.counts, device=device)[:, None]

    def canonical(self, t: Tensor) -> Tensor:
        """A tensor (length, *f) in the batch-first layout (B, W, *f)."""
        if self.uniform:
            return t.reshape(self.samples, self.width, *t.shape[1:])
        rows = self.rows(t.device).reshape(-1)
        return t.index_select(0, rows).reshape(self.samples, self.width, *t.shape[1:])


@functools.lru_cache(maxsize=64)
def _block_rows(counts: tuple[int, ...], device: torch.device) -> Tensor:
    """``Blocks.rows``, made once per layout and device."""
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    fallback = next((s for s, c in zip(starts, counts, strict=True) if c), 0)
    rows = [[s + min(i, c - 1) if i < c else (s if c else fallback) for i in range(max(counts))]
            for s, c in zip(starts, counts, strict=True)]  # fmt: skip
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(counts), -1)


def single(n: int) -> Blocks:
    """A batch-first tensor (N, *f) seen as blocks of one row each."""
    return Blocks((1,) * n)


# --------------------------------------------------------------------------------------------
# Which calls are recorded here.

_GATHERS = {"index_select", "gather", "getitem"}
_SCATTERS = {"index_add", "index_add_", "scatter_add", "scatter_add_", "index_put",
             "index_put_", "scatter_reduce", "scatter_reduce_"}  # fmt: skip


def _name(call: Call) -> str:
    if call.kind == "call_method":
        return call.target
    if call.kind == "call_function":
        target = getattr(call.target, "overloadpacket", call.target)
        return getattr(target, "__name__", "")
    return ""


def applies(call: Call, layouts: list[Blocks | None], n: int) -> bool:
    """Whether the call is recorded here: it reads a tensor in blocks, gathers or scatters
    across the batch axis, or reshapes the batch axis into blocks of rows."""
    if any(lay is not None for lay in layouts):
        return True
    name = _name(call)
    if name in _GATHERS:
        return _gather_args(call, name) is not None
    if name in _SCATTERS:
        return _scatter_args(call, name) is not None
    out = call.out
    return (
        canonical(call) == "reshape"
        and len(call.inputs) == 1
        and out.dim() >= 1
        and out.shape[0] != n
        and out.numel() == call.inputs[0].numel()
    )


def _dim0(dim: Any, ndim: int) -> bool:
    return isinstance(dim, int) and ndim > 0 and dim % ndim == 0


@dataclass
class _Gather:
    source: Tensor
    index: Tensor  # (E,) rows of the source, or a boolean mask (length,)
    trailing: Tensor | None = None  # a gather's full index (E, *f), to check it is per row


def _gather_args(call: Call, name: str) -> _Gather | None:
    """The source and row index of a gather along axis 0, or None for any other call."""
    src = call.args[0] if call.args else None
    if not call.active(src):
        return None
    if name == "getitem":
        item = call.args[1]
        items = item if isinstance(item, tuple) else (item,)
        first = items[0] if items else None
        if not (isinstance(first, Tensor) and not first.is_floating_point() and first.dim() == 1):
            return None
        if any(not (i is Ellipsis or (isinstance(i, slice) and i == slice(None)))
               for i in items[1:]):  # fmt: skip
            return None
        return _Gather(src, first)
    dim, index = call.arg(1, "dim"), call.arg(2, "index")
    if not _dim0(dim, src.dim()) or not isinstance(index, Tensor) or call.active(index):
        return None
    if name == "index_select":
        return _Gather(src, index) if index.dim() == 1 else None
    if index.shape[1:] != src.shape[1:] or index.dim() != src.dim():
        return None  # a gather of part of each row
    return _Gather(src, index.reshape(index.shape[0], -1)[:, 0] if index.dim() > 1 else index,
                   index)  # fmt: skip


@dataclass
class _Scatter:
    target: Tensor
    index: Tensor  # (E,) target row of each source row
    source: Tensor
    alpha: float = 1.0
    trailing: Tensor | None = None


def _scatter_args(call: Call, name: str) -> _Scatter | None:
    """Target, index and source of a sum of rows into rows of axis 0, or None."""
    target = call.args[0] if call.args else None
    if not isinstance(target, Tensor) or target.dim() == 0:
        return None
    if name.startswith("index_put"):
        indices, values = call.arg(1, "indices"), call.arg(2, "values")
        accumulate = call.arg(3, "accumulate", False)
        if not (accumulate and isinstance(indices, (tuple, list)) and len(indices) == 1):
            return None
        index = indices[0]
        if not (isinstance(index, Tensor) and index.dim() == 1 and not index.is_floating_point()
                and index.dtype != torch.bool and isinstance(values, Tensor)):  # fmt: skip
            return None
        if values.shape != (index.shape[0], *target.shape[1:]):
            return None
        return _Scatter(target, index, values)
    dim, index, source = call.arg(1, "dim"), call.arg(2, "index"), call.arg(3, "source")
    if name.startswith("scatter"):
        source = call.arg(3, "src")
    if not _dim0(dim, target.dim()) or not isinstance(source, Tensor):
        return None
    if not isinstance(index, Tensor) or call.active(index):
        return None
    if name.startswith("index_add"):
        if index.dim() != 1 or source.shape[1:] != target.shape[1:]:
            return None
        return _Scatter(target, index, source, float(call.kwargs.get("alpha", 1)))
    if name.startswith("scatter_reduce"):
        if call.arg(4, "reduce") != "sum" or not call.arg(5, "include_self", True):
            return None
    if index.shape != source.shape or source.shape[1:] != target.shape[1:]:
        return None  # a scatter of part of each row
    return _Scatter(target, index.reshape(index.shape[0], -1)[:, 0], source, 1.0, index)


# --------------------------------------------------------------------------------------------
# Recording.


def record(
    name: str, call: Call, ids: list[int], values: list[Tensor], layouts: dict[int, Blocks],
    add: AddStep, constant_index: bool,
) -> tuple[int | None, Blocks | None]:  # fmt: skip
    """Record a call that ``applies``: its step(s) on batch-first values (NOTE [blocks]).

    Args:
        name: the node's name (for messages); call: the recorded call; ids: the slots of its
            active inputs; values: every slot's value; layouts: the blocks of the slots in
            blocks; add: appends a step and returns its slot; constant_index: whether the
            call's index tensors do not depend on the input.

    Returns:
        the slot of the call's output (None: the output is its input, ``ALIAS``, of ``ids[0]``)
        and its blocks (None for a batch-first output).

    Raises:
        Unsupported: the call mixes samples or cannot be laid out in blocks (says why).
    """
    n = values[0].shape[0]
    what = f"{name} ({_describe(call)})"
    kind = _name(call)
    args = _gather_args(call, kind) if kind in _GATHERS else None
    if args is not None:
        return _record_gather(what, call, args, ids, values, layouts, add, constant_index)
    args = _scatter_args(call, kind) if kind in _SCATTERS else None
    if args is not None:
        return _record_scatter(what, call, args, ids, values, layouts, add, constant_index)
    lays = [layouts.get(i) for i in ids]
    if canonical(call) == "reshape" and len(ids) == 1:
        done = _record_reshape(what, call, ids[0], values[ids[0]], lays[0], n, add)
        if done is not None:
            return done
    if any(lay is None for lay in lays):
        raise Unsupported(f"{what} combines a tensor of the batch with the rows of the "
                          "concatenated samples")  # fmt: skip
    lay = lays[0]
    if any(other != lay for other in lays[1:]):
        raise Unsupported(f"{what} combines rows of concatenated samples laid out differently")
    return _record_rowwise(what, call, ids, values, lay, add)


@contextlib.contextmanager
def _analysis(constant: bool):
    """Around reads of index values: a constant index is analysed with any tracing dispatch mode
    (a replay's recorder) suspended (NOTE [blocks])."""
    if not constant:
        yield
        return
    with _disable_current_modes():
        yield


def _record_gather(what, call, args: _Gather, ids, values, layouts, add, constant):
    n = values[0].shape[0]
    src_slot, src, lay = _as_blocks(_slot_of(args.source, call, ids), values, layouts, add)
    index = args.index
    if index.dtype == torch.bool:
        if index.shape != (lay.length,):
            raise Unsupported(f"{what} takes rows by a mask of another length")
        with _analysis(constant):
            index = index.nonzero().squeeze(1)
    rows = index % max(lay.length, 1)
    owner = lay.owner(rows)
    local = rows - lay.offsets(rows.device)[owner]
    with _analysis(constant):
        if args.trailing is not None and not _per_row(args.trailing):
            raise Unsupported(f"{what} gathers other rows for different features")
        if rows.numel() and not bool((owner[1:] >= owner[:-1]).all()):
            raise Unsupported(f"{what} gathers rows of the samples out of their order")
        out_lay = Blocks(tuple(torch.bincount(owner, minlength=n).tolist()))
        shared = lay.uniform and _shared(local, out_lay)
    if shared:
        index = local[: out_lay.width].unsqueeze(0)
    else:
        index = out_lay.canonical(local.unsqueeze(1))[..., 0]
        if not lay.uniform:  # padding copied from another sample: any row of this one's
            top = (torch.tensor(lay.counts, device=index.device) - 1).clamp(min=0)
            index = torch.minimum(index, top[:, None])
    shape = tuple(src.shape[1:])
    rule = Gather([shape], (out_lay.width, *shape[1:]), index=index)
    slot = add(rule, [src_slot], out_lay.canonical(call.out))
    return _settled(slot, out_lay, values, add)


def _slot_of(t: Tensor, call: Call, ids: list[int]) -> int:
    """The slot of the active argument ``t`` of the call."""
    return next(i for i, x in zip(ids, call.inputs, strict=True) if x is t)


def _per_row(full: Tensor) -> bool:
    """Whether a gather or scatter index (E, *f) takes one row for all of a row's features (an
    index expanded from (E, 1))."""
    flat = full.reshape(full.shape[0], -1)
    return bool((flat == flat[:, :1]).all())


def _shared(local: Tensor, lay: Blocks) -> bool:
    """Whether every sample's block has the same local indices (``local``: one per row)."""
    if not lay.uniform or lay.width == 0:
        return lay.uniform
    blocks = local.reshape(lay.samples, lay.width)
    return bool((blocks == blocks[:1]).all())


def _record_scatter(what, call, args: _Scatter, ids, values, layouts, add, constant):
    n = values[0].shape[0]
    into = call.active(args.target)
    if not call.active(args.source):  # the target plus a constant: the identity on the target
        slot = ids[0]
        shape = tuple(values[slot].shape[1:])
        lay = layouts.get(slot)
        out = call.out if lay is None else lay.canonical(call.out)
        return add(Scale([shape], shape), [slot], out), lay
    src_slot, source, src_lay = _as_blocks(_slot_of(args.source, call, ids), values, layouts, add)
    if into:
        target_slot, target, out_lay = _as_blocks(_slot_of(args.target, call, ids), values,
                                                  layouts, add)  # fmt: skip
    else:
        length = args.target.shape[0]
        if length % n:
            raise Unsupported(f"{what} sums rows into a tensor of {length} rows, not a multiple "
                              f"of the {n} samples")  # fmt: skip
        out_lay = Blocks((length // n,) * n)
    rows = args.index % max(out_lay.length, 1)
    owner = out_lay.owner(rows)
    local = rows - out_lay.offsets(rows.device)[owner]
    with _analysis(constant):
        if args.trailing is not None and not _per_row(args.trailing):
            raise Unsupported(f"{what} sums rows into other rows for different features")
        counts = torch.tensor(src_lay.counts, device=rows.device)
        source_owner = torch.repeat_interleave(torch.arange(n, device=rows.device), counts)
        if not bool((owner == source_owner).all()):
            raise Unsupported(f"{what} sums rows of one sample into rows of another")
        shared = out_lay.uniform and _shared(local, src_lay)
    if shared:
        index = local[: src_lay.width].unsqueeze(0)
    else:
        index = src_lay.canonical(local.unsqueeze(1))[..., 0]
        index = index.masked_fill(src_lay.pads(index.device), out_lay.width)
    shape = (out_lay.width, *source.shape[2:])
    shapes_in = [tuple(source.shape[1:])]
    inputs = [src_slot]
    if into:
        shapes_in, inputs = [tuple(target.shape[1:]), *shapes_in], [target_slot, src_slot]
    rule = Scatter(shapes_in, shape, index=index, size=out_lay.width, into=into, alpha=args.alpha)
    slot = add(rule, inputs, out_lay.canonical(call.out))
    return _settled(slot, out_lay, values, add)


def _as_blocks(slot: int, values, layouts, add) -> tuple[int, Tensor, Blocks]:
    """A slot, its value and its blocks: as they are, or a batch-first value as blocks of one
    row each (a new slot: the reshape (N, *f) -> (N, 1, *f))."""
    lay = layouts.get(slot)
    if lay is not None:
        return slot, values[slot], lay
    value = values[slot]
    shape = tuple(value.shape[1:])
    new = add(Reshape([shape], (1, *shape)), [slot], value.unsqueeze(1))
    return new, values[new], single(value.shape[0])


def _settled(slot: int, lay: Blocks, values, add) -> tuple[int, Blocks | None]:
    """A slot in blocks of one row each made a batch-first one again (N, 1, *f) -> (N, *f)."""
    if lay.width != 1 or not lay.uniform:
        return slot, lay
    value = values[slot]
    shape = tuple(value.shape[2:])
    return add(Reshape([(1, *shape)], shape), [slot], value[:, 0]), None


def _record_reshape(what, call, slot, value, lay, n, add):
    """A reshape that starts, changes or ends blocks; None for one that acts on each row."""
    out = call.out
    length = n if lay is None else lay.length
    if out.dim() == 0 or (lay is not None and out.shape[0] == length):
        return None  # a reshape of each row
    if out.shape[0] % n or out.numel() != value.numel() or (lay is not None and not lay.uniform):
        raise Unsupported(f"{what} reshapes the rows of the samples together")
    rows = out.shape[0] // n
    shape = (rows, *out.shape[1:]) if rows != 1 else tuple(out.shape[1:])
    new = add(Reshape([tuple(value.shape[1:])], shape), [slot], value.reshape(n, *shape))
    return (new, Blocks((rows,) * n)) if rows != 1 else (new, None)


def _record_rowwise(what, call, ids, values, lay: Blocks, add):
    """A call that acts on each row alike: its rule on the rows, widened to the blocks."""
    length = lay.length
    if call.out.dim() == 0 or call.out.shape[0] != length:
        raise Unsupported(f"{what} mixes the rows of the concatenated samples")
    rule = rule_for(call)
    if rule == ALIAS:
        return None, lay
    ins = [values[i] for i in ids]
    if isinstance(rule, (Fold, General)) and _row_constants(call, length):
        raise Unsupported(f"{what} combines the rows with a constant of one entry per row")
    rule = _widen(rule, lay, call, ins)
    if isinstance(rule, (Fold, General)):
        _check_rowwise(what, rule, ins, lay.canonical(call.out))
    return add(rule, list(ids), lay.canonical(call.out)), lay


def _row_constants(call: Call, length: int) -> bool:
    """Whether a constant tensor argument has one entry per row (it broadcasts along them)."""
    ndim = call.out.dim()
    found = []

    def visit(a):
        if (
            isinstance(a, Tensor)
            and not call.active(a)
            and a.dim() == ndim
            and a.shape[0] == length
        ):
            found.append(a)
        elif isinstance(a, (tuple, list)):
            for b in a:
                visit(b)

    visit(call.args)
    visit(list(call.kwargs.values()))
    return bool(found)


def _check_rowwise(what: str, rule: Rule, ins: list[Tensor], out: Tensor) -> None:
    """A widened ``Fold`` or ``General`` step must give the output from the values in blocks,
    and the first and the last sample's rows alone the same as with the others' (a call that
    mixes rows, such as ``torch.cdist`` of all rows or a cumulative sum, would not). Checked
    outside a replay's trace: whether a call mixes rows does not depend on the values."""
    ends = [slice(0, 1), slice(out.shape[0] - 1, out.shape[0])] if out.shape[0] > 1 else []
    with _disable_current_modes():
        try:
            got = rule.fn(*ins)
            alone = [(end, rule.fn(*[t[end] for t in ins])) for end in ends]
        except Exception as err:  # noqa: BLE001 - e.g. a size that names the rows of all samples
            raise Unsupported(f"{what} depends on the number of rows of all samples "
                              f"({type(err).__name__})") from err  # fmt: skip
        if not isinstance(got, Tensor) or got.shape != out.shape:
            raise Unsupported(f"{what} mixes the rows of the concatenated samples")
        scale = float(got.abs().max()) if got.numel() else 0.0
        for end, part in alone:
            if part.shape != got[end].shape or not torch.allclose(
                part, got[end], rtol=1e-4, atol=1e-6 * scale
            ):
                raise Unsupported(f"{what} mixes the rows of the concatenated samples")


def _on_blocks(fn: Callable[..., Any], w: int) -> Callable[..., Any]:
    """``fn`` of tensors (rows, *s) applied to tensors in blocks (B', W, *s) -> (B', W, *s')."""

    def on_blocks(*ts):
        out = fn(*[t.reshape(-1, *t.shape[2:]) for t in ts])
        if isinstance(out, tuple):
            return tuple(o.reshape(-1, w, *o.shape[1:]) for o in out)
        return out.reshape(-1, w, *out.shape[1:])

    return on_blocks


def _widen(rule: Rule, lay: Blocks, call: Call, ins: list[Tensor]) -> Rule:
    """A rule made on the rows (each row a sample) as the rule of the same step on the blocks
    (B, W, *s) (NOTE [blocks])."""
    w, length = lay.width, lay.length
    shapes = {"shapes_in": [(w, *s) for s in rule.shapes_in], "shape_out": (w, *rule.shape_out)}

    def rows(t):
        """A derivative tensor of the rule with one entry per row, in blocks."""
        if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == length and length > 1:
            return lay.canonical(t)
        return t

    if isinstance(rule, Elementwise):
        return replace(rule, **shapes, d1=lay.canonical(rule.d1), d2=lay.canonical(rule.d2))
    if isinstance(rule, (Dense, Reshape, Add)):
        return replace(rule, **shapes)
    if isinstance(rule, Scale):
        factor = rule.factor
        if isinstance(factor, Tensor) and factor.dim() == len(rule.shape_out) + 1:
            factor = rows(factor)
        return replace(rule, **shapes, factor=factor)
    if isinstance(rule, (Product, Bilinear)):
        return replace(rule, **shapes, a=lay.canonical(rule.a), b=lay.canonical(rule.b))
    if isinstance(rule, LayerNorm):
        return replace(rule, **shapes, xhat=lay.canonical(rule.xhat), inv=lay.canonical(rule.inv))
    if isinstance(rule, (Softmax, LogSoftmax)):
        ndim = len(rule.shape_out) + 1
        return replace(rule, **shapes, p=lay.canonical(rule.p), dim=rule.dim % ndim - ndim)
    if isinstance(rule, General):
        return General(**shapes, fn=_on_blocks(rule.fn, w), primals=tuple(ins))
    if isinstance(rule, Fold):
        adjoint = rule.adjoint
        if isinstance(adjoint, Piece):
            adjoint = replace(adjoint, axis=adjoint.axis + 1)
        elif adjoint is not None:
            adjoint = _on_blocks(adjoint, w)
        return Fold(**shapes, fn=_on_blocks(rule.fn, w), cost=rule.cost * w, adjoint=adjoint)
    raise Unsupported(f"{_describe(call)} has no rule on the rows of concatenated samples")


def _describe(call: Call) -> str:
    if call.kind == "call_module":
        return type(call.target).__name__
    if call.kind == "call_method":
        return f".{call.target}()"
    return getattr(call.target, "__name__", str(call.target))
