"""Piecewise-linear bodies (ReLU, LeakyReLU, max pools, affine maps) under a smooth head.

Such a body is affine on each linear region, so below the lowest cut of the graph above which all
curvature lies (the logits under a ``log_softmax``, or the output for a loss) the Hessian is

    H = J^T A J,    J = dv/dx (F, D),  A = d^2 y / dv^2 (F, F),

F adjoint sweeps and one product instead of D Hessian-vector products; zero for the logits of a
network without a smooth step. It is the graph engine (``structured``) restricted to the
reverse-Jacobian schedule.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import structured
from .planner import REVERSE
from .rows import Rows
from .targets import Target


def compute(
    model: nn.Module, x: Tensor, target: Target, rows: Rows | Tensor, memory_budget: int
) -> tuple[Tensor, Tensor]:
    """Hessian rows (N, K, R, D) and gradients (N, K, D); see ``structured.compute``."""
    return structured.compute(model, x, target, rows, memory_budget, (REVERSE,))
