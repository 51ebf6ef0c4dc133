"""The exact diagonal of input Hessians, without forming a D x D matrix.

On the captured graph (``graph``) the Hessian of an output y at x is a sum of one term per
curved step plus the head (``planner``'s module doc):

    H = J_L^T M_L J_L + sum over curved steps v below L of J_v^T C_v J_v,

for any cut L of the graph (a tensor every path from x to y passes through), with J_v = dv/dx
(F_v, D) the Jacobian of a tensor, M_L = d^2y/dv_L^2 carried down from the output by the graph
engine's M-propagation (``propagate``), and C_v a step's second-order term. The diagonal of one
term is a column-wise quadratic form, which never needs a D x D matrix:

    diag(J^T M J)_i = sum_f J[f, i] (M J)[f, i],

where row f of J and row f of M J are the adjoint sweeps from the cotangents e_f and M[f, :] at
L down to x. For an elementwise step v = s(a) the second-order term is diagonal,
C = diag(s''(a) g) on a (g = dy/dv), so its share is sum_f c_f J_a[f, i]^2 with J_a the rows of
the step's input, by F_a sweeps. Sweeps run in chunks of cotangents, so memory is that of a
chunk (a few vectors of the widths below the cut and of D) plus M_L (F_L x F_L), never D x D.

``diagonal`` takes the cheapest cut (by counted multiply-adds) whose working memory fits the
budget, among the cuts above which any step may lie (M-propagation takes them all) and below
which every curved step is a one-input elementwise one (tanh, GELU, softplus, ...). For a tanh
MLP D -> 64 -> 64 -> 1 that is the first pre-activation: M (64 x 64), and J = W_1 by 64 sweeps.
Where no such cut exists (a product of two branches or a LayerNorm below every small cut, a
model the graph engine cannot capture), where ``method`` names a method, or where the graph
engine's own rows count fewer multiply-adds (conv stacks, whose ``local`` schedule works on
patches while the sweeps here are whole adjoint passes: at D = 784 a tanh CNN counted 1.06e9
propagated against 0.41e9 by rows, and took 1.4-2.4 s against 0.3-0.6 s for 4 samples on
2 shared cores), the diagonal comes
from blocks of R Hessian rows computed by that method, R chosen so that a block takes a quarter
of the budget, of which only the entries H[r, r] are kept: all D rows are computed.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import caches
from .adjoints import pull
from .allocator import reusing_large_buffers
from .curvature import DENSE, DIAG, ZERO, is_fast, transition
from .errors import ArgumentError
from .graph import Tape, capture, record
from .methods import choose_method, default_memory_budget
from .ops import Unsupported
from .planner import Segment, head_kind, make_plan, segments
from .propagate import _segment, gradients
from .rows import Rows
from .rules import Elementwise
from .support import analyze
from .targets import Target

log = logging.getLogger(__name__)

PROPAGATED = "propagated"


@reusing_large_buffers
def diagonal(
    model: nn.Module,
    x: Tensor,
    target: Target,
    budget: int | None = None,
    method: str = "auto",
) -> tuple[Tensor, Tensor]:
    """diag(H_k) at each sample, and the gradients, exactly.

    Args:
        model: maps (B, *S) to (B, C); used in eval mode for the call.
        x: inputs (N, *S).
        target: the K scalar functions of the output (``make_target``).
        budget: bytes of working memory (default: ``default_memory_budget`` of x's device).
        method: ``"propagated"``: on the graph (module doc; refused where no cut allows it);
            a name in ``METHODS``: row blocks by that method; ``"auto"``: propagated or row
            blocks by ``auto``'s method, whichever the counted multiply-adds say is cheaper
            (a conv stack's row blocks by the ``local`` schedule can be), propagated where the
            rows would come from the generic methods.

    Returns:
        diag (N, K, D) with diag[n, k, i] = d^2 y_k / dx_i^2 at x[n], and the gradient
        (N, K, D); x's dtype and device. The trace is ``diag.sum(-1)``.

    Raises:
        ArgumentError: an unknown method, one that does not support the model, or
            ``"propagated"`` where no cut allows it (``method``).
    """
    _check_x(x)
    caches.check(model)
    budget = budget or default_memory_budget(x.device)
    with eval_mode(model):
        if method in ("auto", PROPAGATED):
            plan = diagonal_plan(model, x, target, budget)
            if method == PROPAGATED and not isinstance(plan, DiagonalPlan):
                raise ArgumentError(f"method {PROPAGATED!r} does not apply: {plan}", "method")
            if isinstance(plan, DiagonalPlan):
                if method == PROPAGATED or not _rows_are_cheaper(model, x, target, plan, budget):
                    return _propagated(model, x, target, plan, budget)
            else:
                log.info("diagonal from row blocks: %s", plan)
        choice = choose_method(method, model, target, x, checked=True)
        return _by_rows(choice.compute, model, x, target, budget)


def _rows_are_cheaper(model, x: Tensor, target: Target, plan: DiagonalPlan, budget: int) -> bool:
    """Whether ``auto``'s graph method computes all rows, in the blocks ``_by_rows`` takes,
    with fewer counted multiply-adds than the propagated plan (the generic methods are not
    counted: never chosen over it)."""
    if analyze(model, x, target).structured is not None:
        return False
    d, k = x.shape[1:].numel(), target.n_outputs
    r = _block_rows(x, k, budget)
    tape = record(capture(model), x[:1])
    rows = make_plan(tape, r, k, head_kind(target.kind)).cost * -(-d // r)
    return rows < plan.cost


# --- propagated on the graph ---------------------------------------------------------------


@dataclass(frozen=True)
class DiagonalPlan:
    """Where ``diagonal`` cuts the graph.

    Attributes:
        segments: the graph's segments (``planner.segments``).
        cut: M is carried down through ``segments[cut:]`` (``len(segments)``: M is the head's).
        curved: indices of the (elementwise) curved steps below the cut.
        cost: counted multiply-adds per sample.
        fixed: bytes per sample besides the sweeps: values, gradients, M.
        sweep: bytes of one cotangent's sweep per sample.
    """

    segments: tuple[Segment, ...]
    cut: int
    curved: tuple[int, ...]
    cost: int
    fixed: int
    sweep: int

    @property
    def stop(self) -> int:
        """The first step above the cut."""
        segs = self.segments
        return segs[self.cut].start if self.cut < len(segs) else segs[-1].stop

    def slot(self, tape: Tape) -> int:
        return self.segments[self.cut].bottom if self.cut < len(self.segments) else tape.output


def diagonal_plan(model: nn.Module, x: Tensor, target: Target, budget: int) -> DiagonalPlan | str:
    """The cheapest cut for the propagated diagonal that fits ``budget``, or why there is none
    (then ``diagonal`` uses row blocks)."""
    try:
        tape = record(capture(model), x[:1])
    except Unsupported as err:
        return f"the graph engine cannot take the model: {err}"
    return _plan(tape, target.n_outputs, head_kind(target.kind), budget)


def _plan(tape: Tape, k: int, top: str, budget: int) -> DiagonalPlan | str:
    steps = tape.steps
    segs = segments(tape)
    if not segs:
        return "the output does not depend on the input"
    item = tape.values[0].element_size()
    d = tape.width(0)
    widths = [tape.width(s.out) for s in steps]
    state = (k + 2) * (sum(widths) + d)  # values and gradients of every slot
    prefix = [0]  # multiply-adds of one sweep through steps [0, i)
    for s in steps:
        prefix.append(prefix[-1] + s.rule.macs)
    below_width = [d]  # sum of widths of steps [0, i) plus D: one sweep's memory
    for w in widths:
        below_width.append(below_width[-1] + w)
    plans, kind, above, m_mem = [], top, 0, 0
    curved_at, too_big, wide = None, False, None
    for cut in range(len(segs), 0, -1):  # cut 0 would carry M down to x: D x D
        # (nor is M carried through any tensor as wide as x: that is no cheaper than dense)
        if cut < len(segs):
            seg = segs[cut]
            kind, cost, mem = _carry(tape, seg, kind, k)
            if kind == DENSE and tape.width(seg.bottom) >= d:
                wide = tape.width(seg.bottom)  # M there would be as large as the Hessian itself
                break
            above += cost
            m_mem = max(m_mem, mem)
        stop = segs[cut].start if cut < len(segs) else len(steps)
        slot = segs[cut].bottom if cut < len(segs) else tape.output
        bad = [s for s in steps[:stop] if s.rule.curved and not _diagonal_term(s)]
        if bad:
            curved_at = bad[0].name  # the lowest such step seen so far
            continue
        curved = tuple(i for i, s in enumerate(steps[:stop]) if s.rule.curved)
        f = tape.width(slot)
        seeds = {ZERO: 0, DIAG: 1, DENSE: 1 + k}[kind]
        cost = above + seeds * f * prefix[stop] + k * f * d
        cost += sum(tape.width(steps[i].inputs[0]) * (prefix[i] + k * d) for i in curved)
        sweep = max(below_width[stop], *(below_width[i] for i in curved), 0) * item
        fixed = (state + m_mem + (3 * k * f * f if kind == DENSE else 0)) * item
        if fixed + (1 + k) * sweep > budget:
            too_big = True
            continue
        plans.append(DiagonalPlan(segs, cut, curved, cost, fixed, sweep))
    if too_big and not plans:
        return f"no cut of the graph leaves a working set within the budget of {budget} bytes"
    if wide is not None and not plans:
        return (
            f"every cut low enough for the curved steps would carry M through a tensor of "
            f"{wide} >= D features ({d} x {d} or more per sample)"
        )
    if not plans:
        return f"step {curved_at} is curved and not elementwise, and no cut but x lies below it"
    return min(plans, key=lambda p: p.cost)


def _diagonal_term(step) -> bool:
    """Whether a curved step's second-order term is diagonal on its one input."""
    rule = step.rule
    return (
        isinstance(rule, Elementwise)
        and len(step.inputs) == 1
        and tuple(rule.shapes_in[0]) == tuple(rule.shape_out)
    )


def _carry(tape: Tape, seg: Segment, kind: str, k: int) -> tuple[str, int, int]:
    """M's kind below a segment, the multiply-adds and the memory (elements per sample) of
    carrying it through (as ``propagate._segment`` does: a closed form for a fast step, else a
    sweep seeded with the identity at the segment's bottom)."""
    width = tape.width(seg.bottom)
    if seg.stop - seg.start == 1 and is_fast(tape.steps[seg.start].rule):
        new, cost = transition(tape.steps[seg.start].rule, kind, k)
        top = tape.width(seg.top)
        return new, cost, 3 * k * max(width, top) ** 2 if new == DENSE else 0
    inside = [tape.steps[i] for i in range(seg.start, seg.stop)]
    curved = any(s.rule.curved for s in inside)
    macs = sum(s.rule.macs for s in inside)
    new = ZERO if kind == ZERO and not curved else DENSE
    cost = width * macs * (1 + 3 * k) + k * width * tape.width(seg.top) ** 2
    mem = width * sum(tape.width(s.out) for s in inside) * (1 + 2 * k) + 3 * k * width * width
    return new, cost, mem


@torch.no_grad()
def _propagated(
    model: nn.Module, x: Tensor, target: Target, plan: DiagonalPlan, budget: int
) -> tuple[Tensor, Tensor]:
    n, d, k = x.shape[0], x.shape[1:].numel(), target.n_outputs
    gm = capture(model)
    per_sample = plan.fixed + (1 + k) * plan.sweep
    step = max(1, budget // per_sample)
    diag, grad = x.new_zeros(n, k, d), x.new_zeros(n, k, d)
    for s in range(0, n, step):
        tape = record(gm, x[s : s + step])
        b = tape.n
        chunk = max(1, (budget - b * plan.fixed) // (b * (1 + k) * plan.sweep))
        sub = target.subset(s, s + b)
        g_top, head = sub.derivatives(tape.values[tape.output])
        g = gradients(tape, g_top)
        if 0 in g:
            grad[s : s + b] = g[0].reshape(b, k, d)
        m = head
        for seg in reversed(plan.segments[plan.cut :]):
            m = _segment(tape, seg, m, g)
        out = diag[s : s + b]
        slot = plan.slot(tape)
        if m.kind == DENSE:
            _add_quadratic(out, tape, plan.stop, slot, m.value, chunk)
        elif m.kind == DIAG:
            _add_squares(out, tape, plan.stop, slot, m.value, chunk)
        for i in plan.curved:
            st = tape.steps[i]
            if st.out in g:
                c = st.rule.curvature(g[st.out]).reshape(b, k, -1)
                _add_squares(out, tape, i, st.inputs[0], c, chunk)
    return diag, grad


def _rows_of_jacobian(tape: Tape, stop: int, slot: int, cot: Tensor) -> Tensor | None:
    """cot J (N, E, D) for cotangents cot (N or 1, E, F) at ``slot``: adjoint sweeps through
    steps [0, stop); None where x does not reach the slot."""
    value = tape.values[slot]
    seed = cot.reshape(cot.shape[0], cot.shape[1], *value.shape[1:])
    seed = seed.expand(tape.n, *seed.shape[1:])
    adj = pull(tape.steps[:stop], {slot: seed}, keep=False)
    if 0 not in adj:
        return None
    return adj[0].reshape(tape.n, cot.shape[1], -1)


def _add_squares(out: Tensor, tape: Tape, stop: int, slot: int, w: Tensor, chunk: int) -> None:
    """out (N, K, D) += diag(J^T diag(w_k) J) = sum_f w_k[f] J[f, :]^2, w (N, K, F)."""
    f = w.shape[-1]
    eye = torch.eye(f, dtype=out.dtype, device=out.device)
    for a in range(0, f, chunk):
        j = _rows_of_jacobian(tape, stop, slot, eye[a : a + chunk].unsqueeze(0))
        if j is None:
            return
        out.add_(w[:, :, a : a + chunk] @ (j * j))  # (N, K, c) @ (N, c, D)


def _add_quadratic(out: Tensor, tape: Tape, stop: int, slot: int, m: Tensor, chunk: int) -> None:
    """out (N, K, D) += diag(J^T M_k J) = sum_f J[f, :] (M_k J)[f, :], M (N, K, F, F)."""
    n, k, f = m.shape[0], m.shape[1], m.shape[-1]
    eye = torch.eye(f, dtype=out.dtype, device=out.device)
    for a in range(0, f, chunk):
        c = min(chunk, f - a)
        cot = torch.cat(
            [eye[a : a + c].expand(n, c, f), m[:, :, a : a + c].reshape(n, k * c, f)], 1
        )
        rows = _rows_of_jacobian(tape, stop, slot, cot)
        if rows is None:
            return
        j, mj = rows[:, :c], rows[:, c:].reshape(n, k, c, -1)
        out.add_((j.unsqueeze(1) * mj).sum(2))


# --- from row blocks -----------------------------------------------------------------------


def _by_rows(compute, model, x: Tensor, target: Target, budget: int) -> tuple[Tensor, Tensor]:
    """H[r, r] from blocks of R rows, R such that a block (N, K, R, D) takes a quarter of the
    budget."""
    n, d, k = x.shape[0], x.shape[1:].numel(), target.n_outputs
    r = _block_rows(x, k, budget)
    diag = x.new_empty(n, k, d)
    grad = None
    for a in range(0, d, r):
        b = min(d, a + r)
        rows = Rows(torch.arange(a, b, device=x.device), a == 0 and b == d)
        h, g = compute(model, x, target, rows, budget)
        diag[:, :, a:b] = torch.diagonal(h, offset=a, dim1=-2, dim2=-1)
        grad = g if grad is None else grad
    return diag, grad


def _block_rows(x: Tensor, k: int, budget: int) -> int:
    """Rows a block, such that the block (N, K, R, D) takes a quarter of the budget."""
    n, d = x.shape[0], x.shape[1:].numel()
    return max(1, min(d, budget // (4 * n * k * d * x.element_size())))


# --- shared by the kinds -------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode for the block (BatchNorm couples samples in training mode,
    dropout is random), its mode restored afterwards."""
    was = model.training
    with contextlib.suppress(NotImplementedError):  # torch.export programs refuse train()
        model.train(False)
    try:
        yield model
    finally:
        with contextlib.suppress(NotImplementedError):
            model.train(was)


def _check_x(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ArgumentError(
            "x must be a batch (N, *S) of inputs; for one sample use x.unsqueeze(0)", "x"
        )


__all__ = ["PROPAGATED", "DiagonalPlan", "diagonal", "diagonal_plan", "eval_mode"]
