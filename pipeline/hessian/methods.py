"""Exact Hessian methods, how ``auto`` chooses among them, and the public ``hessian`` function."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import generic, piecewise, structured
from .errors import ArgumentError
from .rows import Rows, select_rows
from .rules import is_missing_forward_ad
from .support import Support, analyze, training_layers
from .targets import Target, make_target

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of working memory for one vectorized call on a CPU


def default_memory_budget(device: torch.device | str) -> int:
    """Working memory of one vectorized call: 1 GiB on a CPU, a quarter of a GPU's memory (with
    1 GiB on an H200 the tanh MLP at D=784 ran in 3 chunks of 93 samples and a D=3072 one in 6
    of 6 samples: 1.1-1.8x the time of one batched call)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return DEFAULT_MEMORY_BUDGET


# (model, x (N,*S), target, rows, memory budget in bytes or None for the device's default)
#   -> (hessian (N,K,R,D), grad (N,K,D))
# rows: a Rows, a slice, or (R,) indices (see ``rows.select_rows``).
ComputeFn = Callable[
    [nn.Module, Tensor, Target, Rows | slice | Tensor, int | None], tuple[Tensor, Tensor]
]


@dataclass(frozen=True)
class Method:
    """An exact Hessian method.

    Attributes:
        name: the value of ``method=`` that selects it.
        compute: computes a block of rows, see ``ComputeFn``.
        unsupported: (support of the model and target) -> None when the method applies, else the
            reason it does not.
    """

    name: str
    compute: ComputeFn
    unsupported: Callable[[Support], str | None]


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
        index = select_rows(rows, x.shape[1:].numel(), x.device).index
        return fn(model, x, target, index, _directions(model, x, target.n_outputs, budget))

    return compute


def _forward_over_reverse(model, x, target, rows, budget):
    """Forward over reverse; reverse over reverse where an op lacks forward-mode AD."""
    try:
        return _generic(generic.forward_over_reverse)(model, x, target, rows, budget)
    except (RuntimeError, NotImplementedError) as err:
        if not is_missing_forward_ad(err):
            raise
        log.info("forward-mode AD unavailable (%s); using reverse over reverse", err)
        return _generic(generic.reverse_over_reverse)(model, x, target, rows, budget)


def _always(_support: Support) -> None:
    return None


def _budgeted(compute: ComputeFn) -> ComputeFn:
    """``compute`` with a budget of None read as the device's default."""

    def run(model, x, target, rows, budget):
        return compute(model, x, target, rows, budget or default_memory_budget(x.device))

    return run


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("piecewise", _budgeted(piecewise.compute), lambda s: s.piecewise),
        Method("structured", _budgeted(structured.compute), lambda s: s.structured),
        Method("forward_over_reverse", _budgeted(_forward_over_reverse), _always),
        Method("reverse_over_reverse", _budgeted(_generic(generic.reverse_over_reverse)), _always),
    )
}

# Tried in order by ``auto``; the first that supports the model wins. The generic method is last.
AUTO_ORDER: list[str] = ["piecewise", "structured", "forward_over_reverse"]


def resolve_method(name: str, model: nn.Module, target: Target, x: Tensor) -> Method:
    """The method called ``name`` (or the one ``auto`` picks) for the model on inputs like x.

    When ``auto`` cannot take the graph path it logs why, in one line (a WARNING).
    """
    if name != "auto" and name not in METHODS:
        raise ArgumentError(
            f"unknown method {name!r}: choose one of {['auto', *METHODS]}", "method"
        )
    support = analyze(model, x, target)
    if name == "auto":
        for candidate in AUTO_ORDER:
            if METHODS[candidate].unsupported(support) is None:
                break
        if candidate == "forward_over_reverse":  # the graph path cannot take the model: say why
            log.warning("method=auto uses forward_over_reverse: %s", support.structured)
        return METHODS[candidate]
    method = METHODS[name]
    reason = method.unsupported(support)
    if reason is not None:
        raise ArgumentError(
            f"method {name!r} does not support this model: {reason}; use method='auto'", "method"
        )
    return method


def zero_hessian_reason(model: nn.Module, target: Target, x: Tensor) -> str | None:
    """Why the Hessians of the target are zero (almost everywhere), from the graph; None when
    they need not be."""
    support = analyze(model, x, target)
    if support.linear:
        return (
            "the selected outputs are linear in the input (no nonlinear step in the graph), so "
            "their Hessians are exactly zero"
        )
    if support.zero:
        return (
            "the network is piecewise linear (ReLU/max-pool/affine steps), so the Hessian of a "
            "logit is zero almost everywhere; use target=loss or a smooth activation (tanh, GELU)"
        )
    return None


def hessian(
    model: nn.Module,
    x: Tensor,
    outputs: Sequence[int] | Tensor | str,
    rows: slice | Tensor | Sequence[int] | None = None,
    method: str = "auto",
    *,
    labels: Tensor | None = None,
    loss: str = "cross_entropy",
    memory_budget: int | None = None,
    return_gradient: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact Hessians of selected outputs of ``model`` with respect to its input.

    H[n, k, r, :] = d^2 y_k / dx_r dx at x[n], with x flattened row-major over its shape S.

    Args:
        model: maps a batch (B, *S) to outputs (B, C). Run in eval mode for the call.
        x: inputs (N, *S), a batch (N >= 1); their dtype and device are used.
        outputs: output indices (a list), ``"all"``, ``"predicted"`` (each sample's argmax)
            or ``"loss"`` (with ``labels``).
        rows: which Hessian rows (of D = prod(S)); all by default.
        method: ``"auto"`` or a name in ``METHODS``.
        labels: (N,) class labels (or (N, C) targets for ``loss="mse"``), for ``"loss"``.
        loss: ``"cross_entropy"`` or ``"mse"``.
        memory_budget: bytes of working memory for one vectorized call (default:
            ``default_memory_budget`` of x's device).
        return_gradient: also return the gradients (N, K, D).

    Returns:
        hessian (N, K, R, D), and the gradient (N, K, D) when ``return_gradient``.

    Raises:
        ArgumentError (a ValueError): a bad argument, named in ``.argument``.

    With index outputs, rows None or a slice, and ``auto``, ``structured`` or ``piecewise``, the
    call queues its work on the device without waiting for it (no host synchronisation) once the
    model has been analysed (the first call per model, shape and target kind).
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ArgumentError(
            "x must be a batch (N, *S) of inputs; for one sample use x.unsqueeze(0)", "x"
        )
    was_training = model.training
    _set_training(model, False)
    try:
        z = _outputs(model, x)
        target = make_target(outputs, z, labels, loss)
        chosen = resolve_method(method, model, target, x)
        row_index = select_rows(rows, x.shape[1:].numel(), x.device)
        hess, grad = chosen.compute(model, x, target, row_index, memory_budget)
        reason = zero_hessian_reason(model, target, x)
    finally:
        _set_training(model, was_training)
    if was_training and training_layers(model):
        warnings.warn("model was in training mode: computed in eval mode", stacklevel=2)
    if reason:
        warnings.warn(f"all Hessian entries are zero: {reason}", stacklevel=2)
    return (hess, grad) if return_gradient else hess


def _outputs(model: nn.Module, x: Tensor) -> Tensor:
    """The model's outputs z (N, C) for x; a model that refuses x is a bad ``x``."""
    try:
        with torch.no_grad():
            return model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ArgumentError(
            f"the model fails on x of shape {tuple(x.shape)} (a batch (N, *S)): {first}", "x"
        ) from err


def _set_training(model: nn.Module, mode: bool) -> None:
    """``model.train(mode)``, tolerating modules that refuse it (``torch.export`` programs)."""
    try:
        model.train(mode)
    except NotImplementedError:
        pass
