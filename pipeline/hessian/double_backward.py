"""Hessian rows by plain ``torch.autograd`` double backward: the method of last resort.

NOTE [double backward]: ``method=autograd`` needs nothing but ``torch.autograd.grad``: no fx, no
``vmap`` of the model, no module hooks, no ``functional_call``. It is what ``auto`` ends in, so that
every model that autograd differentiates twice is served: TorchScript modules (e3nn inside MACE),
value-dependent shapes (TorchANI's neighbour list built with ``nonzero``), caches kept in modules,
in-place updates of buffers.

For a block of samples, one forward builds the graph of y_k (every sample's y_k summed: the
samples of a model whose outputs do not depend on each other share the forward) and one
``grad(..., create_graph=True)`` its gradient g = dy_k/dx (N, *S). Row r of every sample's Hessian
is then the backward of g with the seed e_r in every sample at once:
H[n, k, r, :] = d<g, e_r>/dx[n], since g[n] depends on x[n] alone. Rows go in chunks: one backward
with ``is_grads_batched=True`` (autograd ``vmap``s its own backward over the seeds) where a probe
found it to work and to give the same numbers as a single seed, else one backward per row.

Memory: the graph holds ``graph_bytes`` per sample (measured once: the tensors autograd saves in
the forward and in the first backward, weights excluded); a batched backward over c seeds holds
about c intermediate gradients of that size. Samples per forward and rows per backward are chosen
so that both fit the memory budget (``chunks``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import caches
from .memory import saved_bytes
from .rows import Rows, select_rows
from .targets import Target


@dataclass(frozen=True)
class Plan:
    """What the probe found out about a model, for inputs of one shape, dtype and device.

    Attributes:
        graph_bytes: bytes the autograd graph of one sample holds (forward and first backward).
        batched: one backward with ``is_grads_batched`` gives several rows, exactly.
        shared: samples share one forward (a sample's output does not depend on the others).
    """

    graph_bytes: int
    batched: bool
    shared: bool


_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Plan]] = caches.per_model()


def compute(
    model: nn.Module, x: Tensor, target: Target, rows, budget: int, gradient: bool = True
) -> tuple[Tensor, Tensor]:
    """Hessian rows of every sample and output by double backward through ``torch.autograd``.

    Args:
        model: maps (B, *S) to (B, C); anything autograd differentiates twice.
        x: inputs (N, *S).
        target: the K scalar functions of the output (aux first axis N).
        rows: a ``Rows``, a slice, or (R,) indices into the flattened input (D = prod(S)).
        budget: bytes of working memory (see ``chunks``).
        gradient: unused (the gradient comes free).

    Returns:
        hessian (N, K, R, D) and gradient (N, K, D), x's dtype and device.
    """
    n, d = x.shape[0], x.shape[1:].numel()
    rows = select_rows(rows, d, x.device)
    plan = _plan(model, x, target)
    samples, step = chunks(plan, n, len(rows), d * x.element_size(), budget)
    hess = x.new_zeros(n, target.n_outputs, len(rows), d)
    grad = x.new_zeros(n, target.n_outputs, d)
    for s in range(0, n, samples):  # (``samples`` is 1 where samples cannot share a forward)
        e = min(n, s + samples)
        _block(model, x[s:e], target.subset(s, e), rows, step, plan.batched, hess[s:e],
               grad[s:e])  # fmt: skip
    return hess, grad


# Graph bytes that one backward call may sweep for several seeds at once (``is_grads_batched``).
# Beyond a few tens of MB a batched backward runs slower per row than single ones (TorchANI, 8
# geometries of 24 atoms, 2.6 MB of graph each: 72 rows one at a time 1.3-1.6 s, in batches of 8
# rows 1.7-2.6 s; MACE, 18 MB each: 11.0 s against 16.5 s); below it the calls' overhead
# dominates (one sample of TorchANI: batches of 16 rows 1.3-1.8 s, one at a time 3.8-4.2 s).
BATCHED_WORK = 32 << 20


def chunks(plan: Plan, n: int, r: int, d_bytes: int, budget: int) -> tuple[int, int]:
    """(samples per forward, rows per backward) within ``budget`` bytes.

    A forward of b samples holds b * graph_bytes, a backward of c seeds over them about
    c * b * (graph_bytes + 2 * d_bytes) more (each seed's intermediate gradients, its seed and its
    row); each gets half the budget. Samples share a forward first (no ``vmap``: the seed e_r
    serves every sample of the block); rows are batched while a call sweeps less than
    ``BATCHED_WORK`` bytes.
    """
    per_direction = plan.graph_bytes + 2 * d_bytes
    samples = min(n, max(1, budget // (2 * per_direction))) if plan.shared else 1
    room = max(1, budget // (2 * per_direction * samples))
    worth = max(1, BATCHED_WORK // (per_direction * samples))
    step = min(r, room, worth) if plan.batched else 1
    return samples, step


def _block(model, x: Tensor, target: Target, rows: Rows, step: int, batched: bool,
           hess: Tensor, grad: Tensor) -> None:  # fmt: skip
    """Rows of the samples x (b, *S) into hess (b, K, R, D) and grad (b, K, D), in place."""
    b, d = x.shape[0], x.shape[1:].numel()
    xb = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = target.values(model(xb))  # (b, K)
        for k in range(y.shape[1]):
            g = _first(y[:, k], xb, retain=k + 1 < y.shape[1])
            if g is None:
                continue  # y_k does not depend on x: zero gradient and Hessian
            grad[:, k] = g.detach().reshape(b, d)
            if not g.requires_grad:
                continue  # g does not depend on x: zero Hessian
            for c in range(0, len(rows), step):
                index = rows.index[c : c + step]
                _rows(g, xb, index, batched, hess[:, k, c : c + len(index)])
            del g


def _first(y: Tensor, xb: Tensor, retain: bool) -> Tensor | None:
    """dy/dx with the graph kept for a second backward; None when y does not depend on x."""
    if not y.requires_grad:
        return None
    (g,) = torch.autograd.grad(y.sum(), xb, create_graph=True, retain_graph=retain or None,
                               allow_unused=True)  # fmt: skip
    return g


def _rows(g: Tensor, xb: Tensor, index: Tensor, batched: bool, out: Tensor) -> None:
    """Rows ``index`` (c,) of every sample's Hessian, from the gradient g (b, *S) of x (b, *S),
    into out (b, c, D)."""
    d = xb.shape[1:].numel()
    seeds = torch.zeros(len(index), d, dtype=xb.dtype, device=xb.device)
    seeds[torch.arange(len(index), device=xb.device), index] = 1
    seeds = seeds.view(len(index), 1, *xb.shape[1:]).expand(len(index), *xb.shape)
    _backward(g, xb, seeds, batched, out)


def _backward(g: Tensor, xb: Tensor, seeds: Tensor, batched: bool, out: Tensor) -> None:
    """The Hessian applied to seeds (c, b, *S) of every sample, d<g, seed>/dx, into
    out (b, c, D): one batched backward, or one backward per seed."""
    b, c, d = xb.shape[0], seeds.shape[0], xb.shape[1:].numel()
    if batched:
        (h,) = torch.autograd.grad(g, xb, seeds, retain_graph=True, is_grads_batched=True,
                                   allow_unused=True)  # fmt: skip
        if h is not None:
            out.copy_(h.reshape(c, b, d).transpose(0, 1))
        return
    for j in range(c):
        (h,) = torch.autograd.grad(g, xb, seeds[j], retain_graph=True, allow_unused=True)
        if h is not None:
            out[:, j] = h.reshape(b, d)


def _plan(model: nn.Module, x: Tensor, target: Target) -> Plan:
    key = (tuple(x.shape[1:]), x.dtype, x.device, target.kind, target.n_outputs)
    per_model = _PLANS.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _probe(model, x, target)
    return per_model[key]


def _probe(model: nn.Module, x: Tensor, target: Target) -> Plan:
    """Measure the graph of the first sample, try a batched backward on its first rows, and
    compare a sample's output alone and beside another sample."""
    x1, t1 = x[:1], target.subset(0, 1)
    xb = x1.detach().requires_grad_(True)
    with torch.enable_grad(), saved_bytes(model) as graph:
        y = t1.values(model(xb))
        g = _first(y[:, 0], xb, retain=False)
    graph_bytes = max(graph.total, x1.numel() * x1.element_size())
    _check_gradient(model, x1, t1, g)
    batched = g is not None and g.requires_grad and _batched_works(g, xb)
    return Plan(graph_bytes, batched, _independent(model, x))


@torch.no_grad()
def _check_gradient(model: nn.Module, x1: Tensor, target: Target, g: Tensor | None) -> None:
    """Refuse a forward that computes its output outside autograd's view of its input
    (``detach()``, ``.numpy()``): the gradient of output 0 in a random direction must agree with
    central differences of the outputs, else autograd's zeros would be silent and wrong.

    Raises:
        RuntimeError: they disagree by more than a few percent (then the Hessian that autograd
            gives cannot be trusted either); ``auto``'s chain says so in its one line.
    """
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(x1.shape, generator=gen, dtype=x1.dtype).to(x1.device)
    v /= v.norm()
    h = torch.finfo(x1.dtype).eps ** (1 / 3) * max(1.0, float(x1.abs().max()))
    up = target.values(model(x1 + h * v))[0, 0]
    down = target.values(model(x1 - h * v))[0, 0]
    numeric = float((up - down) / (2 * h))
    exact = 0.0 if g is None else float((g * v).sum())
    rounding = 10 * torch.finfo(x1.dtype).eps * float(up.abs() + down.abs()) / h
    if abs(exact - numeric) > 0.05 * (abs(exact) + abs(numeric)) + rounding:
        raise RuntimeError(
            f"autograd's gradient ({exact:.4g} in a random direction) disagrees with differences "
            f"of the outputs ({numeric:.4g}): autograd does not see how the output depends on the "
            "input (a detach() or .numpy() in the forward, or a wrong backward)"
        )


def _batched_works(g: Tensor, xb: Tensor) -> bool:
    """Whether one batched backward gives rows 0 and 1 as two single backwards do."""
    d = xb.shape[1:].numel()
    index = torch.arange(min(2, d), device=xb.device)
    single = xb.new_zeros(1, len(index), d)
    _rows(g, xb, index, False, single)
    batched = torch.empty_like(single)
    try:
        _rows(g, xb, index, True, batched)
    except Exception:  # noqa: BLE001 - any failure of the batched backward: one row at a time
        return False
    scale = single.abs().max()
    tol = 64 * torch.finfo(xb.dtype).eps * (scale + torch.finfo(xb.dtype).tiny)
    return bool(((batched - single).abs() <= tol).all())


@torch.no_grad()
def _independent(model: nn.Module, x: Tensor) -> bool:
    """Whether the first sample's output is the same alone and beside another sample (x[1], or
    x[0] moved a little when there is only one)."""
    other = x[1:2] if len(x) > 1 else x[:1] * 1.01 + 0.01
    alone = model(x[:1])
    together = model(torch.cat([x[:1], other]))[:1]
    scale = together.abs().max() if together.numel() else 0.0
    return alone.shape == together.shape and bool(
        ((alone - together).abs() <= 1e-4 * scale + 1e-6).all()
    )


def products(model: nn.Module, x: Tensor, target: Target) -> Callable[[Tensor], Tensor]:
    """Hessian-vector products of the samples x (n, *S) by double backward, for block Lanczos.

    The gradient graphs are built once (every output's, one forward shared by the samples where
    they may share it), and each call is one backward per output: ``apply(v)`` maps vectors
    v (n, K, b, D) to H_k v (n, K, b, D).
    """
    plan = _plan(model, x, target)
    n, k = x.shape[0], target.n_outputs
    groups = [(0, n)] if plan.shared else [(s, s + 1) for s in range(n)]
    graphs = []  # (xb, [g_k or None]) per group
    with torch.enable_grad():
        for s, e in groups:
            xb = x[s:e].detach().requires_grad_(True)
            y = target.subset(s, e).values(model(xb))
            gs = [_first(y[:, j], xb, retain=True) for j in range(k)]
            graphs.append((xb, [g if g is not None and g.requires_grad else None for g in gs]))

    def apply(v: Tensor) -> Tensor:
        out = v.new_zeros(v.shape)
        for (s, e), (xb, gs) in zip(groups, graphs, strict=True):
            for j, g in enumerate(gs):
                if g is not None:
                    seeds = v[s:e, j].transpose(0, 1).reshape(-1, e - s, *x.shape[1:])
                    _backward(g, xb, seeds, plan.batched, out[s:e, j])
        return out

    return apply
