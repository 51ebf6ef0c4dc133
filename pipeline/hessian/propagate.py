"""Execute a plan on a recorded tape: gradients, M-propagation, and the bottom schedule.

All functions are pure tensor code with no host synchronisation (no ``.item()``, boolean masks or
``nonzero``): on a GPU the work is queued without waiting, a few batched products per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .adjoints import Padded, accumulate, pull, take
from .curvature import DENSE, DIAG, ZERO, Curvature, is_fast, rows_of, through
from .graph import Tape, consumers, release
from .local import local_rows
from .planner import LOCAL, OUTER, REVERSE, Plan, Segment
from .products import symmetric_product
from .rows import Rows
from .rules import Dense, Elementwise, direction_major, narrow_product, outer


def gradients(tape: Tape, g_top: Tensor) -> dict[int, Tensor]:
    """g = dy/dv (N, K, *s) at every slot, by one adjoint sweep from g_top (N, K, C)."""
    top = g_top.reshape(*g_top.shape[:2], *tape.values[tape.output].shape[1:])
    return pull(tape.steps, {tape.output: top}, keep=True)


def hessian_rows(
    tape: Tape, plan: Plan, head: Curvature, g: dict[int, Tensor], rows: Rows, k: int,
    m: Curvature | None = None,
) -> Tensor:  # fmt: skip
    """H[:, :, rows] (N, K, R, D) of the K outputs by ``plan``.

    Args:
        tape: the graph on this batch; plan: from ``planner.make_plan`` (same graph).
        head: A = d^2 y / dz^2 at the output; g: from ``gradients``; rows: the rows.
        m: M at the plan's cut (``cut_curvature``), where the caller computes several chunks of
            rows; else it is computed here.
    """
    n, d = tape.n, tape.width(0)
    like = tape.values[0]
    if plan.zero:
        return like.new_zeros(n, k, len(rows), d)
    if m is None:
        m = cut_curvature(tape, plan, head, g)
    if plan.cut_step == 0:  # M-propagation down to x
        h = rows_of(m, rows, like)
    elif plan.bottom == REVERSE:
        h = _reverse(tape, plan.cut_step, plan.cut_slot, m, rows)
    elif plan.bottom == LOCAL:
        h = _local(tape, plan, m, g, rows, k)
    elif plan.bottom == OUTER:
        h = _outer(tape, plan.cut_step, plan.cut_slot, m, g, rows)
    else:
        seed = _Basis(rows, tuple(like.shape[1:]))
        h = sweep(tape, 0, plan.cut_step, 0, plan.cut_slot, seed, m, g, k, rows.full)
    if h is None:
        return like.new_zeros(n, k, len(rows), d)
    return h.reshape(h.shape[0], k, len(rows), d).expand(n, k, len(rows), d)


def cut_curvature(tape: Tape, plan: Plan, head: Curvature, g: dict[int, Tensor]) -> Curvature:
    """M = d^2 y / dv^2 at the plan's cut, carried down from A = ``head`` at the output: the same
    for every chunk of rows."""
    m = head
    for seg in reversed(plan.segments[plan.cut :]):
        m = _segment(tape, seg, m, g)
    return m


def _segment(tape: Tape, seg: Segment, m: Curvature, g: dict[int, Tensor]) -> Curvature:
    """M at the bottom of a segment from M at its top."""
    if seg.stop - seg.start == 1 and is_fast(tape.steps[seg.start].rule):
        step = tape.steps[seg.start]
        return through(step.rule, m, g.get(step.out))
    width = tape.width(seg.bottom)
    like = tape.values[seg.bottom]
    eye = torch.eye(width, dtype=like.dtype, device=like.device)
    seed = eye.reshape(1, width, *like.shape[1:])
    k = next(iter(g.values())).shape[1]
    u = sweep(tape, seg.start, seg.stop, seg.bottom, seg.top, seed, m, g, k, False)
    if u is None:
        return Curvature.zero()
    return Curvature(DENSE, u.reshape(u.shape[0], k, width, width))


class _Basis:
    """The tangents e_r of the selected rows at x, built only where a step needs them dense."""

    def __init__(self, rows: Rows, shape: tuple[int, ...]):
        self.rows, self.shape = rows, shape

    def dense(self, like: Tensor) -> Tensor:
        """(1, R, *S) one-hot rows."""
        d = like[0].numel()
        eye = self.rows.index.unsqueeze(-1) == torch.arange(d, device=like.device)
        return eye.to(like.dtype).reshape(1, len(self.rows), *self.shape)

    def through_dense(self, w: Tensor) -> Tensor:
        """W e_r for a Dense first step: columns of W, (1, R, F_out)."""
        cols = w.T if self.rows.full else w.T.index_select(0, self.rows.index)
        return cols.unsqueeze(0)


def sweep(
    tape: Tape, start: int, stop: int, bottom: int, top: int, seed: Tensor | _Basis,
    m: Curvature, g: dict[int, Tensor], k: int, full_rows: bool,
) -> Tensor | None:  # fmt: skip
    """Tangent-adjoint through steps [start, stop): forward tangents from ``seed`` at ``bottom``,
    the join U = J M at ``top``, and second-order adjoints down to ``bottom``.

    Returns:
        U at ``bottom``: (N, K, R, *s_bottom), or None when it is zero.
    """
    steps = tape.steps[start:stop]
    keep = {v for s in steps if s.rule.curved for v in s.inputs} | {top}
    left = consumers(steps)
    sole_reader = left[bottom] == 1  # of the bottom slot: H = U W by the symmetric product
    tangents: dict[int, Tensor | _Basis] = {bottom: seed}
    for s in steps:
        ts = [tangents.get(v) for v in s.inputs]
        if all(t is None for t in ts):
            continue
        if isinstance(ts[0], _Basis) and len(ts) == 1 and isinstance(s.rule, Dense) and s.rule.flat:
            tangents[s.out] = ts[0].through_dense(s.rule.weight)
        else:
            tangents[s.out] = s.rule.jvp([_dense(t, tape.values[bottom]) for t in ts])
        release(tangents, s, left, keep)
    u_top = _join(tangents.get(top), m, tape.values[top])
    adj: dict[int, Tensor] = {} if u_top is None else {top: u_top}
    r = _count(seed)
    for s in reversed(steps):
        u = take(adj, s.out, False)
        parts: list[Tensor | Padded | None] = [None] * len(s.inputs)
        fused = u is not None and s.rule.curved and isinstance(s.rule, Elementwise)
        piece = getattr(s.rule, "piece", None)
        if fused:  # the linear part and the second-order term in two passes
            t = _dense(tangents[s.inputs[0]], tape.values[bottom])
            parts = [s.rule.second_adjoint(u, g[s.out], t)]
        elif u is not None and piece is not None:
            parts = [Padded.of(u, piece, 3)]
        elif u is not None:
            n = u.shape[0]
            if (full_rows and sole_reader and s.inputs == [bottom] and isinstance(s.rule, Dense)
                    and s.rule.flat):  # fmt: skip
                parts = [symmetric_product(u, s.rule.weight)]
            else:
                flat = u.reshape(n, k * r, *u.shape[3:])
                parts = [None if p is None else p.reshape(n, k, r, *p.shape[2:])
                         for p in s.rule.vjp(flat)]  # fmt: skip
        if s.rule.curved and not fused:
            ts = [_dense(tangents.get(v), tape.values[bottom]) for v in s.inputs]
            for i, term in enumerate(s.rule.second(g[s.out], ts)):
                if term is not None:
                    parts[i] = term if parts[i] is None else parts[i] + term
        for v, p in zip(s.inputs, parts, strict=True):
            accumulate(adj, v, p)
    return take(adj, bottom, False)


def _dense(t: Tensor | _Basis | None, like: Tensor) -> Tensor | None:
    """Tangents as a tensor: the basis made one-hot where it still is one."""
    return t.dense(like) if isinstance(t, _Basis) else t


def _count(seed: Tensor | _Basis) -> int:
    return len(seed.rows) if isinstance(seed, _Basis) else seed.shape[1]


def _join(t: Tensor | _Basis | None, m: Curvature, value: Tensor) -> Tensor | None:
    """U = J M at the top of a sweep: (N, K, R, *s) from tangents (B, R, *s)."""
    if m.kind == ZERO or t is None:
        return None
    t = _dense(t, value)
    j = t.reshape(*t.shape[:2], -1).unsqueeze(1)  # (B, 1, R, F)
    u = j @ m.value if m.kind == DENSE else j * m.value.unsqueeze(2)
    return u.reshape(*u.shape[:3], *value.shape[1:])


def _local(tape: Tape, plan: Plan, m: Curvature, g: dict[int, Tensor], rows: Rows, k: int):
    """J_L^T M_L J_L by the reverse Jacobian (or from the patches: NOTE [patch Jacobian] in
    ``local``) plus the curvature below L on patches (NOTE [local]): (N, K, R, D), or None when
    zero."""
    lay = plan.local_layout(tape)
    if lay is None:
        raise ValueError("the local schedule does not apply below this cut")
    patch = lay.head is not None and rows.full and m.kind != ZERO
    below, jac = local_rows(tape, lay, g, rows, k, jacobian=patch)
    if jac is not None:
        top = _join_jacobian(jac.expand(tape.n, *jac.shape[1:]), m, rows)
    else:
        top = _reverse(tape, plan.cut_step, plan.cut_slot, m, rows)
    if top is None or below is None:
        return below if top is None else top
    return top + below


def _reverse(tape: Tape, stop: int, slot: int, m: Curvature, rows: Rows) -> Tensor | None:
    """H[rows] = J[:, rows]^T M J with J = dv/dx (N, F, D) by adjoint sweeps (no curvature below
    ``slot``)."""
    if m.kind == ZERO:
        return None
    value = tape.values[slot]
    n, width = value.shape[0], value[0].numel()
    eye = torch.eye(width, dtype=value.dtype, device=value.device)
    seed = eye.reshape(1, width, *value.shape[1:])
    adj = _pull_shared(tape.steps[:stop], slot, seed, n)
    if 0 not in adj:
        return None
    jac = adj[0]
    h = _join_jacobian(jac.reshape(jac.shape[0], width, -1), m, rows)
    return h.expand(n, *h.shape[1:])


def _outer(
    tape: Tape, stop: int, slot: int, m: Curvature, g: dict[int, Tensor], rows: Rows
) -> Tensor | None:
    """H[rows] = sum over the curved steps s below ``slot`` of sum_i J_i^T C_s,i J, plus
    J_L^T M_L J_L at ``slot``: (N, K, R, D), or None when zero.

    NOTE: [outer] The second-order adjoints of tangent-adjoint are pulled back to x linearly, so
    the term a step adds at its input v_i reaches x as J_i^T times it (J_i = dv_i/dx). With the
    forward Jacobians J of every tensor (D tangents, B = 1 until the first nonlinear step), each
    curved step's term (``rule.second`` on the selected rows' tangents, (N, K, R, *s_i)) is
    contracted with J_i where it arises: K R D F_i multiply-adds, instead of K R adjoints swept
    through every step below it. Cheaper than the sweep when D is below the layer widths (PINNs,
    potentials, small tabular nets), and than Taylor's D (D + 1) / 2 extra tangents always.
    """
    like = tape.values[0]
    d = like[0].numel()
    steps = tape.steps[:stop]
    left = consumers(steps)
    eye = torch.eye(d, dtype=like.dtype, device=like.device)
    jac: dict[int, Tensor] = {0: eye.reshape(1, d, *like.shape[1:])}
    h = None
    for s in steps:
        ts = [jac.get(v) for v in s.inputs]
        if all(t is None for t in ts):
            continue
        if s.rule.curved:
            picked = [t if t is None or rows.full else t.index_select(1, rows.index) for t in ts]
            parts = _shared_elementwise(s.rule, g[s.out], picked[0], ts[0])
            if parts is None:
                terms = _terms(s.rule, g[s.out], picked)
                mirrored = rows.full and _one_output_elementwise(s.rule, g[s.out])
                parts = [_contract(term, t, mirrored) for t, term in zip(ts, terms, strict=True)
                         if t is not None and term is not None]  # fmt: skip
            for part in parts:
                h = part if h is None else h.add_(part)
        jac[s.out] = _jvp(s.rule, ts)
        release(jac, s, left, {slot})
    top = jac.get(slot)
    if m.kind == ZERO or top is None:
        return h
    n = tape.n
    top = top.reshape(top.shape[0], d, -1)  # (B, D, F_L)
    if m.kind == DIAG:  # as a curved step's term: the products keep the Jacobian's layout
        part = _diagonal_join(top, m.value.reshape(n, m.value.shape[1], -1), rows)
    elif top.shape[0] == 1:
        part = _shared_dense_join(top[0], m.value, rows)
    else:
        part = _join_jacobian(top.mT, m, rows)
    return part if h is None else h + part


def _shared_dense_join(j: Tensor, m: Tensor, rows: Rows) -> Tensor:
    """J[:, rows]^T M J (N, K, R, D) for a Jacobian J^T (D, F) the same for every sample and a
    dense M (N, K, F, F): two matrix products over all samples at once (as batched products
    with the Jacobian broadcast, hessQuik's network spent 0.34 ms in one of 0.2 M multiply-adds)."""
    n, k, f = m.shape[0], m.shape[1], m.shape[-1]
    d = j.shape[0]
    jr = j if rows.full else j.index_select(0, rows.index)  # (R, F)
    mj = (m.reshape(n * k * f, f) @ j.T).reshape(n * k, f, d)  # M J
    out = jr @ mj.transpose(0, 1).reshape(f, n * k * d)  # (R, N K D)
    return out.reshape(-1, n, k, d).permute(1, 2, 0, 3)


def _diagonal_join(t: Tensor, m: Tensor, rows: Rows) -> Tensor:
    """J[:, rows]^T diag(M) J (N, K, R, D) from J (B, D, F) and M's diagonal (N, K, F)."""
    picked = t if rows.full else t.index_select(1, rows.index)
    if m.shape[1] == 1:  # three axes: the product keeps a direction-major layout
        return _contract((picked * m).unsqueeze(1), t, rows.full)
    return _contract(outer(m, picked), t)


def _jvp(rule, ts: list[Tensor | None]) -> Tensor:
    """``rule.jvp``; an elementwise step on a Jacobian shared by the samples (1, D, *s) makes it
    direction-major: (N, D, *s) stored as (D, N, *s). Later elementwise products keep that layout
    and run over N x F contiguous elements, 3.3x faster a element than over F = 32 at a time
    with the broadcast over D in between (a PINN layer: 34 against 113 us); ``Dense`` keeps it."""
    t = ts[0]
    if isinstance(rule, Elementwise) and t.shape[0] == 1 < t.shape[1]:
        return (t.transpose(0, 1) * rule.d1.unsqueeze(0)).transpose(0, 1)
    return rule.jvp(ts)


def _shared_elementwise(rule, g: Tensor, picked: Tensor, t: Tensor) -> list[Tensor] | None:
    """An elementwise step's term where its input's Jacobian is the same for every sample (the
    first layer of an MLP): J[:, rows]^T diag(c) J = c P with P[f, (r, d)] = J[r, f] J[d, f],
    one product (N K, F) x (F, R D) instead of the (N, K, R, F) term and its contraction. None
    where that does not apply, or P would be large (D at most the samples' count, R D F at most
    2^20)."""
    if not isinstance(rule, Elementwise) or t is None or t.shape[0] != 1:
        return None
    c = rule.curvature(g)  # (N, K, *s)
    n, k, r, d = c.shape[0], c.shape[1], picked.shape[1], t.shape[1]
    f = c[0, 0].numel()
    if d > n * k or r * d * f > _PAIRS:
        return None
    pairs = (picked.reshape(r, 1, f) * t.reshape(1, d, f)).reshape(r * d, f)
    return [narrow_product(c.reshape(n * k, f), pairs.T).reshape(n, k, r, d)]


_PAIRS = 1 << 20


def _one_output_elementwise(rule, g: Tensor) -> bool:
    return isinstance(rule, Elementwise) and g.shape[1] == 1


def _terms(rule, g: Tensor, ts: list[Tensor | None]) -> list[Tensor | None]:
    """``rule.second``: (N, K, R, *s_i) per input; for one output of an elementwise step,
    (s'' g) t as (N, 1, R, *s) from a product of three-axis tensors (the four-axis broadcast of
    ``rules.outer`` ran 3-4x slower a element on the CPU)."""
    if _one_output_elementwise(rule, g):
        return [(ts[0] * rule.curvature(g)).unsqueeze(1)]
    return rule.second(g, ts)


def _contract(term: Tensor, t: Tensor, mirrored: bool = False) -> Tensor:
    """sum over the features of term (N, K, R, *s) and the Jacobian t (B, D, *s): (N, K, R, D);
    one matrix product where t is the same for every sample, else one batched product.
    ``mirrored``: term is diag(c) t on all rows, so the result is symmetric in (R, D) and the
    pairs summed one by one are summed once each (the PINN: 3 sums of its 4 pairs)."""
    n, k, r = term.shape[:3]
    d = t.shape[1]
    if t.shape[0] == 1:
        return narrow_product(term.reshape(n * k * r, -1), t.reshape(d, -1).T).reshape(n, k, r, d)
    if k == 1:
        term, t = term.reshape(n, r, -1), t.reshape(n, d, -1)
        if r * d <= _FEW and direction_major(term) and direction_major(t):
            # a product and a sum a pair on the stored layout: no copy for a batched product
            pairs: dict[tuple[int, int], Tensor] = {}
            for i in range(r):
                for j in range(d):
                    mirror = mirrored and j < i  # (j, i) is summed already
                    pairs[i, j] = pairs[j, i] if mirror else (term[:, i] * t[:, j]).sum(-1)
            return torch.stack(list(pairs.values()), -1).view(n, 1, r, d)
        return (term @ t.mT).unsqueeze(1)
    return term.reshape(n, k, r, -1) @ t.reshape(t.shape[0], 1, d, -1).mT


_FEW = 16  # (rows x D) pairs summed one by one on direction-major Jacobians (PINN: 2 x 2)


def _pull_shared(steps, slot: int, seed: Tensor, n: int) -> dict[int, Tensor]:
    """Adjoints of a seed (1, E, *s) that is the same for every sample.

    NOTE: [shared seeds] Pulled back through steps whose transpose does not depend on the sample
    (Dense, Reshape, constant Scale), the adjoint stays one (1, E, *s_x) tensor for the whole
    batch: for an MLP, J = W_1 once instead of N products I W_1 (a quarter of the MLP's
    arithmetic at D = 784), and J^T M J broadcasts it. A step whose transpose reads the sample's
    values (s'(a), a pooling's choice) broadcasts it to (N, E, ...) by itself. Where a rule
    cannot take the broadcast (a shape it fixes from the batch), the seed is expanded first.
    """
    try:
        adj = pull(steps, {slot: seed}, keep=False)
        if all(t.shape[0] in (1, n) for t in adj.values()):
            return adj
    except RuntimeError:
        pass
    return pull(steps, {slot: seed.expand(n, *seed.shape[1:])}, keep=False)


def _join_jacobian(jac: Tensor, m: Curvature, rows: Rows) -> Tensor:
    """J[:, rows]^T M J (N, K, R, D) from J (N, F, D) and M at its top."""
    jr = (jac if rows.full else jac.index_select(-1, rows.index)).mT.unsqueeze(1)  # (N, 1, R, F)
    left = jr @ m.value if m.kind == DENSE else jr * m.value.unsqueeze(2)  # (N, K, R, F)
    return left @ jac.unsqueeze(1)
