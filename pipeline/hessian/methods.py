"""Exact Hessian methods, how ``auto`` chooses among them, and the public ``hessian`` function."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import PipelineError
from . import generic
from .structure import is_piecewise_linear, training_layers
from .targets import Target, make_target

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of working memory for one vectorized call

# (model, x (N,*S), target, rows (R,), memory budget in bytes) -> (hessian (N,K,R,D), grad (N,K,D))
ComputeFn = Callable[[nn.Module, Tensor, Target, Tensor, int], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Method:
    """An exact Hessian method.

    Attributes:
        name: the value of ``method=`` that selects it.
        compute: computes a block of rows, see ``ComputeFn``.
        unsupported: (model, target) -> None when the method applies, else the reason it does not.
    """

    name: str
    compute: ComputeFn
    unsupported: Callable[[nn.Module, Target], str | None]


def _directions(model: nn.Module, x: Tensor, k: int, budget: int) -> int:
    """How many (sample, row) directions fit into ``budget`` bytes for the generic methods."""
    act = [0]

    def hook(_m, _i, out):
        if isinstance(out, Tensor):
            act[0] += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    d_bytes = x[0].numel() * x.element_size()
    per_direction = 6 * k * max(act[0], d_bytes) + 2 * k * d_bytes
    return max(1, budget // per_direction)


def _generic(fn) -> ComputeFn:
    def compute(model, x, target, rows, budget):
        return fn(model, x, target, rows, _directions(model, x, target.n_outputs, budget))

    return compute


def _forward_over_reverse(model, x, target, rows, budget):
    """Forward over reverse; reverse over reverse where an op lacks forward-mode AD."""
    try:
        return _generic(generic.forward_over_reverse)(model, x, target, rows, budget)
    except (RuntimeError, NotImplementedError) as err:
        if not generic.is_missing_forward_ad(err):
            raise
        log.info("forward-mode AD unavailable (%s); using reverse over reverse", err)
        return _generic(generic.reverse_over_reverse)(model, x, target, rows, budget)


def _always(_model, _target):
    return None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("forward_over_reverse", _forward_over_reverse, _always),
        Method("reverse_over_reverse", _generic(generic.reverse_over_reverse), _always),
    )
}

# Tried in order by ``auto``; the first that supports the model wins. The generic method is last.
AUTO_ORDER: list[str] = ["forward_over_reverse"]


def register(method: Method, auto_rank: int | None = None) -> None:
    """Add a method; with ``auto_rank`` it is also tried by ``auto`` at that position."""
    METHODS[method.name] = method
    if auto_rank is not None and method.name not in AUTO_ORDER:
        AUTO_ORDER.insert(auto_rank, method.name)


def resolve_method(name: str, model: nn.Module, target: Target) -> Method:
    """The method called ``name`` (or the one ``auto`` picks), checked against the model."""
    if name == "auto":
        for candidate in AUTO_ORDER:
            if METHODS[candidate].unsupported(model, target) is None:
                return METHODS[candidate]
    if name not in METHODS:
        raise PipelineError(
            f"unknown method {name!r}: choose one of {['auto', *METHODS]}", "method.name"
        )
    method = METHODS[name]
    reason = method.unsupported(model, target)
    if reason is not None:
        raise PipelineError(
            f"method {name!r} does not support this model: {reason}; use method=auto",
            "method.name",
        )
    return method


def zero_hessian_reason(model: nn.Module, target: Target) -> str | None:
    """Why logit Hessians of this model are zero almost everywhere, or None if they need not be."""
    if target.kind == "index" and is_piecewise_linear(model):
        return (
            "the network is piecewise linear (ReLU/max-pool/affine layers), so the Hessian of a "
            "logit is zero almost everywhere; use target=loss or a smooth activation (tanh, GELU)"
        )
    return None


def _nonzero_somewhere(hess: Tensor) -> bool:
    """A cheap look at one row of each (sample, output): enough to skip a full scan."""
    return bool(torch.any(hess[..., 0, :]))


def explain_zeros(model: nn.Module, target: Target, hess: Tensor) -> None:
    """Warn when a computed Hessian is exactly zero, saying why."""
    if hess.numel() == 0 or _nonzero_somewhere(hess):
        return
    if not torch.any(hess):
        reason = zero_hessian_reason(model, target) or (
            "the selected outputs are linear in the input (or do not depend on it), "
            "so their Hessians are exactly zero"
        )
        warnings.warn(f"all Hessian entries are zero: {reason}", stacklevel=3)


def hessian(
    model: nn.Module,
    x: Tensor,
    outputs: Sequence[int] | Tensor | str,
    rows: slice | Tensor | Sequence[int] | None = None,
    method: str = "auto",
    *,
    labels: Tensor | None = None,
    loss: str = "cross_entropy",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    return_gradient: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact Hessians of selected outputs of ``model`` with respect to its input.

    H[n, k, r, :] = d^2 y_k / dx_r dx at x[n], with x flattened row-major over its shape S.

    Args:
        model: maps a batch (B, *S) to outputs (B, C). Run in eval mode for the call.
        x: inputs (N, *S); their dtype and device are used.
        outputs: output indices (a list), ``"all"``, ``"predicted"`` (each sample's argmax)
            or ``"loss"`` (with ``labels``).
        rows: which Hessian rows (of D = prod(S)); all by default.
        method: ``"auto"`` or a name in ``METHODS``.
        labels: (N,) class labels (or (N, C) targets for ``loss="mse"``), for ``"loss"``.
        loss: ``"cross_entropy"`` or ``"mse"``.
        memory_budget: bytes of working memory for one vectorized call.
        return_gradient: also return the gradients (N, K, D).

    Returns:
        hessian (N, K, R, D), and the gradient (N, K, D) when ``return_gradient``.
    """
    was_training = model.training
    _set_training(model, False)
    try:
        with torch.no_grad():
            z = model(x)
        target = make_target(outputs, z, labels, loss)
        chosen = resolve_method(method, model, target)
        row_index = select_rows(rows, x[0].numel(), x.device)
        hess, grad = chosen.compute(model, x, target, row_index, memory_budget)
    finally:
        _set_training(model, was_training)
    if was_training and training_layers(model):
        warnings.warn("model was in training mode: computed in eval mode", stacklevel=2)
    explain_zeros(model, target, hess)
    return (hess, grad) if return_gradient else hess


def _set_training(model: nn.Module, mode: bool) -> None:
    """``model.train(mode)``, tolerating modules that refuse it (``torch.export`` programs)."""
    try:
        model.train(mode)
    except NotImplementedError:
        pass


def select_rows(rows, dim: int, device) -> Tensor:
    """(R,) long row indices from None (all), a slice, or a sequence/tensor of indices."""
    if rows is None:
        return torch.arange(dim, device=device)
    if isinstance(rows, slice):
        return torch.arange(dim, device=device)[rows]
    idx = torch.as_tensor(rows, dtype=torch.long, device=device).reshape(-1)
    if idx.numel() and (idx.min() < -dim or idx.max() >= dim):
        raise PipelineError(f"row index out of range for D = {dim}", "rows")
    return idx % dim


# Specialised exact methods, tried by ``auto`` before the generic one (registered last so that
# they can import the helpers above without a cycle).
from . import piecewise, structured  # noqa: E402

register(Method("piecewise", piecewise.compute, piecewise.unsupported), auto_rank=0)
register(Method("structured", structured.compute, structured.unsupported), auto_rank=1)
