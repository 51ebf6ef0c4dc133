"""Where to cut the graph, and how to compute each part, by counted multiply-adds.

The Hessian of the K outputs at x is H = sum over steps of J_v^T C_v J_v plus the head's
J_z^T A J_z (C_v: a step's second-order term, J_v = dv/dx). Three schedules evaluate it:

* backward (M-propagation): M = d^2y/dv^2 carried down from the output through the cut points of
  the graph (tensors every path from x to z passes through), segment by segment: fast steps by
  their closed form (``curvature``), other segments by tangent-adjoint with the identity as seed
  (their Jacobian times M, plus their own second-order terms). Cost independent of the rows R.
* tangent-adjoint (below the lowest cut L): forward tangents J e_r of the R rows through the steps
  below L, the join U_L = J_L M_L, and one adjoint sweep of the second-order adjoints down to x.
  Cost ~ R x (cost of the steps), shared by the K outputs in the forward part; handles any DAG.
* reverse Jacobian (below L, when no step there has a second-order term: a piecewise-linear
  body): J_L = dv_L/dx by F_L adjoint sweeps, then H[rows] = J_L[:, rows]^T M_L J_L.
* local (below L, conv stacks): J_L^T M_L J_L by the reverse Jacobian (or, for all rows, J_L
  from the patch tangents: NOTE [patch Jacobian] in ``local``), plus the curvature of the steps
  below L by tangent-adjoint on patches, each row's tangents and adjoints held on a window around
  its receptive field (NOTE [local] in ``local``).

* outer (below L): the forward Jacobians J_v = dv/dx of every tensor below L (D tangents), and
  each curved step's second-order term contracted with its input's J where it arises (NOTE
  [outer] in ``propagate``), plus J_L^T M_L J_L. Cost ~ D x (cost of the steps) + K R D x (the
  widths of the curved steps): no adjoint sweep, so cheaper than tangent-adjoint when D is below
  the layer widths.

* Taylor (the whole graph, no cut): value, Jacobian and Hessian of every tensor carried forward
  from x (``taylor``), where every step has a forward second-order rule. Cost ~ D (D + 3) / 2
  tangents through every step, independent of R and nearly of K: the cheapest when D is below the
  layer widths.

``make_plan`` counts every admissible cut and schedule and takes the cheapest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from operator import attrgetter

from .curvature import DENSE, DIAG, ZERO, is_fast, transition
from .graph import Tape
from .local import Layout, layout
from .rules import ELEMENTWISE_MACS, GENERAL_FACTOR, Dense, General
from .taylor import cost as taylor_cost
from .taylor import supports as taylor_supports

TANGENT, REVERSE, LOCAL, OUTER, TAYLOR = "tangent", "reverse", "local", "outer", "taylor"
SCHEDULES = (TANGENT, REVERSE, LOCAL, OUTER, TAYLOR)


@dataclass(frozen=True)
class Segment:
    """Steps [start, stop) between the cut slots ``bottom`` and ``top``."""

    start: int
    stop: int
    bottom: int
    top: int


@dataclass(frozen=True)
class Plan:
    """The schedule of one graph: M-propagation through ``segments[cut:]``, then ``bottom``
    (``TANGENT``, ``REVERSE`` or ``LOCAL``) through the steps below ``segments[cut].start``;
    or ``TAYLOR`` (with ``cut == len(segments)``): forward Taylor propagation through the whole
    graph.

    Attributes:
        segments: between consecutive cut points, from x up to the output.
        cut: index of the lowest segment that M-propagation passes through
            (``len(segments)``: none; M stays at the output).
        bottom: the schedule below the cut.
        cost: multiply-adds per sample.
        zero: whether the Hessian is identically zero (no second-order term anywhere).
        layout: the patches of a ``LOCAL`` plan, as the planner counted them (None: derive it
            with ``local.layout``); with a ``head``, J_L comes from the patches.
    """

    segments: tuple[Segment, ...]
    cut: int
    bottom: str
    cost: int
    zero: bool
    layout: Layout | None = field(default=None, compare=False, repr=False)

    def local_layout(self, tape: Tape) -> Layout | None:
        """The patches below the cut of a ``LOCAL`` plan on this graph."""
        return self.layout if self.layout is not None else layout(tape, self.cut_step)

    @property
    def cut_step(self) -> int:
        """Index of the first step above the cut (the steps below it are [0, cut_step))."""
        return self.segments[self.cut].start if self.cut < len(self.segments) else self.n_steps

    @property
    def cut_slot(self) -> int:
        return self.segments[self.cut].bottom if self.cut < len(self.segments) else self.top

    @property
    def n_steps(self) -> int:
        return self.segments[-1].stop if self.segments else 0

    @property
    def top(self) -> int:
        return self.segments[-1].top if self.segments else 0


def segments(tape: Tape) -> tuple[Segment, ...]:
    """The graph cut at every tensor that all paths from x to the output pass through."""
    last_use: dict[int, int] = {}
    for i, step in enumerate(tape.steps):
        for v in step.inputs:
            last_use[v] = i
    cuts = [(0, 0)]  # (index of the next step, slot)
    reach = last_use.get(0, -1)  # the last use of any slot produced so far but the newest
    for i, step in enumerate(tape.steps):
        if reach <= i:
            cuts.append((i + 1, step.out))
        reach = max(reach, last_use.get(step.out, -1))
    return tuple(
        Segment(a, b, bottom, top) for (a, bottom), (b, top) in zip(cuts, cuts[1:], strict=False)
    )


def head_kind(target_kind: str) -> str:
    """The kind of A = d^2 y / dz^2 of a target: logits (zero), mse (diagonal), cross-entropy."""
    return {"index": ZERO, "mse": DIAG}.get(target_kind, DENSE)


def make_plan(
    tape: Tape, rows: int, k: int, top: str, schedules: tuple[str, ...] = SCHEDULES,
    samples: int = 1,
) -> Plan:  # fmt: skip
    """The cheapest admissible plan for R = ``rows`` rows and K = ``k`` outputs.

    Args:
        tape: the recorded graph.
        rows, k: R and K.
        top: the kind of A at the output (``head_kind``).
        schedules: the bottom schedules allowed (``piecewise`` allows ``REVERSE`` only).
        samples: samples a call, over which work done once a call is shared.

    Raises:
        ValueError: no allowed schedule applies (``REVERSE`` needs a cut below which no step
            has a second-order term, ``LOCAL`` one with such a step and patches: ``layout``).
    """
    plans = all_plans(tape, rows, k, top, schedules, samples)
    if not plans:
        raise ValueError("no schedule applies: a step below every cut has a second-order term")
    return min(plans, key=lambda p: p.cost)


def all_plans(
    tape: Tape, rows: int, k: int, top: str, schedules: tuple[str, ...] = SCHEDULES,
    samples: int = 1,
) -> list[Plan]:  # fmt: skip
    """Every admissible plan with its counted cost, from the highest cut down (``make_plan``)."""
    segs = segments(tape)
    curved = [step.rule.curved for step in tape.steps]
    zero = top == ZERO and not any(curved)
    plans: list[Plan] = []
    kind, above = top, 0  # M's kind at the bottom of segs[cut:], and its cost
    for cut in range(len(segs), -1, -1):
        if cut < len(segs):
            kind, cost = _segment_m(tape, segs[cut], kind, k)
            above += cost
        stop = segs[cut].start if cut < len(segs) else len(tape.steps)
        slot = segs[cut].bottom if cut < len(segs) else tape.output
        options = []
        if TANGENT in schedules:
            options.append((TANGENT, _tangent_cost(tape, 0, stop, 0, slot, rows, k, kind, True)))
        if OUTER in schedules:
            options.append((OUTER, _outer_cost(tape, stop, slot, rows, k, kind)))
        if REVERSE in schedules and not any(curved[:stop]):
            options.append((REVERSE, _reverse_cost(tape, stop, slot, rows, k, kind)))
        lay = layout(tape, stop) if LOCAL in schedules else None
        if lay is not None:
            below = lay.cost(rows, k, tape.width(0))
            cost = _reverse_cost(tape, stop, slot, rows, k, kind)
            options.append((LOCAL, cost + below, replace(lay, head=None)))
            if lay.head is not None and rows == tape.width(0) and kind != ZERO:
                cost = lay.head.cost(samples) + _join_cost(tape, slot, rows, k, kind)
                options.append((LOCAL, cost + below, lay))
        plans += [Plan(segs, cut, option[0], above + option[1], zero, *option[2:])
                  for option in options]  # fmt: skip
    plans = [replace(p, cost=p.cost + _overhead(tape, 2 if p.bottom == OUTER else 3, samples))
             for p in plans]  # fmt: skip
    if TAYLOR in schedules and not zero and taylor_supports(tape):
        cost = taylor_cost(tape, k, top, samples) + _overhead(tape, 1, samples)
        plans.append(Plan(segs, len(segs), TAYLOR, cost, zero))
    return plans


# The fixed cost of one pass of a step through torch (Python, dispatch, a fresh output: ~5 us on
# the 2-core CPU, ~100,000 multiply-adds of a matrix product there), shared by the samples of a
# call. The schedules with a cut make three passes per step (the gradient, the tangents and the
# second-order adjoints or M), Taylor one. It decides between them for the small nets that
# Taylor is for (PINNs, hessQuik's, D <= 16): there, a call of 256 samples is dominated by it.
PASS_MACS = 100_000


# What one multiply-add of the outer schedule's contractions costs, in those of a large matrix
# product: per sample (R x F) (F x D) products with R, D in the tens run at an eighth of the rate
# on the 2-core CPU (the pair potential's (15 x 160) (160 x 15) for 64 samples: 270 us, 9 GFLOP/s).
# Larger R x D tiles run nearer the rate of a large product: the factor falls as 1 / (R D) from
# CONTRACTION_TILE entries to 1 (a 24-atom potential's (72 x 17,664) (17,664 x 72) products for
# 8 samples: outer took 1.7 s where tangent-adjoint took 2.5 s, which the factor 8 counted 2.7x
# the cost of).
CONTRACTION_MACS = 8
CONTRACTION_TILE = 256


def contraction_factor(r: int, d: int) -> float:
    """The cost of one multiply-add of (R x F) (F x D) per-sample products (see above)."""
    return max(1.0, CONTRACTION_MACS * min(1.0, CONTRACTION_TILE / max(r * d, 1)))


_COUNTED = attrgetter("macs")  # a step's cost as its rule counts it


def generic_cost(tape: Tape, rows: int, k: int, top: str, samples: int = 1) -> int:
    """Counted multiply-adds a sample of ``forward_over_reverse`` (``jvp`` of ``jacrev``, vmapped
    over rows and samples), in the units of the plans' costs: the gradient of each of the K
    outputs (a forward, K backwards), then per row a forward tangent through every step (the
    first layer too: no basis shortcut) and, per output, the tangent of the backward, with each
    curved step's second-order term. That is tangent-adjoint propagation with the cut at the
    output, counted as the plans count it, but with every step at its native cost: torch.func
    differentiates a step that has no rule of its own (a ``General`` step, whose count carries
    the engine's ``GENERAL_FACTOR``) like any other. Four passes of fixed cost a step."""

    def native(rule) -> int:
        return rule.macs // (GENERAL_FACTOR if isinstance(rule, General) else 1)

    total = sum(native(step.rule) for step in tape.steps)
    n = len(tape.steps)
    propagation = _tangent_cost(tape, 0, n, 0, tape.output, rows, k, top, False, native)
    return (1 + k) * total + propagation + _overhead(tape, 4, samples)


def _overhead(tape: Tape, passes: int, samples: int) -> int:
    """Per-sample share of the fixed cost of ``passes`` passes through the graph's steps."""
    return passes * len(tape.steps) * PASS_MACS // max(samples, 1)


def curvatures(tape: Tape, plan: Plan, top: str) -> list[tuple[Segment, str]]:
    """The segments M passes through under ``plan`` (from the output down) and the kind of M
    at the bottom of each (``top``: its kind at the output)."""
    out = []
    kind = top
    for seg in reversed(plan.segments[plan.cut :]):
        kind, _ = _segment_m(tape, seg, kind, 1)
        out.append((seg, kind))
    return out


def _segment_m(tape: Tape, seg: Segment, kind: str, k: int) -> tuple[str, int]:
    """M's kind below a segment and the cost of carrying it through."""
    if seg.stop - seg.start == 1 and is_fast(tape.steps[seg.start].rule):
        return transition(tape.steps[seg.start].rule, kind, k)
    width = tape.width(seg.bottom)
    cost = _tangent_cost(tape, seg.start, seg.stop, seg.bottom, seg.top, width, k, kind, False)
    curved = any(tape.steps[i].rule.curved for i in range(seg.start, seg.stop))
    return (ZERO if kind == ZERO and not curved else DENSE), cost


def _tangent_cost(
    tape: Tape, start: int, stop: int, bottom: int, top: int, r: int, k: int, kind: str,
    basis: bool, macs=_COUNTED,
) -> int:  # fmt: skip
    """Tangent-adjoint through steps [start, stop) with R tangents, joined with M of ``kind``
    (``macs``: a step's cost, its rule's count unless given)."""
    cost = _tangent_forward_cost(tape, start, stop, bottom, r, basis, macs)
    width = tape.width(top)
    if kind == DENSE:
        cost += k * r * width * width
    elif kind == DIAG:
        cost += k * r * width * ELEMENTWISE_MACS
    live = kind != ZERO
    for i in reversed(range(start, stop)):
        rule = tape.steps[i].rule
        if rule.curved:
            live = True
            cost += 2 * k * r * macs(rule)
        if live:
            cost += k * r * macs(rule)
    return cost


def _outer_cost(tape: Tape, stop: int, slot: int, r: int, k: int, kind: str) -> int:
    """D forward tangents through steps [0, stop), each curved step's term for R rows contracted
    with its inputs' Jacobians (K R D F_in), and J_L^T M_L J_L at ``slot``."""
    d = tape.width(0)
    cost = _tangent_forward_cost(tape, 0, stop, 0, d, True)
    factor = contraction_factor(r, d)
    for i in range(stop):
        rule = tape.steps[i].rule
        if rule.curved:
            width = sum(math.prod(s) for s in rule.shapes_in)
            cost += 2 * k * r * rule.macs + int(factor * k * r * d * width)
    return cost + (0 if kind == ZERO else _join_cost(tape, slot, r, k, kind))


def _tangent_forward_cost(
    tape: Tape, start: int, stop: int, bottom: int, r: int, basis: bool,
    macs=_COUNTED,
) -> int:  # fmt: skip
    """R forward tangents through steps [start, stop) (a first Dense step on the basis: free)."""
    cost = 0
    for i in range(start, stop):
        rule = tape.steps[i].rule
        first = basis and isinstance(rule, Dense) and rule.flat and tape.steps[i].inputs == [bottom]
        cost += 0 if first else r * macs(rule)
    return cost


def _reverse_cost(tape: Tape, stop: int, slot: int, r: int, k: int, kind: str) -> int:
    """J_L by F_L adjoint sweeps through steps [0, stop), then J[:, rows]^T M J."""
    if kind == ZERO:
        return 0
    sweeps = tape.width(slot) * sum(tape.steps[i].rule.macs for i in range(stop))
    return sweeps + _join_cost(tape, slot, r, k, kind)


def _join_cost(tape: Tape, slot: int, r: int, k: int, kind: str) -> int:
    """J[:, rows]^T M J from J = dv/dx at ``slot``."""
    width, dim = tape.width(slot), tape.width(0)
    return k * r * width * (width if kind == DENSE else 1) + k * r * width * dim
