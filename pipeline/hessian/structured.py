"""Exact input Hessians by curvature propagation over the model's captured graph.

The graph (``graph``) is cut where every path from x to the output meets (``planner``); the
planner chooses by counted multiply-adds how far M = d^2y/dv^2 is carried down from the output,
and whether the rows below are computed by tangent-adjoint propagation or, for a piecewise-linear
body, by the reverse Jacobian; ``propagate`` executes the plan. ``method="structured"`` allows
every schedule, ``method="piecewise"`` the reverse-Jacobian one only (``piecewise``).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from . import taylor
from .curvature import DENSE, DIAG, is_fast
from .graph import Tape, capture, record
from .planner import (
    LOCAL,
    OUTER,
    REVERSE,
    SCHEDULES,
    TAYLOR,
    Plan,
    all_plans,
    curvatures,
    generic_cost,
    head_kind,
)
from .propagate import cut_curvature, gradients, hessian_rows
from .rows import Rows, select_rows
from .rules import General
from .targets import Target


def compute(
    model: nn.Module,
    x: Tensor,
    target: Target,
    rows: Rows | Tensor,
    memory_budget: int,
    schedules: tuple[str, ...] = SCHEDULES,
) -> tuple[Tensor, Tensor]:
    """Hessian rows (N, K, R, D) and gradients (N, K, D) of the target's K outputs.

    Samples are processed in chunks of about ``memory_budget`` bytes, and rows in chunks where
    one sample needs more (NOTE [budget]).
    """
    n, d, k = x.shape[0], x.shape[1:].numel(), target.n_outputs
    rows = select_rows(rows, d, x.device)
    r = len(rows)
    gm = capture(model)
    with torch.no_grad():
        plan, per_sample = _plan(gm, x, target, r, schedules, memory_budget)
        step = max(1, memory_budget // max(per_sample, 1))
        hess = grads = None
        for s in range(0, n, step):
            whole = s == 0 and step >= n
            tape = record(gm, x if whole else x[s : s + step])
            sub = target if whole else target.subset(s, s + tape.n)
            g_top, head = sub.derivatives(tape.values[tape.output])
            if plan.bottom == TAYLOR:
                h, grad = _taylor(tape, g_top, head, rows)
                if step >= n:
                    return h, grad
                if hess is None:
                    hess, grads = x.new_empty(n, k, r, d), x.new_empty(n, k, d)
                hess[s : s + tape.n], grads[s : s + tape.n] = h, grad
                continue
            g = gradients(tape, g_top)
            grad = _input_gradient(g, tape, k)
            row_step = row_chunk(tape, plan, r, k, memory_budget, head_kind(target.kind))
            m = None if row_step >= r or plan.zero else cut_curvature(tape, plan, head, g)
            for c in range(0, r, row_step):
                chunk = rows if row_step >= r else rows.chunk(c, c + row_step)
                h = hessian_rows(tape, plan, head, g, chunk, k, m)
                if step >= n and row_step >= r:
                    return h, grad
                if hess is None:
                    hess = x.new_empty(n, k, r, d)
                    grads = x.new_empty(n, k, d)
                hess[s : s + tape.n, :, c : c + row_step] = h
            grads[s : s + tape.n] = grad
        return hess, grads


def row_chunk(tape: Tape, plan: Plan, r: int, k: int, budget: int, top: str = DENSE) -> int:
    """How many of the R rows one pass over ``tape``'s samples computes within ``budget`` bytes:
    all where they fit, else as many as fit beside the memory that does not grow with the rows
    (at least one)."""
    fixed = bytes_per_sample(tape, plan, 0, k, top) * tape.n
    total = bytes_per_sample(tape, plan, r, k, top) * tape.n
    if total <= budget or r <= 1:
        return r
    per_row = max((total - fixed) // r, 1)
    return int(min(r, max(1, (budget - fixed) // per_row)))


_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[Plan, int]]] = (
    weakref.WeakKeyDictionary()
)


def _plan(
    gm: nn.Module, x: Tensor, target: Target, r: int, schedules, budget: int
) -> tuple[Plan, int]:
    """The plan and the bytes a sample needs, cached per graph, input shape, dtype, device,
    target kind, K, R, schedules, budget and samples a call, to a power of two (the graph's
    structure does not depend on the values; a neighbour list found from them changes only the
    widths of its steps).

    NOTE [budget]: memory is part of the choice: of the plans whose working memory for one row
    fits the budget (what ``compute`` needs at the least, rows being taken in chunks), the one
    with the fewest counted multiply-adds; where none fits, the one needing the least memory.
    A schedule whose memory grows with D and not with the rows (``outer``'s D tangents,
    Taylor's D (D + 3) / 2) is thereby left out for large inputs: a 500-atom molecule's D = 1500
    tangents at its 25,000 edges of 32 features would take 4.8 GB a tensor in float32.
    """
    k = target.n_outputs
    samples = _samples(x)
    key = (tuple(x.shape[1:]), x.dtype, x.device, target.kind, k, r, schedules, samples, budget)
    per_graph = _PLANS.setdefault(gm, {})
    if key not in per_graph:
        probe = record(gm, x[:2])
        plans = all_plans(probe, r, k, head_kind(target.kind), schedules, samples)
        if not plans:
            raise ValueError("no schedule applies: a step below every cut has a second-order term")
        top = head_kind(target.kind)
        least = {id(p): bytes_per_sample(probe, p, 1, k, top) for p in plans}
        fits = [p for p in plans if least[id(p)] <= budget]
        plan = min(fits, key=lambda p: p.cost) if fits else min(plans, key=lambda p: least[id(p)])
        per_graph[key] = (plan, bytes_per_sample(probe, plan, r, k, top))
    return per_graph[key]


def _samples(x: Tensor) -> int:
    """The samples a call shares its fixed costs over, as the plans count them: a power of two
    up to 64 (few plans to cache)."""
    return 1 << min(x.shape[0], 64).bit_length() - 1


def counted(
    model: nn.Module, x: Tensor, target: Target, r: int, budget: int
) -> tuple[int, int, int]:
    """Counted multiply-adds a sample of R = ``r`` rows: the plan ``compute`` would make, and
    ``forward_over_reverse`` (``planner.generic_cost``) on the same graph; and how many of the
    graph's steps are ``General`` (differentiated by torch.func a step at a time)."""
    gm = capture(model)
    with torch.no_grad():
        plan, _ = _plan(gm, x, target, r, SCHEDULES, budget)
        probe = record(gm, x[:2])
    samples = _samples(x)
    general = sum(isinstance(step.rule, General) for step in probe.steps)
    generic = generic_cost(probe, r, target.n_outputs, head_kind(target.kind), samples)
    return plan.cost, generic, general


def _taylor(tape: Tape, g_top: Tensor, head, rows: Rows) -> tuple[Tensor, Tensor]:
    """Hessian rows (N, K, R, D) and gradients (N, K, D) by forward Taylor propagation."""
    h, grad = taylor.join(taylor.propagate(tape), tape.width(0), g_top, head)
    return (h if rows.full else h.index_select(2, rows.index)), grad


def _input_gradient(g: dict[int, Tensor], tape: Tape, k: int) -> Tensor:
    """dy/dx (N, K, D); zero when the output does not depend on x."""
    if 0 not in g:
        return tape.values[0].new_zeros(tape.n, k, tape.width(0))
    return g[0].reshape(tape.n, k, -1)


def bytes_per_sample(tape: Tape, plan: Plan, r: int, k: int, top: str = DENSE) -> int:
    """Working memory of one sample under ``plan``: values, gradients, tangents and adjoints
    below the cut, M above it (``top``: the kind of A at the output; M is dense, diagonal or zero
    below each segment as ``planner.curvatures`` says, and a segment M passes by tangent-adjoint
    holds its width's tangents through its steps)."""
    if plan.bottom == TAYLOR:
        return (
            taylor.bytes_per_sample(tape)
            + 2 * k * r * tape.width(0) * tape.values[0].element_size()
        )
    itemsize = tape.values[0].element_size()
    widths = [tape.width(s.out) for s in tape.steps]
    total = sum(widths) + tape.width(0)
    below = widths[: plan.cut_step] + [tape.width(0)]
    m_part = 0
    for seg, kind in curvatures(tape, plan, top):
        w = tape.width(seg.bottom)
        m_part = max(m_part, 3 * k * {DENSE: w * w, DIAG: w}.get(kind, 0))
        if not (seg.stop - seg.start == 1 and is_fast(tape.steps[seg.start].rule)):
            inside = widths[seg.start : seg.stop] + [w]
            m_part = max(m_part, w * sum(inside) + 3 * k * w * max(inside) + 3 * k * w * w)
    t_part = r * sum(below) + 3 * k * r * max(below)
    if plan.bottom in (REVERSE, LOCAL):
        t_part = 3 * tape.width(plan.cut_slot) * max(below) + k * r * tape.width(0)
    if plan.bottom == OUTER:  # a few Jacobians live at once, one step's terms, and H
        t_part = 3 * tape.width(0) * max(below) + 2 * k * r * (max(below) + tape.width(0))
    if plan.bottom == LOCAL:  # a few adjoints on their windows at once, and factors gathered
        lay = plan.local_layout(tape)  # at them; the rows whole at the end
        t_part += r * lay.tangent_size + 6 * k * r * max(lay.adjoint_size, tape.width(0))
    return (m_part + t_part + (k + 2) * total) * itemsize
