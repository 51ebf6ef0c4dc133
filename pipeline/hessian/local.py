"""The local bottom schedule: the curvature of the steps below the cut on patches.

NOTE [local]: below the cut L the Hessian rows are

    H = J_L^T M_L J_L + sum over curved steps v below L of J_v^T C_v J_v,

C_v = diag(s''(a_v) g_v) for an elementwise step. The first term comes from the reverse Jacobian
(``propagate._reverse``: F_L adjoint sweeps of the linear parts, joined with M_L); this module
computes the sum, by tangent-adjoint propagation with a zero M at the top (the adjoints start at
the curved steps), but on patches (``windows``): the tangent of input position r is nonzero only
inside r's receptive field, and the adjoint from there only inside the positions that field
reads, so each row's tangents and adjoints are kept on a small window of each feature map, and a
convolution over R rows costs R x (window / map) of the dense one. Convolutions, pools,
elementwise steps, per-channel scales and residual adds act on patches (``patches``); where a
step cannot (a reshape into a dense layer, a product of branches) or a window would be as large
as its map, the schedule goes on densely from there (tangents above, adjoints below that slot).
The patch adjoints at x are scattered into the rows of H at the end.

The rows are grouped into blocks of S positions per spatial axis, S the product of the strides
of the window ops (pools, strided convolutions): row r's patch at x is its block (one-hot at r),
so that every window starts at scale * block + shift with static scale and shift, and a strided
op always meets its grid at the same offset. This widens the windows by S - 1 positions per axis
(for the MNIST net, 6 x 6 instead of 5 x 5 after two 3 x 3 convolutions), and needs no gather
with per-row offsets.

``layout`` decides, from the graph alone, the window (or dense) of each slot's tangents and
adjoints and counts the multiply-adds (the planner's cost); ``local_rows`` executes it.

NOTE [patch Jacobian]: the first term needs J_L. By F_L adjoint sweeps it costs F_L times the
conv stack (128 sweeps through the MNIST net's conv2: 1.4 G multiply-adds a sample). But where
the steps from P, the output of the last curved step, up to L are linear and the same for every
sample (pools, convolutions, reshapes, the Dense that gives L: ``Head``), J_L = W J_P with W the
matrix of those steps, and J_P is what the patches already hold: row r's tangent at P on its
window. So J_L[:, r] = W[:, window(r)] t_r: W (pulled back once from L to P's map) is gathered at
every block's window, and one batched product over the blocks gives all rows (D x F_L x C x
area: 58 M for the MNIST net). The gather is a strided copy of overlapping windows (58 MB for
that net) made once a call, so the planner counts it once a call (``Head.cost``): with 1 sample
a call the sweeps stay (they cost the same there), from 2 on the patches win (0.63x of the call's
time with 8). Only for all rows in order (a row subset would still need every column of J_L).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import patches
from .adjoints import pull
from .graph import Tape, consumers, release
from .rules import ELEMENTWISE_MACS, Elementwise, Select, outer
from .windows import Blocks, Window, blocks_for, offsets, per_block

DENSE = "dense"
# A window with at least this fraction of its map's positions is given up for the whole map.
DENSE_AT = 1.0


@dataclass(frozen=True)
class Layout:
    """Where the tangents and adjoints of the local schedule lie, for the steps [0, last].

    Attributes:
        last: the highest curved step below the cut (nothing above it is needed).
        block: S, positions of x per block along each spatial axis.
        tangent, adjoint: per slot, a ``Window`` or ``DENSE``; a slot without an entry has none.
        tangent_macs, adjoint_macs: multiply-adds per sample and row (adjoint: and output).
        tangent_size, adjoint_size: elements per row of all tangents, of the largest adjoint.
        head: J_L from the patches, where the steps from ``last`` up to the cut allow it.
    """

    last: int
    block: tuple[int, ...]
    tangent: dict[int, Window | str]
    adjoint: dict[int, Window | str]
    tangent_macs: int
    adjoint_macs: int
    tangent_size: int
    adjoint_size: int
    head: Head | None = None

    def cost(self, r: int, k: int, d: int) -> int:
        """Multiply-adds per sample for R rows, K outputs and D = the input's size (the rows
        made whole at the end, and added to the reverse Jacobian's)."""
        return r * self.tangent_macs + k * r * (self.adjoint_macs + 2 * d * ELEMENTWISE_MACS)


@dataclass(frozen=True)
class Head:
    """The cut's Jacobian J_L from the patch tangents (NOTE [patch Jacobian]).

    Attributes:
        slot: the output of the layout's last curved step, P; the steps above it up to the cut
            (``steps``: [last + 1, stop)) are linear, the same for every sample, and read no
            other slot below P.
        window: the window of P's tangents.
        macs: multiply-adds per sample for all rows (one product per row).
        fixed: the same a call, for any number of samples: the pull-back of the steps above P
            to P's map, and that map gathered at every block's window (a strided copy, counted
            at ``GATHER_MACS`` an element).
    """

    slot: int
    steps: tuple[int, int]
    window: Window
    macs: int
    fixed: int

    def cost(self, samples: int) -> int:
        """Multiply-adds per sample with ``samples`` samples a call."""
        return self.macs + self.fixed // max(samples, 1)


# What one element of the weights gathered at the blocks' windows costs (a strided copy of
# overlapping windows: 35-50 ms for 14 M elements against a 2-core CPU's 100 GFLOPS; fitted with
# the MNIST net, where the patch Jacobian is 0.95x of the reverse Jacobian's time with 2 samples
# a call and 0.63x with 8).
GATHER_MACS = 4 * ELEMENTWISE_MACS


def layout(tape: Tape, stop: int, dense_at: float | None = None) -> Layout | None:
    """The local schedule below step ``stop``; None where it does not apply: x without spatial
    axes, no curved step below ``stop``, or no step there acting on patches. ``dense_at``:
    ``DENSE_AT`` unless given (tests set it to inf: patches everywhere)."""
    dense_at = DENSE_AT if dense_at is None else dense_at
    x = tape.values[0]
    curved = [i for i in range(stop) if tape.steps[i].rule.curved]
    if x.dim() < 3 or not curved:
        return None
    steps = tape.steps[: curved[-1] + 1]
    sp = tuple(x.shape[2:])
    block = [1] * len(sp)
    for s in steps:
        op = patches.sliding(s.rule)
        if op is not None and len(op.stride) == len(sp):
            block = [b * t for b, t in zip(block, op.stride, strict=True)]
    block = tuple(block)
    blocks = tuple(-(-m // b) for m, b in zip(sp, block, strict=True))
    seed = Window(block, (0,) * len(sp), block, sp, blocks)
    if seed.covers(dense_at):
        return None
    tangent, t_macs = _tangents(tape, steps, seed, dense_at)
    if not any(isinstance(tangent.get(s.out), Window) for s in steps):
        return None
    adjoint, a_macs = _adjoints(tape, steps, tangent, dense_at)

    def size(w: Window | str, slot: int) -> int:
        return tape.width(slot) if w == DENSE else tape.values[slot].shape[1] * w.area

    return Layout(
        curved[-1], block, tangent, adjoint, t_macs, a_macs,
        sum(size(w, v) for v, w in tangent.items()),
        max(size(w, v) for v, w in adjoint.items()),
        _head(tape, curved[-1], stop, tangent),
    )  # fmt: skip


def _head(tape: Tape, last: int, stop: int, tangent: dict[int, Window | str]) -> Head | None:
    """J_L from the patches (``Head``) where the steps from ``last`` to the cut allow it."""
    slot = tape.steps[last].out
    w = tangent.get(slot)
    if not isinstance(w, Window) or stop <= last + 1:
        return None
    made = {slot}
    for s in tape.steps[last + 1 : stop]:
        if s.rule.curved or _per_sample(s.rule) or not set(s.inputs) <= made:
            return None
        made.add(s.out)
    width = tape.width(tape.steps[stop - 1].out)
    pulls = width * sum(s.rule.macs for s in tape.steps[last + 1 : stop])
    per = tape.values[slot].shape[1] * w.area  # one row's patch
    gather = width * math.prod(w.blocks) * per * GATHER_MACS
    return Head(slot, (last + 1, stop), w, tape.width(0) * width * per, pulls + gather)


def _per_sample(rule) -> bool:
    """Whether a linear step differs between samples: a max pool's selection, a factor with a
    batch axis."""
    if isinstance(rule, Select):
        return True
    f = getattr(rule, "factor", None)
    return isinstance(f, Tensor) and f.dim() == len(rule.shape_out) + 1 and f.shape[0] != 1


def _tangents(tape: Tape, steps, seed: Window, dense_at: float):
    """The windows of the tangents, forward, and their multiply-adds per row."""
    tangent: dict[int, Window | str] = {0: seed}
    total = 0
    for s in steps:
        ins = [tangent.get(v) for v in s.inputs]
        if all(w is None for w in ins):
            continue
        w = None if DENSE in ins else patches.out_window(s.rule, ins)
        if w is None or w.covers(dense_at):
            tangent[s.out] = DENSE
            total += s.rule.macs + _densify(tape, s.inputs, ins)
        else:
            tangent[s.out] = w
            total += patches.macs(s.rule, w)
    return tangent, total


def _adjoints(tape: Tape, steps, tangent, dense_at: float):
    """The windows of the adjoints, backward from the curved steps, and their multiply-adds per
    row and output."""
    adjoint: dict[int, Window | str] = {}
    total = 0
    for s in reversed(steps):
        parts: list[tuple[int, Window | str]] = []
        if s.rule.curved:
            for v in s.inputs:
                w = tangent.get(v)
                if w is None:
                    continue
                local = isinstance(s.rule, Elementwise) and isinstance(w, Window)
                parts.append((v, w if local else DENSE))
                total += 2 * (patches.macs(s.rule, w) if local else s.rule.macs)
        wu = adjoint.get(s.out)
        if wu is not None:
            ws = patches.in_windows(s.rule, wu) if isinstance(wu, Window) else None
            if ws is None:
                parts += [(v, DENSE) for v in s.inputs]
                total += s.rule.macs + _densify(tape, [s.out], [wu])
            else:
                parts += list(zip(s.inputs, ws, strict=True))
                total += patches.macs(s.rule, wu)
        for v, w in parts:
            adjoint[v] = _merge(adjoint.get(v), w, dense_at)
    return adjoint, total


def _merge(a: Window | str | None, b: Window | str, dense_at: float) -> Window | str:
    """The window of an adjoint with contributions on ``a`` (None: none yet) and ``b``."""
    if DENSE in (a, b):
        return DENSE
    w = b if a is None else a.union(b)
    return DENSE if w is None or w.covers(dense_at) else w


def _densify(tape: Tape, slots: list[int], windows: list[Window | str | None]) -> int:
    """Multiply-adds per row of turning the patches of ``slots`` into whole maps."""
    return sum(tape.width(v) * ELEMENTWISE_MACS for v, w in zip(slots, windows, strict=True)
               if isinstance(w, Window))  # fmt: skip


def local_rows(
    tape: Tape, lay: Layout, g: dict[int, Tensor], rows, k: int, jacobian: bool = False
) -> tuple[Tensor | None, Tensor | None]:
    """sum over the curved steps v below the cut of (J_v^T C_v J_v)[rows]: (N, K, R, D), or None
    when it is zero; and the cut's Jacobian J_L (B, F_L, R) from the patches where asked
    (``jacobian``: ``lay.head`` is set and the rows are all rows in order) and possible, else
    None.

    Args:
        tape: the graph on this batch; lay: ``layout`` of it below the cut; g: first-order
            adjoints (``propagate.gradients``); rows: the rows (``rows.Rows``); k: K.
    """
    x = tape.values[0]
    blocks = blocks_for(rows, tuple(x.shape[1:]), lay.block)
    steps = tape.steps[: lay.last + 1]
    top = steps[-1].out if jacobian else None
    tangents = _forward(steps, lay, blocks, blocks.seed(x.shape[1], x), top)
    jac = _jacobian(tape, lay, tangents.pop(top), blocks) if jacobian else None
    r = len(rows)
    adj = _Adjoints(lay, blocks)
    for s in reversed(steps):
        u = adj.pop(s.out)
        if s.rule.curved:
            for v, p, w in _second(s, tangents, lay, g, blocks):
                adj.add(v, p, w, True)
        if u is None:
            continue
        wu = lay.adjoint[s.out]
        if isinstance(wu, Window) and patches.in_windows(s.rule, wu) is not None:
            for v, (p, w) in zip(s.inputs, patches.vjp(s.rule, u, wu, blocks), strict=True):
                adj.add(v, p, w, p is not u)
        else:
            u = _dense(u, wu, blocks)
            flat = u.reshape(u.shape[0], k * r, *u.shape[3:])
            for v, p in zip(s.inputs, s.rule.vjp(flat), strict=True):
                if p is not None:
                    adj.add(v, p.reshape(u.shape[0], k, r, *p.shape[2:]), DENSE, False)
    h = adj.pop(0)
    if h is None:
        return None, jac
    h = _dense(h, lay.adjoint[0], blocks)
    return h.reshape(h.shape[0], k, r, math.prod(x.shape[1:])), jac


# Elements of W gathered at the blocks' windows at once (``_jacobian``): 64 MiB in float32.
GATHER_ELEMENTS = 1 << 24


def _jacobian(tape: Tape, lay: Layout, t: Tensor, blocks: Blocks) -> Tensor | None:
    """J_L (B, F_L, R) from the tangent patches t (B, R, C, *size) at the layout's last curved
    step, all rows in order (NOTE [patch Jacobian]); None where the steps above it turn out to
    differ between samples."""
    head = lay.head
    w, steps = head.window, tape.steps[head.steps[0] : head.steps[1]]
    out = tape.values[steps[-1].out]
    f = out[0].numel()
    eye = torch.eye(f, dtype=t.dtype, device=t.device).reshape(1, f, *out.shape[1:])
    maps = pull(steps, {steps[-1].out: eye}, keep=False)[head.slot]  # (1, F_L, C, *map)
    if maps.shape[0] != 1:  # a factor that differs between samples: the adjoint sweeps
        return None
    maps = maps[0]
    b, r, per = t.shape[0], t.shape[1], t.shape[2] * w.area  # per: C * area, a row's patch
    rpb = tape.values[0].shape[1] * math.prod(lay.block)  # rows per block
    nb = math.prod(w.blocks)
    virtual = blocks.block_index(w.blocks) * rpb + blocks.local  # (R,): block, then in-block
    tv = t.new_zeros(b, nb * rpb, per).index_copy_(1, virtual, t.reshape(b, r, per))
    tv = tv.view(b, nb, rpb, per).permute(1, 3, 2, 0)  # (blocks, C * area, rpb, B)
    line = nb // w.blocks[0]  # blocks per value of the first block coordinate
    step = max(1, GATHER_ELEMENTS // (f * per * line))
    parts = []
    for lo in range(0, w.blocks[0], step):
        hi = min(lo + step, w.blocks[0])
        wb = per_block(maps, w, (lo, hi)).transpose(0, 1)  # (blocks, F_L, C * area)
        tb = tv[lo * line : hi * line].reshape(wb.shape[0], per, rpb * b)
        parts.append(torch.bmm(wb, tb))  # (blocks, F_L, rpb * B)
    jac = parts[0] if len(parts) == 1 else torch.cat(parts)
    jac = jac.view(nb, f, rpb, b).permute(3, 1, 0, 2).reshape(b, f, nb * rpb)
    return jac.index_select(-1, virtual)


class _Adjoints:
    """The second-order adjoints of the slots, each summed on its window of the layout (or
    whole), in place where the sum is a tensor of its own."""

    def __init__(self, lay: Layout, blocks: Blocks):
        self.lay, self.blocks = lay, blocks
        self.value: dict[int, Tensor] = {}
        self.own: set[int] = set()

    def pop(self, v: int) -> Tensor | None:
        self.own.discard(v)
        return self.value.pop(v, None)

    def add(self, v: int, p: Tensor, w: Window | str, fresh: bool) -> None:
        """Add the contribution p on ``w`` (``fresh``: no other tensor shares its memory)."""
        target = self.lay.adjoint[v]
        if target == DENSE and w != DENSE:
            p, w, fresh = self.blocks.scatter(p, w), DENSE, True
        a = self.value.get(v)
        if w == target:
            if a is None:
                self.value[v] = p
                if fresh:
                    self.own.add(v)
            else:
                self.value[v] = a + p
                self.own.add(v)
            return
        if a is None:
            a = p.new_zeros(*p.shape[: -len(w.size)], *target.size)
        elif v not in self.own:
            a = a.clone()
        lo, _ = offsets(w, target)
        a[(..., *[slice(i, i + z) for i, z in zip(lo, w.size, strict=True)])] += p
        self.value[v] = a
        self.own.add(v)


def _forward(
    steps, lay: Layout, blocks: Blocks, seed: Tensor, top: int | None
) -> dict[int, Tensor]:
    """Tangents (B, R, C, *size) on their windows, or (B, R, *s) where dense; only those that
    the second-order terms still need are kept, and ``top``'s."""
    needed = {v for s in steps if s.rule.curved for v in s.inputs} | {top}
    left = consumers(steps)
    tangents: dict[int, Tensor] = {0: seed}
    for s in steps:
        ts = [tangents.get(v) for v in s.inputs]
        if all(t is None for t in ts):
            continue
        ins = [lay.tangent.get(v) for v in s.inputs]
        out = lay.tangent[s.out]
        if isinstance(out, Window):
            tangents[s.out] = patches.jvp(s.rule, ts, ins, out, blocks)
        else:
            tangents[s.out] = s.rule.jvp(
                [_dense(t, w, blocks) for t, w in zip(ts, ins, strict=True)]
            )
        release(tangents, s, left, needed)
    return tangents


def _second(s, tangents, lay: Layout, g, blocks: Blocks) -> list[tuple[int, Tensor, Window | str]]:
    """A curved step's second-order terms (N, K, R, ...) for its inputs, with their windows."""
    if isinstance(s.rule, Elementwise):
        v = s.inputs[0]
        w, t = lay.tangent[v], tangents[v]
        c = s.rule.curvature(g[s.out])  # (N, K, *s)
        if isinstance(w, Window):
            return [(v, blocks.gather(c, w) * t.unsqueeze(1), w)]
        return [(v, outer(c, t), DENSE)]
    ts = [_dense(tangents.get(v), lay.tangent.get(v), blocks) for v in s.inputs]
    terms = s.rule.second(g[s.out], ts)
    return [(v, term, DENSE) for v, term in zip(s.inputs, terms, strict=True) if term is not None]


def _dense(t: Tensor | None, w: Window | str | None, blocks: Blocks) -> Tensor | None:
    """Patches as whole maps (t as it is where already dense)."""
    return blocks.scatter(t, w) if isinstance(w, Window) and t is not None else t
