"""Exact Hessian methods, how ``auto`` chooses among them, and the public ``hessian`` function."""

from __future__ import annotations

import logging
import math
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import caches, double_backward, generic, piecewise, structured
from .allocator import CALLER, reusing_large_buffers
from .errors import ArgumentError
from .memory import forward_bytes
from .replay import replayed
from .rows import select_rows
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


# (model, x (N,*S), target, rows, memory budget in bytes or None for the device's default,
#  *, gradient=True) -> (hessian (N,K,R,D), grad (N,K,D))
# rows: a Rows, a slice, or (R,) indices (see ``rows.select_rows``). ``gradient=False``: the
# caller does not use the gradients, and a replayed call returns None for them (its trace then
# leaves them out: a PINN call at 4096 points 2.88 against 3.02 ms).
ComputeFn = Callable[..., tuple[Tensor, Tensor | None]]


@dataclass(frozen=True)
class Method:
    """An exact Hessian method.

    Attributes:
        name: the value of ``method=`` that selects it.
        compute: computes a block of rows, see ``ComputeFn``.
        unsupported: (support of the model and target) -> None when the method applies, else the
            reason it does not.
        probe_all_up_to: ``auto``'s probe computes all rows of the first sample up to this D,
            else 8 (0: 2 rows whatever D, for a method whose whole probe would cost a call).
    """

    name: str
    compute: ComputeFn
    unsupported: Callable[[Support], str | None]
    probe_all_up_to: int = 1024


def _directions(model: nn.Module, x: Tensor, k: int, budget: int) -> int:
    """How many (sample, row) directions fit into ``budget`` bytes for the generic methods: each
    holds about 6 copies of what autograd saves in one sample's forward (no module hooks:
    ScriptModules refuse them)."""
    act = forward_bytes(model, x[:1])
    d_bytes = x[0].numel() * x.element_size()
    per_direction = 6 * k * max(act, d_bytes) + 2 * k * d_bytes
    return max(1, budget // per_direction)


def _generic(fn) -> ComputeFn:
    def compute(model, x, target, rows, budget, gradient=True):
        index = select_rows(rows, x.shape[1:].numel(), x.device).index
        return fn(model, x, target, index, _directions(model, x, target.n_outputs, budget))

    return compute


def _always(_support: Support) -> None:
    return None


def _transformable(support: Support) -> str | None:
    return support.transformable


def _budgeted(compute: ComputeFn) -> ComputeFn:
    """``compute`` with a budget of None read as the device's default."""

    def run(model, x, target, rows, budget, gradient=True):
        budget = budget or default_memory_budget(x.device)
        return compute(model, x, target, rows, budget, gradient=gradient)

    return run


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("piecewise", _budgeted(replayed(piecewise.compute)), lambda s: s.piecewise),
        Method("structured", _budgeted(replayed(structured.compute)), lambda s: s.structured),
        Method(
            "forward_over_reverse",
            _budgeted(_generic(generic.forward_over_reverse)),
            _transformable,
        ),
        Method(
            "reverse_over_reverse",
            _budgeted(_generic(generic.reverse_over_reverse)),
            _transformable,
        ),
        Method("autograd", _budgeted(double_backward.compute), _always, probe_all_up_to=0),
    )
}

# ``auto``'s chain: the first graph method that supports the model (by its captured graph), then
# the generic ones, then plain autograd (NOTE [double backward]), which needs nothing of the model
# but that autograd differentiates it twice. Each is tried on a probe (one sample, a few rows)
# before it is used; a method that fails there, or on a later call, hands over to the next, and
# ``Choice.note`` says so in one line.
GRAPH_ORDER: list[str] = ["piecewise", "structured"]
GENERIC_ORDER: list[str] = ["forward_over_reverse", "reverse_over_reverse"]
LAST = "autograd"


@dataclass(frozen=True)
class Choice:
    """The method a call uses, and why the methods before it in ``auto``'s chain were not used.

    Attributes:
        method: the method.
        passed_over: one phrase per method passed over, ``"structured: <why>"``.
        after: the methods that may take over if this one fails on a real block.
    """

    method: Method
    passed_over: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    requested: str = "auto"

    @property
    def name(self) -> str:
        return self.method.name

    def compute(self, model, x, target, rows, budget, gradient=True) -> tuple[Tensor, Tensor]:
        """The method's rows (``ComputeFn``), handed over along ``after`` where it fails on this
        call although it passed the probe (``compute_rows``)."""
        return compute_rows(self.name, self.after, self.requested, model, x, target, rows,
                            budget, gradient)  # fmt: skip

    @property
    def note(self) -> str | None:
        """One line for the user where the first method asked for was not used, else None."""
        if not self.passed_over:
            return None
        return f"method={self.requested} uses {self.name}: " + "; ".join(self.passed_over)


_CHOICES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Choice]] = caches.per_model()


def choose_method(
    name: str, model: nn.Module, target: Target, x: Tensor, checked: bool = False
) -> Choice:
    """The method called ``name``, or the one ``auto`` picks for the model on inputs like x.

    ``auto`` walks its chain (graph path, forward over reverse, reverse over reverse, autograd)
    and takes the first method that supports the model and computes a probe (the first sample, a
    few rows) without an error; ``forward_over_reverse`` hands over to reverse over reverse the
    same way (ops without forward-mode AD); ``autograd`` is probed too (it refuses a forward
    whose gradient disagrees with differences of its outputs). Cached per model, input shape,
    dtype, device and target kind; where ``auto`` passed a method over, ``Choice.note`` is logged
    (a WARNING) when the choice is made, not again on later calls.

    Raises:
        ArgumentError: an unknown name; a named method that does not support the model; no
            method in the chain can differentiate the model (naming each method's error).
    """
    if name != "auto" and name not in METHODS:
        raise ArgumentError(
            f"unknown method {name!r}: choose one of {['auto', *METHODS]}", "method"
        )
    if not checked:  # (``checked``: the caller ran ``caches.check`` for this call already)
        caches.check(model)
    support = analyze(model, x, target)
    if name != "auto":
        reason = METHODS[name].unsupported(support)
        if reason is not None:
            raise ArgumentError(
                f"method {name!r} does not support this model: {reason}; use method='auto'",
                "method",
            )
        if name not in ("forward_over_reverse", LAST):  # (these two are probed: see below)
            return Choice(METHODS[name], requested=name)
    key = (name, tuple(x.shape[1:]), x.dtype, x.device, target.kind, target.n_outputs)
    per_model = _CHOICES.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _walk_chain(name, model, x, target, support)
        if per_model[key].note:  # said once per model and key, not on every call
            log.warning(per_model[key].note)
    return per_model[key]


def _walk_chain(name: str, model: nn.Module, x: Tensor, target: Target, support) -> Choice:
    passed: list[str] = []
    chain = [LAST] if name == LAST else list(GENERIC_ORDER)
    if name == "auto" and support.transformable:
        passed.append(f"{support.transformable} (not the graph path, {', '.join(chain)})")
        chain = [LAST]
    elif name == "auto":
        graph = [m for m in GRAPH_ORDER if METHODS[m].unsupported(support) is None][:1]
        if not graph:
            passed.append(f"the graph path cannot take the model: {support.structured}")
        dearer = graph == ["structured"] and _dearer_than_generic(model, x, target)
        if dearer:  # NOTE [never slower]: the generic method first, the graph path after it
            passed.append(dearer)
            chain = chain[:1] + graph + chain[1:]
        else:
            chain = graph + chain
        chain += [LAST]
    for i, candidate in enumerate(chain):
        failure = _probe(METHODS[candidate], model, x, target)
        if failure is None:
            if name == "auto" and chain[i : i + 2] == GENERIC_ORDER:
                faster = _faster_second(model, x, target)
                if faster:  # NOTE [never slower]: the faster generic method first
                    passed.append(faster)
                    chain[i : i + 2] = reversed(GENERIC_ORDER)
            return Choice(METHODS[chain[i]], tuple(passed), tuple(chain[i + 1 :]), name)
        passed.append(f"{candidate} failed on a probe ({failure})")
    hint = (
        "the last method, plain torch.autograd, must be able to differentiate the forward twice"
        if name in ("auto", LAST)
        else "torch.func must be able to transform its forward: no .numpy(), .item() or branches "
        "on tensor values; method=auto also tries plain autograd"
    )
    raise ArgumentError(
        "no method can differentiate the model: " + "; ".join(passed) + f" ({hint})", "model"
    )


GENERIC_MARGIN = 4  # the generic method goes first where it counts less than 1/4 of the plan


def _dearer_than_generic(model: nn.Module, x: Tensor, target: Target) -> str | None:
    """Why ``auto`` takes ``forward_over_reverse`` before the graph path, or None.

    NOTE [never slower]: the graph path's plan is the cheapest of its schedules by counted
    multiply-adds, but a model with steps without a rule of their own (``General`` steps,
    differentiated by ``torch.func`` a step at a time at several times their cost) can count more
    than ``forward_over_reverse``, which is the same algebra as tangent-adjoint propagation with
    every step at its native cost (``planner.generic_cost``). Counted for all D rows of the
    model's K outputs (the full Hessian, what a run computes), where the graph has such steps and
    the generic method counts less, ``auto`` takes it first, with the graph path after it in its
    chain, where it counts less than a quarter (``GENERIC_MARGIN``): the counts' units for small
    steps (an elementwise step's ``ELEMENTWISE_MACS``, a ``General`` step's factor) overstate
    the engine's cost of such steps by ~3x against torch.func's. Measured on 64 samples of
    D = 64 (2-core CPU), plan against forward_over_reverse: ``erf`` and ``F.normalize`` steps
    between layers of width 256 counted 5.1x and ran 19.3 ms against 14.8 (the generic method
    taken); MLPs of width 64 behind one ``General`` identity step counted 2.1x and 1.6x and ran
    3.2 ms against 4.5 and 3.1 against 4.1 (the graph path kept)."""
    try:
        plan, generic, general = structured.counted(model, x, target, x[0].numel(),
                                                    default_memory_budget(x.device))  # fmt: skip
    except Exception:  # noqa: BLE001 - no plan to compare: the graph path's probe will say why
        return None
    if not general or GENERIC_MARGIN * generic >= plan:
        return None
    return (f"structured counts {plan:.3g} multiply-adds a sample, forward_over_reverse "
            f"{generic:.3g}")  # fmt: skip


# The generic methods are timed against each other where the first one's probe takes at least
# TIMED_FROM seconds (below that a call is its fixed costs, and the timing its noise); the second
# goes first where it took at most FASTER of the first one's time.
TIMED_FROM = 0.02
FASTER = 0.85
TIMED_ROWS = 32


def _faster_second(model: nn.Module, x: Tensor, target: Target) -> str | None:
    """Why ``reverse_over_reverse`` goes before ``forward_over_reverse``, or None.

    NOTE [never slower] (the generic methods): the two compute the same rows by the same algebra,
    but torch's kernels for them differ by model: at real widths ``reverse_over_reverse`` was
    faster (a Swin network's full Hessian: 4.8 s against 6.0, a tanh network of width 256 on
    4096 points 44 against 54 ms), and on conv nets up to 13x slower (double backward of a
    convolution under ``vmap``). So the first ``TIMED_ROWS`` rows of the first sample are timed
    for both (each twice, interleaved, the faster of each pair), once per model and call key."""
    rows = select_rows(slice(0, min(x[0].numel(), TIMED_ROWS)), x[0].numel(), x.device)
    first, second = (METHODS[m] for m in GENERIC_ORDER)
    if _probe(second, model, x, target) is not None:
        return None
    times = {first.name: math.inf, second.name: math.inf}
    for _ in range(2):
        for method in (first, second):
            times[method.name] = min(times[method.name], _seconds(method, model, x, target, rows))
            if method is first and times[first.name] < TIMED_FROM:
                return None
    if times[second.name] > FASTER * times[first.name]:
        return None
    return (f"{second.name} took {1e3 * times[second.name]:.3g} ms on {len(rows)} rows, "
            f"{first.name} {1e3 * times[first.name]:.3g} ms")  # fmt: skip


def _seconds(method: Method, model: nn.Module, x: Tensor, target: Target, rows) -> float:
    """Wall-clock seconds of ``method`` on ``rows`` of the first sample (waiting for a GPU)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    method.compute(model, x[:1], target.subset(0, 1), rows, 1 << 28)
    sync()
    return time.perf_counter() - start


def _probe(method: Method, model: nn.Module, x: Tensor, target: Target) -> str | None:
    """Why ``method`` fails on the first sample of x (all rows up to D = its
    ``probe_all_up_to``, else 8, or 2), or None when it computes them. The ``torch.func``
    methods also compute one row of the first two samples: ``vmap`` over samples fails where one
    sample passes (a neighbour list built with ``nonzero``), and plain autograd is then the
    better method (its samples share one forward)."""
    d = x.shape[1:].numel()
    few = slice(0, 8) if method.probe_all_up_to else slice(0, 2)
    rows = select_rows(None if d <= method.probe_all_up_to else few, d, x.device)
    try:
        if method.name in GENERIC_ORDER and len(x) > 1:  # vmap over samples: one row of two
            method.compute(model, x[:2], target.subset(0, 2), select_rows([0], d, x.device),
                           1 << 28)  # fmt: skip
        method.compute(model, x[:1], target.subset(0, 1), rows, 1 << 28)
    except ArgumentError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure hands over to the next method
        return _one_line(err)
    return None


def _one_line(err: Exception) -> str:
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def resolve_method(name: str, model: nn.Module, target: Target, x: Tensor) -> Method:
    """``choose_method(...).method`` (which logs ``Choice.note``, once, where there is one)."""
    return choose_method(name, model, target, x).method


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


@reusing_large_buffers
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
    caches.check(model)  # a model changed in place (a layer replaced) has its caches dropped
    was_training = model.training
    training = _to_eval(model)
    try:
        by_value = isinstance(outputs, str) and outputs in ("predicted", "loss")
        z = _outputs(model, x, by_index=not by_value)
        target = make_target(outputs, z, labels, loss)
        choice = choose_method(method, model, target, x, checked=True)
        row_index = select_rows(rows, x.shape[1:].numel(), x.device)
        hess, grad = choice.compute(model, x, target, row_index, memory_budget, return_gradient)
        reason = zero_hessian_reason(model, target, x)
    finally:
        for module in training:  # each module's own mode back (a frozen BatchNorm stays in eval)
            module.training = True
    if was_training and training_layers(model):
        warnings.warn("model was in training mode: computed in eval mode", stacklevel=CALLER)
    if reason:
        warnings.warn(f"all Hessian entries are zero: {reason}", stacklevel=CALLER)
    return (hess, grad) if return_gradient else hess


def handover(name: str, requested: str) -> tuple[str, ...]:
    """The methods that take over, in order, when ``name`` fails on a call that its probe did
    not foresee: the rest of ``auto``'s chain (an explicit ``forward_over_reverse``: reverse over
    reverse)."""
    if requested == "auto":
        chain = [*GENERIC_ORDER, LAST]
        return tuple(chain[chain.index(name) + 1 :] if name in chain else chain)
    return ("reverse_over_reverse",) if name == "forward_over_reverse" else ()


def compute_rows(
    name: str, after: Sequence[str], requested: str, model, x, target, rows, budget,
    gradient: bool = True,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Method ``name``'s rows; where it fails on this call although it passed the probe (a
    schedule or a block size the probe did not take), the next of ``after``, said in one line.
    When ``auto``'s last one fails too: one line naming each method's error (``ArgumentError``);
    a method named by the user, with nothing after it, raises its own error."""
    key = (tuple(x.shape[1:]), x.dtype, x.device, target.kind, target.n_outputs)
    known = _FAILED.setdefault(model, {}).setdefault(key, set())
    chain = [m for m in (name, *after) if m not in known] or [(name, *after)[-1]]
    failed: list[str] = []
    for i, current in enumerate(chain):
        try:
            return METHODS[current].compute(model, x, target, rows, budget, gradient=gradient)
        except ArgumentError:
            raise
        except Exception as err:
            if requested != "auto" and i == len(chain) - 1:
                raise  # a method asked for by name, with nothing left to hand over to
            failed.append(f"{current} failed ({_one_line(err)})")
            if i < len(chain) - 1:
                known.add(current)  # later calls of this model and key go straight past it
                log.warning("method=%s uses %s: %s", requested, chain[i + 1], failed[-1])
    raise ArgumentError("no method could compute the Hessians: " + "; ".join(failed), "model")


# model -> {(sample shape, dtype, device, target kind, K): methods that failed on a call although
# their probe passed}: later calls hand over at once, without failing again.
_FAILED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, set[str]]] = caches.per_model()


# model -> {(sample shape, dtype, device): C}: the width of its outputs, known after one forward
_WIDTHS: weakref.WeakKeyDictionary = caches.per_model()


def _outputs(model: nn.Module, x: Tensor, by_index: bool = False) -> Tensor:
    """The model's outputs z (N, C) for x; a model that refuses x is a bad ``x``. ``by_index``:
    only z's shape is needed (index targets), so after the first call for this model and input
    shape an uninitialised (N, C) tensor stands in for it, and no forward pass is spent."""
    key = (tuple(x.shape[1:]), x.dtype, x.device)
    widths = _WIDTHS.setdefault(model, {})
    if by_index and key in widths:
        return x.new_empty((x.shape[0], widths[key]))
    try:
        with torch.no_grad():
            z = model(x)
            if z.ndim == 2:
                widths[key] = z.shape[1]
            return z
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ArgumentError(
            f"the model fails on x of shape {tuple(x.shape)} (a batch (N, *S)): {first}", "x"
        ) from err


def _to_eval(model: nn.Module) -> list[nn.Module]:
    """Put every module in eval mode, and return those that were training. Sets the flags
    themselves: ``model.train(mode)`` walks every module twice a call, would put back one mode for
    all of them, and ``torch.export`` programs refuse it."""
    training = [m for m in model.modules() if m.training]
    for module in training:
        module.training = False
    return training
