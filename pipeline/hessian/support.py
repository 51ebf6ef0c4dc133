"""One support analysis, shared by ``auto``, ``structured`` and ``piecewise``: what the graph of a
model is made of, decided from the captured graph (never from a list of leaf modules, which
cannot see what a ``forward`` computes)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import caches
from .graph import Tape, capture, record
from .ops import Unsupported
from .planner import head_kind, make_plan, segments
from .targets import Target


@dataclass(frozen=True)
class Support:
    """What the methods built on the graph can do for a model and target.

    Attributes:
        structured: why the graph engine cannot take the model, or None when it can.
        piecewise: why the piecewise schedule does not apply, or None when it does (no step
            below some cut has a second-order term: a piecewise-linear body).
        zero: the Hessians are zero almost everywhere (no second-order term anywhere and a
            linear head); ``linear``: no nonlinear step at all (then exactly zero).
        transformable: why ``torch.func`` must not transform the model (it holds TorchScript
            modules), or None.
    """

    structured: str | None
    piecewise: str | None
    zero: bool = False
    linear: bool = False
    transformable: str | None = None


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Support]] = caches.per_model()


def analyze(model: nn.Module, x: Tensor, target: Target) -> Support:
    """Capture and record the model on (up to) two samples of x (N, *S) and classify it.

    Cached per model, input shape, dtype, device and target kind: later calls cost nothing (the
    first one compares outputs on the device once).
    """
    key = (tuple(x.shape[1:]), x.dtype, x.device, target.kind, target.n_outputs, model.training)
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _analyze(model, x, target)
    return per_model[key]


def _analyze(model: nn.Module, x: Tensor, target: Target) -> Support:
    scripted = scripted_modules(model)
    if scripted:
        # NOTE [TorchScript]: torch.func's transforms of TorchScript modules can be silently
        # wrong (vmap of jvp through a scripted Sequential gave errors of 5e-2 in float64, torch
        # 2.13), and fx sees them as opaque calls whose derivatives would come from torch.func.
        # Such models go to plain autograd, which TorchScript supports (MACE trains on forces
        # that way).
        names = ", ".join(repr(n) if n else "the model itself" for n in scripted[:2])
        names += ", ..." if len(scripted) > 2 else ""
        reason = f"it holds TorchScript modules ({names}), which torch.func does not transform"
        return Support(reason, reason, transformable=reason)
    probe = x[:2] if len(x) >= 2 else torch.cat([x, x])
    try:
        tape = record(capture(model), probe)
        _check_independent_samples(model, probe, tape)
    except Unsupported as err:
        reason = str(err)
        return Support(reason, reason)
    head = head_kind(target.kind)
    plan = make_plan(tape, 1, target.n_outputs, head)
    linear = all(step.rule.kind == "linear" for step in tape.steps)
    piecewise = _not_piecewise(tape)
    return Support(None, piecewise, plan.zero, linear and head == "zero")


def _not_piecewise(tape: Tape) -> str | None:
    """Why the model is not a piecewise-linear body under a smooth head, or None when it is.

    The head is everything above the lowest cut that lies above the topmost piecewise-linear
    nonlinear step (ReLU, max pool, ...); no step below that cut may have a second-order term.
    """
    kinks = [i for i, s in enumerate(tape.steps) if s.rule.kind != "linear" and s.rule.piecewise]
    if not kinks:
        return "the graph has no piecewise-linear step (ReLU, max pool, ...)"
    head = min((seg.start for seg in segments(tape) if seg.start > kinks[-1]), default=None)
    head = len(tape.steps) if head is None else head
    curved = [s for s in tape.steps[:head] if s.rule.curved]
    if curved:
        return (
            f"step {curved[0].name} has a second-order term below the piecewise-linear body's top"
        )
    return None


def _check_independent_samples(model: nn.Module, x: Tensor, tape: Tape) -> None:
    """Refuse a model whose output for one sample depends on the other samples of its batch."""
    with torch.no_grad():
        alone = model(x[:1])
    together = tape.values[tape.output][:1]
    # Relative to the output's largest entry: a convolution's kernel may differ with the batch
    # size, so in float32 a small entry next to large ones (EfficientNet's logits: -0.09 beside
    # 14.5) moves by a few units of the large one's last place, and through a deep net by more
    # (EfficientNet-B0 at full width with random weights: 1.3e-4 of its largest logit, 1506);
    # mixing samples moves it by O(1).
    scale = together.abs().max() if together.numel() else 0.0
    rel = 1e-6 if together.dtype == torch.float64 else 1e-2
    if alone.shape != together.shape or not bool(
        ((alone - together).abs() <= rel * scale + 1e-6).all()
    ):
        raise Unsupported("its output for a sample depends on the other samples of the batch")


def scripted_modules(model: nn.Module) -> list[str]:
    """Names of the outermost TorchScript modules in the model (``""``: the model itself)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    return [n for n in names if not any(n.startswith(f"{o}.") or (o == "" and n) for o in names)]


def training_layers(model: nn.Module) -> list[str]:
    """Names of BatchNorm and Dropout layers that are in training mode."""
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and m.training]
