"""Forward Taylor propagation: value, Jacobian and Hessian of every tensor, from x up.

For small inputs (D below the layer widths: PINNs on (x, t), potentials, tabular nets) the whole
second-order expansion of each tensor v (N, *f) with respect to x can be carried forward in one
batched pass over the samples:

    J_v = dv/dx  (N, D, *f),    H_v = d^2 v / dx^2  (N, P, *f),

with H stored as its upper triangle, P = D (D + 1) / 2 pairs (i <= j), in the order of
``torch.triu_indices``. The two are kept in one tensor T_v = [J_v; H_v] of shape (B, D + P, *f)
(NOTE [layout] in ``rules``: the directions sit on axis 1), or T_v = J_v (B, D, *f) while H_v is
still zero (below the first step with a second-order term); B = 1 while T_v is the same for
every sample (below the first nonlinear step).

Per step y = f(v_1, ..., v_m), with its rule's closed-form derivatives:

* linear f (Dense, Fold, Reshape, Scale, Add, a max pool's selection): J and H map alike,
  T_y = f'(T_v), so one ``rule.jvp`` over the D + P directions;
* elementwise s (``elementwise.DERIVATIVES``): J_y = s'(a) J, H_y = s'(a) H + s''(a) J_i J_j;
* product a * b: T_y = b T_a + a T_b (the linear part), plus J_a,i J_b,j + J_b,i J_a,j in H;
* LayerNorm: the linear part by ``rule.jvp``, plus the second directional derivative of the
  normalization in the pairs of Jacobian columns (``_layer_norm``).

Any other rule (softmax, a ``General`` step, bilinear products) has no forward second-order rule
here: ``supports`` says so and the planner then never picks this schedule.

At the output z (N, C), for K scalars y_k(z) with gradient g = dy/dz (N, K, C) and Hessian A:

    dy/dx = J_z g,    d^2 y / dx^2 = sum_c g_c H_z,c + J_z A J_z^T,

so the gradient comes with the Hessian and no backward pass is needed. Cost: (D + P) tangents
through every step against R forward tangents and K R second-order adjoints for tangent-adjoint,
and no F x F matrix at any tensor against M-propagation; the planner counts it (``cost``).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from .curvature import DENSE, DIAG, ZERO, Curvature
from .graph import Tape, consumers, release
from .rules import ELEMENTWISE_MACS, Dense, Elementwise, LayerNorm, Product, Rule, Select


def pairs(d: int) -> int:
    """P = D (D + 1) / 2: the entries of the upper triangle of a D x D matrix."""
    return d * (d + 1) // 2


@cache
def _triangle(d: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(i, j) of each pair i <= j (P,), and the pair of each entry of the D x D matrix (D * D,)."""
    iu, ju = torch.triu_indices(d, d, device=device)
    where = torch.empty(d, d, dtype=torch.long, device=device)
    where[iu, ju] = torch.arange(len(iu), device=device)
    where[ju, iu] = where[iu, ju]
    return iu, ju, where.reshape(-1)


def taylor_rule(rule: Rule) -> str | None:
    """How a step propagates (J, H): ``linear``, ``elementwise``, ``product``, ``layer_norm``, or
    None where there is no forward second-order rule (then the schedule does not apply)."""
    if isinstance(rule, Elementwise):
        return "elementwise"
    if isinstance(rule, Product):
        return "product"
    if isinstance(rule, LayerNorm):
        return "layer_norm"
    if rule.kind == "linear" or isinstance(rule, Select):
        return "linear"
    return None


def supports(tape: Tape) -> bool:
    """Whether every step of the graph has a forward Taylor rule."""
    return all(taylor_rule(step.rule) is not None for step in tape.steps)


def cost(tape: Tape, k: int, kind: str, samples: int) -> int:
    """Multiply-adds per sample of the forward Taylor pass and of the join with the target's
    K outputs (A of ``kind``), in the units of ``planner``: a step costs ``rule.macs`` per
    direction (D, or D + P where H is nonzero), and each element an elementwise step or a
    product writes into H costs ``ELEMENTWISE_MACS``. Steps whose directions are the same for
    every sample (below the first nonlinear step) are shared by the ``samples`` of a call."""
    d = tape.width(0)
    p = pairs(d)
    curved: dict[int, bool] = {0: False}  # slot -> whether its H is nonzero
    varies: dict[int, bool] = {0: False}  # slot -> whether its T differs between samples
    total = 0
    for step in tape.steps:
        how, rule = taylor_rule(step.rule), step.rule
        h_in = any(curved.get(v, False) for v in step.inputs)
        per_sample = any(varies.get(v, False) for v in step.inputs) or how != "linear"
        work = (d + (p if h_in else 0)) * rule.macs
        f = rule.f_out * ELEMENTWISE_MACS
        if how == "elementwise" and rule.curved:
            work += (d + p) * f  # s'' J, then H += (s'' J_i) J_j
        elif how == "product":
            work += 2 * p * f
        elif how == "layer_norm":
            work += 8 * p * f
        total += work if per_sample else -(-work // samples)
        curved[step.out] = h_in or (rule.curved and how != "linear")
        varies[step.out] = per_sample
    c = tape.width(tape.output)
    total += k * (d + p) * c + k * d * d  # J g, H g, and unpacking the triangle
    if kind == DIAG:
        total += k * d * c * (d + 1)
    elif kind == DENSE:
        total += k * d * c * (c + d)
    return total


def bytes_per_sample(tape: Tape) -> int:
    """Peak memory of one sample's T tensors (all D + P directions at every live slot) and the
    recorded values."""
    e = tape.width(0) + pairs(tape.width(0))
    left = consumers(tape.steps)
    live = {0: tape.width(0)}
    peak = 0
    for step in tape.steps:
        live[step.out] = tape.width(step.out)
        peak = max(peak, sum(live.values()))
        for v in step.inputs:
            left[v] -= 1
            if left[v] == 0 and v != tape.output:
                live.pop(v, None)
    values = sum(tape.width(s.out) for s in tape.steps)
    return (3 * e * peak + 4 * values) * tape.values[0].element_size()


@torch.no_grad()
def propagate(tape: Tape) -> Tensor:
    """T_z = [J_z; H_z] at the output: (B, D + P, *s_z), or (B, D, *s_z) where H_z is zero."""
    x = tape.values[0]
    d = x[0].numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device).reshape(1, d, *x.shape[1:])
    t: dict[int, Tensor] = {0: eye}
    left = consumers(tape.steps)
    owned: set[int] = set()  # slots whose T this pass allocated (no view of another slot's)
    for step in tape.steps:
        ins = [t.get(v) for v in step.inputs]
        if any(i is not None for i in ins):
            v = step.inputs[0]
            reuse = v in owned and left[v] == 1 and v != tape.output
            t[step.out] = _step(step.rule, _same_width(ins, d), d, reuse)
            if taylor_rule(step.rule) != "linear" or isinstance(step.rule, Dense):
                owned.add(step.out)
        release(t, step, left, {tape.output})
    if tape.output not in t:  # the output does not depend on x
        return x.new_zeros(1, d, *tape.values[tape.output].shape[1:])
    return t[tape.output]


def _step(rule: Rule, ins: list[Tensor | None], d: int, reuse: bool = False) -> Tensor:
    """T of a step's output from its inputs' (None: zero); ``reuse``: the first input's T is
    read by this step only and may be overwritten."""
    how = taylor_rule(rule)
    if how == "elementwise":
        return _elementwise(rule, ins[0], d, reuse)
    if how == "product":
        return _product(rule, ins, d)
    if how == "layer_norm":
        return _layer_norm(rule, ins[0], d)
    if how == "linear":
        return rule.jvp(ins)
    raise ValueError(f"no forward Taylor rule for {type(rule).__name__}")


def _same_width(ins: list[Tensor | None], d: int) -> list[Tensor | None]:
    """The inputs' T with one width: a zero H appended where some input has an H and another
    not (a residual connection around a nonlinear branch)."""
    e = max(t.shape[1] for t in ins if t is not None)
    return [t if t is None or t.shape[1] == e else _widened(t, e) for t in ins]


def _widened(t: Tensor, e: int) -> Tensor:
    """T (B, E', *f) as (B, E, *f), the new directions zero."""
    return torch.cat([t, t.new_zeros(t.shape[0], e - t.shape[1], *t.shape[2:])], 1)


def _with_h(lin: Tensor, n: int, d: int) -> Tensor:
    """``lin`` (B, D or D + P, *f) as a new tensor (N, D + P, *f) whose H part may be written:
    the H part left uninitialized where ``lin`` has none (the caller writes every pair)."""
    if lin.shape[1] > d and lin.shape[0] == n:
        return lin
    out = lin.new_empty(n, d + pairs(d), *lin.shape[2:])
    out[:, : lin.shape[1]] = lin
    return out


def _outer_into(h: Tensor, a: Tensor, b: Tensor, add: bool) -> None:
    """h[(i, j)] (+)= a_i b_j over the pairs i <= j, in place: h (N, P, *f), a and b (B, D, *f).

    One broadcast product per i (rows i..D-1 of the triangle are contiguous in the packed
    order), never a gather: ``index_select`` along the direction axis was 4x slower."""
    d, at = a.shape[1], 0
    for i in range(d):
        piece = h.narrow(1, at, d - i)
        if add:
            piece.addcmul_(a.narrow(1, i, 1), b.narrow(1, i, d - i))
        elif max(a.shape[0], b.shape[0]) == h.shape[0]:
            torch.mul(a.narrow(1, i, 1), b.narrow(1, i, d - i), out=piece)
        else:  # a and b the same for every sample
            piece.copy_(a.narrow(1, i, 1) * b.narrow(1, i, d - i))
        at += d - i


def _elementwise(rule: Elementwise, t: Tensor, d: int, reuse: bool = False) -> Tensor:
    """J_y = s' J, H_y = s' H + s'' J_i J_j; in place where ``t`` may be overwritten (one
    allocation of the size of T fewer: on the 2-core VM each costs its page faults)."""
    d1 = rule.d1.unsqueeze(1)
    n = rule.d1.shape[0]
    reuse = reuse and t.shape[0] == n
    if not rule.curved:
        return t.mul_(d1) if reuse else d1 * t
    j = t[:, :d]
    curved = t.shape[1] > d
    if reuse and curved:  # H first: the pairs read J before it is scaled
        t[:, d:].mul_(d1)
        _outer_into(t[:, d:], rule.d2.unsqueeze(1) * j, j, add=True)
        j.mul_(d1)
        return t
    out = t.new_empty(n, d + pairs(d), *t.shape[2:])
    torch.mul(d1, t, out=out if curved else out[:, :d])
    _outer_into(out[:, d:], rule.d2.unsqueeze(1) * j, j, add=curved)
    return out


def _product(rule: Product, ins: list[Tensor | None], d: int) -> Tensor:
    """y = a * b: T_y = b T_a + a T_b, plus J_a,i J_b,j + J_b,i J_a,j in H."""
    lin = rule.jvp(ins)
    ta, tb = ins
    if ta is None or tb is None:
        return lin
    curved = lin.shape[1] > d
    out = _with_h(lin, max(rule.a.shape[0], rule.b.shape[0]), d)
    ja, jb = ta[:, :d], tb[:, :d]
    if ta is tb:
        _outer_into(out[:, d:], 2 * ja, ja, add=curved)
    else:
        _outer_into(out[:, d:], ja, jb, add=curved)
        _outer_into(out[:, d:], jb, ja, add=True)
    return out


def _layer_norm(rule: LayerNorm, t: Tensor, d: int) -> Tensor:
    """y = gamma x^ + beta, x^ = (v - mean) / sigma over each group of E elements: the linear
    part by the rule, and in H the second derivative of x^ in each pair of Jacobian columns.

    With c_i = t_i - mean(t_i), a_i = <x^, c_i> / E, x_i = d x^ [t_i] = (c_i - x^ a_i) / sigma
    and d sigma [t_i] = a_i:
        d^2 x^ [t_i, t_j] = -(a_j x_i + a_i x_j + x^ (<c_i, c_j> / E - a_i a_j) / sigma) / sigma.
    """
    mean, inv = rule._mean, rule.inv.unsqueeze(1)  # inv: (N, 1, *lead, 1, ...)
    xhat = rule.xhat.unsqueeze(1)
    j = t[:, :d]
    c = j - mean(j)  # (B, D, *s)
    a = mean(xhat * c)  # (N, D, *lead, 1, ...)
    x = (c - xhat * a) * inv
    n, p = rule.xhat.shape[0], pairs(d)
    cc = c.new_empty(c.shape[0], p, *c.shape[2:])
    _outer_into(cc, c, c, add=False)
    scalar = a.new_empty(n, p, *a.shape[2:])
    scalar.copy_(mean(cc))
    _outer_into(scalar, a, -a, add=True)  # <c_i, c_j> / E - a_i a_j
    second = xhat * (scalar * inv)  # (N, P, *s)
    _outer_into(second, a, x, add=True)
    _outer_into(second, x, a, add=True)
    second = second * (-inv if rule.weight is None else -inv * rule.weight)
    out = _with_h(rule.jvp([t]), n, d)
    if t.shape[1] > d:
        out[:, d:] += second
    else:
        out[:, d:] = second
    return out


@torch.no_grad()
def join(t_z: Tensor, d: int, g: Tensor, head: Curvature) -> tuple[Tensor, Tensor]:
    """Hessians (N, K, D, D) and gradients (N, K, D) of the K outputs from T_z (B, E, *s_z) and
    the target's g (N, K, C) and A."""
    n, k = g.shape[:2]
    t_z = t_z.reshape(t_z.shape[0], t_z.shape[1], -1).expand(n, -1, -1)  # (N, E, C)
    jac = t_z[:, :d]
    grad = g @ jac.mT  # (N, K, D)
    if t_z.shape[1] > d:
        _, _, where = _triangle(d, g.device)
        packed = g @ t_z[:, d:].mT  # (N, K, P)
        out = packed.index_select(-1, where).reshape(n, k, d, d)
    else:
        out = g.new_zeros(n, k, d, d)
    if head.kind == DIAG:
        out = out + (jac.unsqueeze(1) * head.value.unsqueeze(2)) @ jac.mT.unsqueeze(1)
    elif head.kind == DENSE:
        out = out + jac.unsqueeze(1) @ head.value @ jac.mT.unsqueeze(1)
    elif head.kind != ZERO:
        raise ValueError(f"unknown curvature kind {head.kind}")
    return out, grad
