"""Input Hessians in the factored form H_k = J^T A_k J, where that form is exact.

A piecewise-linear body (ReLU, LeakyReLU, max pools, affine maps) is affine on each linear
region, so for a smooth head y_k = l_k(z) on top of it (a loss on the logits, a ``log_softmax``)
the chain rule has no second-order term below the head:

    H_k = J^T A_k J,    J = dz/dx (C, D),    A_k = d^2 y_k / dz^2 (C, C),

exact wherever x is not on a kink (almost everywhere), with z the cut below all curvature: the
highest tensor of the graph that every path from x to the output passes through and below which
no step has a second-order term (the model's output for a loss target; the logits under a
``log_softmax`` inside the model). J is computed by C adjoint sweeps of the graph engine (the
``piecewise`` method's reverse Jacobian) and A_k by carrying the head's Hessian down to the cut
(``propagate``); the product J^T A_k J, D x D, is never formed. Storage: C (D + K C) numbers a
sample instead of K D^2.

A body with curvature inside (tanh, GELU, ...) has no such form with J the logits' Jacobian:
``factored`` refuses it, with the reason, as it does a model the graph engine cannot capture.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import caches
from .allocator import reusing_large_buffers
from .curvature import DENSE, DIAG
from .diagonal import _rows_of_jacobian, eval_mode
from .errors import ArgumentError
from .graph import Tape, capture, record
from .methods import default_memory_budget
from .ops import Unsupported
from .planner import segments
from .propagate import _segment, gradients
from .support import analyze
from .targets import Target


@reusing_large_buffers
def factored(
    model: nn.Module, x: Tensor, target: Target, budget: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """J, A_k and the gradients, with H_k = J^T A_k J exactly at each sample.

    Args:
        model: maps (B, *S) to (B, C_out); used in eval mode for the call. Its body must be
            piecewise linear below a smooth head (module doc).
        x: inputs (N, *S); target: the K scalar functions of the output (``make_target``).
        budget: bytes of working memory (default: ``default_memory_budget`` of x's device);
            samples are processed in chunks that fit it.

    Returns:
        jacobian (N, C, D): dz/dx of the C features at the cut (the logits);
        curvature (N, K, C, C): A_k = d^2 y_k / dz^2, symmetric (zero for logits by index on a
        network without a smooth step);
        grad (N, K, D): dy_k/dx. x's dtype and device.

    Raises:
        ArgumentError (``model``): the model has curvature inside its body, or the graph engine
            cannot capture it.
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ArgumentError("x must be a batch (N, *S) of inputs", "x")
    caches.check(model)
    budget = budget or default_memory_budget(x.device)
    with eval_mode(model), torch.no_grad():
        gm = _check(model, x, target)
        tape = record(gm, x[:1])
        cut, stop, slot = _cut(tape)
        n, d, k = x.shape[0], tape.width(0), target.n_outputs
        c = tape.width(slot)
        below = sum(tape.width(s.out) for s in tape.steps[:stop]) + d
        total = sum(tape.width(s.out) for s in tape.steps) + d
        per_sample = (2 * c * below + 3 * k * c * c + (k + 2) * total) * x.element_size()
        step = max(1, budget // per_sample)
        jac, curv, grad = x.new_zeros(n, c, d), x.new_zeros(n, k, c, c), x.new_zeros(n, k, d)
        eye = torch.eye(c, dtype=x.dtype, device=x.device).unsqueeze(0)
        for s in range(0, n, step):
            tape = record(gm, x[s : s + step])
            b = tape.n
            g_top, head = target.subset(s, s + b).derivatives(tape.values[tape.output])
            g = gradients(tape, g_top)
            if 0 in g:
                grad[s : s + b] = g[0].reshape(b, k, d)
            m = head
            for seg in reversed(segments(tape)[cut:]):
                m = _segment(tape, seg, m, g)
            if m.kind == DENSE:
                curv[s : s + b] = m.value
            elif m.kind == DIAG:
                curv[s : s + b] = torch.diag_embed(m.value)
            j = _rows_of_jacobian(tape, stop, slot, eye)
            if j is not None:
                jac[s : s + b] = j
        return jac, curv, grad


def _check(model: nn.Module, x: Tensor, target: Target):
    """The captured graph, or ``ArgumentError`` saying why there is no exact J^T A J form."""
    support = analyze(model, x, target)
    if support.structured is not None:
        raise ArgumentError(
            f"factored: no exact J^T A J form can be established: the graph engine cannot "
            f"take the model ({support.structured})",
            "model",
        )
    gm = capture(model)
    try:
        tape = record(gm, x[:1])
    except Unsupported as err:  # analyze recorded it on two samples; one should not differ
        raise ArgumentError(f"factored: the graph cannot be recorded ({err})", "model") from err
    curved = [_describe(s) for s in tape.steps if s.rule.curved]
    if support.piecewise is not None and curved:
        raise ArgumentError(
            f"factored: no exact J^T A J form with J the logits' Jacobian: step {curved[0]} has "
            f"a second-order term inside the body ({support.piecewise}); use the dense, "
            "diagonal or eigen output",
            "model",
        )
    return gm


def _describe(step) -> str:
    """A step as ``name (op)``, e.g. ``_1 (tanh)``."""
    op = getattr(step.rule, "name", "") or type(step.rule).__name__
    return f"{step.name} ({op})"


def _cut(tape: Tape) -> tuple[int, int, int]:
    """The highest cut with no curved step below it: (segment index, first step above, slot)."""
    segs = segments(tape)
    curved = [s.rule.curved for s in tape.steps]
    for cut in range(len(segs), -1, -1):
        stop = segs[cut].start if cut < len(segs) else len(tape.steps)
        if not any(curved[:stop]):
            slot = segs[cut].bottom if cut < len(segs) else tape.output
            if slot == 0:
                break
            return cut, stop, slot
    raise ArgumentError(
        "factored: the only cut below all curvature is the input itself (J would be the "
        "identity and A the dense Hessian)",
        "model",
    )


__all__ = ["factored"]
