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
from .graph import Tape, capture, record
from .planner import LOCAL, OUTER, REVERSE, SCHEDULES, TAYLOR, Plan, head_kind, make_plan
from .propagate import gradients, hessian_rows
from .rows import Rows, select_rows
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
    one sample needs more.
    """
    n, d, k = x.shape[0], x.shape[1:].numel(), target.n_outputs
    rows = select_rows(rows, d, x.device)
    r = len(rows)
    gm = capture(model)
    with torch.no_grad():
        plan, per_sample = _plan(gm, x, target, r, schedules)
        step = max(1, memory_budget // max(per_sample, 1))
        row_step = r if per_sample <= memory_budget else max(1, r * memory_budget // per_sample)
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
            for c in range(0, r, row_step):
                chunk = rows if row_step >= r else rows.chunk(c, c + row_step)
                h = hessian_rows(tape, plan, head, g, chunk, k)
                if step >= n and row_step >= r:
                    return h, grad
                if hess is None:
                    hess = x.new_empty(n, k, r, d)
                    grads = x.new_empty(n, k, d)
                hess[s : s + tape.n, :, c : c + row_step] = h
            grads[s : s + tape.n] = grad
        return hess, grads


_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[Plan, int]]] = (
    weakref.WeakKeyDictionary()
)


def _plan(gm: nn.Module, x: Tensor, target: Target, r: int, schedules) -> tuple[Plan, int]:
    """The plan and the bytes a sample needs, cached per graph, input shape, dtype, device,
    target kind, K, R, schedules and samples a call, to a power of two (the graph's structure
    does not depend on the values)."""
    k = target.n_outputs
    samples = 1 << min(x.shape[0], 64).bit_length() - 1  # a power of two: few plans to cache
    key = (tuple(x.shape[1:]), x.dtype, x.device, target.kind, k, r, schedules, samples)
    per_graph = _PLANS.setdefault(gm, {})
    if key not in per_graph:
        probe = record(gm, x[:2])
        plan = make_plan(probe, r, k, head_kind(target.kind), schedules, samples)
        per_graph[key] = (plan, bytes_per_sample(probe, plan, r, k))
    return per_graph[key]


def _taylor(tape: Tape, g_top: Tensor, head, rows: Rows) -> tuple[Tensor, Tensor]:
    """Hessian rows (N, K, R, D) and gradients (N, K, D) by forward Taylor propagation."""
    h, grad = taylor.join(taylor.propagate(tape), tape.width(0), g_top, head)
    return (h if rows.full else h.index_select(2, rows.index)), grad


def _input_gradient(g: dict[int, Tensor], tape: Tape, k: int) -> Tensor:
    """dy/dx (N, K, D); zero when the output does not depend on x."""
    if 0 not in g:
        return tape.values[0].new_zeros(tape.n, k, tape.width(0))
    return g[0].reshape(tape.n, k, -1)


def bytes_per_sample(tape: Tape, plan: Plan, r: int, k: int) -> int:
    """Working memory of one sample under ``plan``: values, gradients, tangents and adjoints
    below the cut, M above it."""
    if plan.bottom == TAYLOR:
        return (
            taylor.bytes_per_sample(tape)
            + 2 * k * r * tape.width(0) * tape.values[0].element_size()
        )
    itemsize = tape.values[0].element_size()
    widths = [tape.width(s.out) for s in tape.steps]
    total = sum(widths) + tape.width(0)
    below = widths[: plan.cut_step] + [tape.width(0)]
    above = [tape.width(seg.bottom) for seg in plan.segments[plan.cut :]] + [tape.width(plan.top)]
    m_part = 3 * k * max(w * w for w in above)
    t_part = r * sum(below) + 3 * k * r * max(below)
    if plan.bottom in (REVERSE, LOCAL):
        t_part = 3 * tape.width(plan.cut_slot) * max(below) + k * r * tape.width(0)
    if plan.bottom == OUTER:  # a few Jacobians live at once, one step's terms, and H
        t_part = 3 * tape.width(0) * max(below) + 2 * k * r * (max(below) + tape.width(0))
    if plan.bottom == LOCAL:  # a few adjoints on their windows at once, and factors gathered
        lay = plan.local_layout(tape)  # at them; the rows whole at the end
        t_part += r * lay.tangent_size + 6 * k * r * max(lay.adjoint_size, tape.width(0))
    return (m_part + t_part + (k + 2) * total) * itemsize
