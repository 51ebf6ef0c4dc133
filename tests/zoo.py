"""Test cases as data: models (factory, input shape, seed), targets, row subsets, and references.

Every numerical test compares ``pipeline.hessian`` with ``torch.autograd.functional`` in float64.
The reference is built here from the model alone (never from ``pipeline.hessian.targets``), so
a bug in the target code shows up as a mismatch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.hessian.graph import capture, record
from pipeline.hessian.local import layout
from pipeline.hessian.planner import LOCAL, OUTER, REVERSE, TANGENT, Plan, head_kind, make_plan
from pipeline.inputs.models import digits_cnn, digits_mlp

N_SAMPLES = 3


class LayerNormGELU(nn.Module):
    """Flatten -> Linear -> LayerNorm -> GELU -> Linear: not a plain chain of Linear/activations."""

    def __init__(self, in_features: int, hidden: int = 16, n_out: int = 6):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(x.flatten(1)))))


class LayerNormStack(nn.Module):
    """Two blocks Linear -> LayerNorm without weights -> GELU / tanh, then a Linear: the M below
    the lower LayerNorm is dense, below the upper one diagonal."""

    def __init__(self, in_features: int, hidden: int = 10, n_out: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(F.layer_norm(self.fc1(x), (self.fc1.out_features,)))
        return self.fc3(torch.tanh(F.layer_norm(self.fc2(h), (self.fc2.out_features,))))


class Residual(nn.Module):
    """h = x + tanh(W2 sigmoid(W1 x)); out = W3 h: a skip connection (not nn.Sequential)."""

    def __init__(self, dim: int, hidden: int = 12, n_out: int = 5):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        return self.head(h + torch.tanh(self.inner(h)))


def _nonsquare() -> nn.Module:
    """A conv net on (2, 7, 5) inputs: row-major flattening over a non-square shape matters."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 3, 8), nn.SiLU(),
        nn.Linear(8, 4),
    )  # fmt: skip


def _elu_softplus() -> nn.Module:
    """ELU and Softplus (softplus lacked forward-mode AD in some torch releases)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(10, 16), nn.ELU(), nn.Linear(16, 16), nn.Softplus(),
        nn.Linear(16, 7),
    )  # fmt: skip


@dataclass(frozen=True)
class ModelCase:
    """A model factory (called after seeding), the input shape S, and the seed of weights and x."""

    name: str
    factory: Callable[[], nn.Module]
    shape: tuple[int, ...]
    seed: int

    def build(self, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Tensor]:
        """The model in eval mode and inputs (N_SAMPLES, *S), both in ``dtype``."""
        torch.manual_seed(self.seed)
        model = self.factory().to(dtype).eval()
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn((N_SAMPLES, *self.shape), generator=gen, dtype=torch.float64)
        if self.shape == (1, 8, 8):  # digits live in [0, 1]
            x = x.sigmoid()
        return model, x.to(dtype)


MODELS: list[ModelCase] = [
    ModelCase("digits_mlp", digits_mlp, (1, 8, 8), 0),
    ModelCase("digits_cnn", digits_cnn, (1, 8, 8), 1),
    ModelCase("layernorm_gelu", lambda: LayerNormGELU(12), (3, 4), 2),
    ModelCase("layernorm_stack", lambda: LayerNormStack(10), (10,), 6),
    ModelCase("residual", lambda: Residual(9), (9,), 3),
    ModelCase("nonsquare_2x7x5", _nonsquare, (2, 7, 5), 4),
    ModelCase("elu_softplus", _elu_softplus, (10,), 5),
]
MODEL_BY_NAME = {m.name: m for m in MODELS}


@dataclass(frozen=True)
class TargetCase:
    """Arguments of ``pipeline.hessian`` that choose the outputs: ``outputs``, ``loss``, labels."""

    name: str
    outputs: Any  # a list of indices, "all", "predicted" or "loss"
    loss: str = "cross_entropy"
    labels: str | None = None  # None, "classes" (N,) ints, or "soft" (N, C) floats


TARGETS: list[TargetCase] = [
    TargetCase("index", [1]),
    TargetCase("indices", [0, 3, -1]),  # -1 is the last output
    TargetCase("all", "all"),
    TargetCase("predicted", "predicted"),
    TargetCase("cross_entropy", "loss", "cross_entropy", "classes"),
    TargetCase("mse_classes", "loss", "mse", "classes"),
    TargetCase("mse_soft", "loss", "mse", "soft"),
]
TARGET_BY_NAME = {t.name: t for t in TARGETS}

ROWS: dict[str, Any] = {
    "slice": slice(2, 9),
    "index_list": [5, 0, 7, 7],  # unsorted, with a repeat
    "negative": [-1, 3],
}


def make_labels(case: TargetCase, n: int, n_out: int, seed: int = 0) -> Tensor | None:
    """Labels for a target case: (N,) class indices or (N, C) float targets."""
    gen = torch.Generator().manual_seed(seed)
    if case.labels == "classes":
        return torch.randint(n_out, (n,), generator=gen)
    if case.labels == "soft":
        return torch.rand((n, n_out), generator=gen, dtype=torch.float64)
    return None


def _hessian_and_gradient(f: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(D, D) Hessian and (D,) gradient of a scalar function of one sample x (shape S)."""
    from torch.autograd.functional import hessian, jacobian

    d = x.numel()
    return hessian(f, x, vectorize=True).reshape(d, d), jacobian(f, x).reshape(d)


def output_indices(case: TargetCase, z: Tensor) -> Tensor:
    """(N, K) indices of the selected outputs for the model outputs z (N, C); not for losses."""
    n, n_out = z.shape
    if case.outputs == "all":
        return torch.arange(n_out).expand(n, n_out)
    if case.outputs == "predicted":
        return z.argmax(1, keepdim=True)
    return (torch.tensor(case.outputs) % n_out).expand(n, -1)


def reference(
    model: nn.Module, x: Tensor, case: TargetCase, labels: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Hessians (N, K, D, D) and gradients (N, K, D) by ``torch.autograd.functional``."""
    with torch.no_grad():
        z = model(x)
    if case.outputs != "loss":
        h, g = logit_reference(model, x)
        idx = output_indices(case, z)
        rows = torch.arange(len(x))[:, None]
        return h[rows, idx], g[rows, idx]
    hs, gs = [], []
    for n in range(len(x)):
        if case.loss == "cross_entropy":
            t = labels[n]
            f = lambda u, t=t: F.cross_entropy(model(u.unsqueeze(0)), t[None])  # noqa: E731
        else:
            t = labels[n] if labels.ndim == 2 else F.one_hot(labels[n], z.shape[1])
            f = lambda u, t=t: ((model(u.unsqueeze(0))[0] - t.to(u.dtype)) ** 2).mean()  # noqa: E731
        h, g = _hessian_and_gradient(f, x[n])
        hs.append(h[None])
        gs.append(g[None])
    return torch.stack(hs), torch.stack(gs)


_LOGITS: dict[int, tuple[Tensor, Tensor]] = {}


def logit_reference(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Hessians (N, C, D, D) and gradients (N, C, D) of every logit, cached per (model, x)."""
    key = id(model), id(x)
    if key not in _LOGITS:
        with torch.no_grad():
            n_out = model(x).shape[1]
        per_sample = [
            [_hessian_and_gradient(lambda u, j=j: model(u.unsqueeze(0))[0, j], xn)
             for j in range(n_out)]
            for xn in x
        ]  # fmt: skip
        _LOGITS[key] = (
            torch.stack([torch.stack([h for h, _ in s]) for s in per_sample]),
            torch.stack([torch.stack([g for _, g in s]) for s in per_sample]),
        )
    return _LOGITS[key]


@cache
def cached_model(model_name: str) -> tuple[nn.Module, Tensor]:
    """The float64 model and inputs of a case, built once."""
    return MODEL_BY_NAME[model_name].build(torch.float64)


@cache
def cached_case(model_name: str, target_name: str):
    """(model, x, labels, reference hessian, reference gradient) in float64, computed once."""
    model, x = cached_model(model_name)
    case = TARGET_BY_NAME[target_name]
    with torch.no_grad():
        n_out = model(x).shape[1]
    labels = make_labels(case, len(x), n_out)
    h, g = reference(model, x, case, labels)
    return model, x, labels, h, g


def assert_close(actual: Tensor, expected: Tensor, rtol: float, atol: float = 0.0) -> None:
    """Fail unless |actual - expected| <= atol + rtol * |expected| everywhere, saying where not.

    The message gives the shapes, the number of bad entries, the largest error, its index
    (n, k, r, c for a Hessian) and the two values there.
    """
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # also catches NaN
    if bad.any():
        worst = torch.where(bad, err.nan_to_num(float("inf")), torch.zeros_like(err)).argmax()
        index = tuple(int(i) for i in torch.unravel_index(worst, err.shape))
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} entries differ (rtol={rtol:g}, atol={atol:g}); "
            f"largest error {err[index].item():.3e} at index {index}: "
            f"actual {a[index].item():.10g}, expected {e[index].item():.10g}; "
            f"max |expected| = {e.abs().max().item():.3e}"
        )


class HardAsClamp(torch.overrides.TorchFunctionMode):
    """References with hardsigmoid and hardswish written as clamps: torch cannot differentiate
    its own kernels for them twice (``derivative for aten::hardsigmoid_backward``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.hardsigmoid:
            return torch.clamp(args[0] + 3, 0, 6) / 6
        if func is F.hardswish:
            return args[0] * torch.clamp(args[0] + 3, 0, 6) / 6
        return func(*args, **(kwargs or {}))


def assert_rel_close(actual: Tensor, expected: Tensor, rel: float) -> None:
    """Error relative to the largest reference entry: |actual - expected| <= rel * max|expected|."""
    scale = expected.detach().abs().max().item()
    assert scale > 0, "the reference is all zero: this case cannot test anything"
    assert_close(actual, expected, rtol=0.0, atol=rel * scale)


def assert_close_to_max(
    actual: Tensor, expected: Tensor, rtol: float = 1e-10, what: str = ""
) -> None:
    """Fail with the largest error and its (n, k, r, c) index, relative to max |expected|."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual - expected).abs()
    scale = expected.abs().max().clamp_min(1e-300)
    worst = int(err.argmax()) if err.numel() else 0
    if err.numel() and err.max() > rtol * scale:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        pytest.fail(
            f"{what}: max |error| {err.max():.3e} (relative {err.max() / scale:.3e} > {rtol:g}) "
            f"at index {idx}: got {actual[idx]:.6e}, expected {expected[idx]:.6e}"
        )


def every_plan(model: nn.Module, x: Tensor, target, rows: int):
    """The recorded graph and every admissible (cut, schedule) plan for it."""
    tape = record(capture(model), x)
    best = make_plan(tape, rows, target.n_outputs, head_kind(target.kind))
    curved = [s.rule.curved for s in tape.steps]
    plans = []
    for cut in range(len(best.segments) + 1):
        stop = best.segments[cut].start if cut < len(best.segments) else len(tape.steps)
        for bottom in (TANGENT, REVERSE, LOCAL, OUTER):
            if bottom == REVERSE and any(curved[:stop]):
                continue
            if bottom == LOCAL and layout(tape, stop) is None:
                continue
            plans.append(Plan(best.segments, cut, bottom, 0, best.zero))
    return tape, best, plans
