"""The schedules for small inputs against float64 references, and the planner's choice between
them: forward Taylor propagation (``pipeline.hessian.taylor``) and the outer schedule (forward
Jacobians and each step's curvature where it arises, NOTE [outer] in ``propagate``), on a table of
small-input models (D from 1 to 64)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pipeline
from pipeline import make_target
from pipeline.hessian import structured, taylor
from pipeline.hessian.graph import capture, record
from pipeline.hessian.planner import OUTER, TAYLOR, head_kind, make_plan
from tests.library_models import PINN, PairPotential

pytestmark = pytest.mark.usefixtures("float64_default")


def mlp(act: Callable[[], nn.Module], d: int, widths=(16, 16), out: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(d, w), act()]
        d = w
    return nn.Sequential(*layers, nn.Linear(d, out))


class Residual(nn.Module):
    """x -> W2 (h + tanh(W h)), h = softplus(W1 x): a residual block around a curved branch."""

    def __init__(self, d: int, w: int = 12):
        super().__init__()
        self.inp, self.inner, self.out = nn.Linear(d, w), nn.Linear(w, w), nn.Linear(w, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.softplus(self.inp(x))
        return self.out(h + 0.5 * torch.tanh(self.inner(h)))


class Gated(nn.Module):
    """A product of two branches and a residual connection straight from the input."""

    def __init__(self, d: int, w: int = 10):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(d, w), nn.Linear(d, w), nn.Linear(w, 2)
        self.skip = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.a(x)) * torch.sigmoid(self.b(x))) + self.skip(x)


class Normed(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear."""

    def __init__(self, d: int, w: int = 12):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(d, w), nn.LayerNorm(w), nn.Linear(w, 3)
        with torch.no_grad():
            self.norm.weight.normal_(1.0, 0.3)
            self.norm.bias.normal_(0.0, 0.3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.gelu(self.norm(self.inp(x))))


class NormPairs(nn.Module):
    """A pair potential that takes the distances with ``torch.linalg.vector_norm``: its 2-norm is
    recorded as a product, a sum and a root (NOTE [norms] in ``graph``), each with a forward
    Taylor rule; another ``ord`` is a ``General`` step, without one, so another schedule is used.
    ``torch.cdist`` is not in the table: torch cannot differentiate it twice
    (``_cdist_backward``), so neither can the reference."""

    def __init__(self, particles: int = 4, width: int = 8, ord: float = 2):
        super().__init__()
        self.ord = ord
        i, j = torch.triu_indices(particles, particles, 1)
        self.register_buffer("i", i)
        self.register_buffer("j", j)
        self.phi = nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, pos: Tensor) -> Tensor:
        r = torch.linalg.vector_norm(pos[:, self.i] - pos[:, self.j], self.ord, dim=-1,
                                     keepdim=True)  # fmt: skip
        return self.phi(r).sum(dim=1)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    outputs: list[int] | str = (0,)
    taylor: bool = True  # whether every step has a forward Taylor rule


CASES = [
    Case("tanh_mlp_d1", lambda: mlp(nn.Tanh, 1), (1,), [0, 2]),
    Case("sigmoid_mlp_d3", lambda: mlp(nn.Sigmoid, 3), (3,), [1]),
    Case("softplus_mlp_d4", lambda: mlp(lambda: nn.Softplus(beta=2.0), 4), (4,), [0, 1]),
    Case("gelu_mlp_d5", lambda: mlp(nn.GELU, 5), (5,), [2]),
    Case("gelu_tanh_mlp_d6", lambda: mlp(lambda: nn.GELU("tanh"), 6), (6,), [0]),
    Case("silu_mlp_d8", lambda: mlp(nn.SiLU, 8, (12, 12, 12)), (8,), "all"),
    Case("tanh_mlp_d64", lambda: mlp(nn.Tanh, 64, (24,)), (64,), [1]),
    Case("pinn_xt", lambda: PINN(width=16), (2,), [0]),
    Case("pair_potential", lambda: PairPotential(particles=4, width=8), (4, 3), [0]),
    Case("pair_potential_norm", NormPairs, (4, 3), [0]),
    Case("pair_potential_norm3", lambda: NormPairs(ord=3), (4, 3), [0], taylor=False),
    Case("residual_d5", lambda: Residual(5), (5,), [0, 1]),
    Case("gated_product_d4", lambda: Gated(4), (4,), [1]),
    Case("layer_norm_d6", lambda: Normed(6), (6,), [0, 2]),
]


def reference(model: nn.Module, x: Tensor, outputs: list[int]) -> Tensor:
    """torch.autograd.functional.hessian per sample and output, float64: (N, K, D, D)."""
    out = []
    for xi in x:

        def f(v, k):
            return model(v.reshape(1, *x.shape[1:]))[0, k]

        flat = xi.reshape(-1)
        out.append(torch.stack([torch.autograd.functional.hessian(lambda v, k=k: f(v, k), flat)
                                for k in outputs]))  # fmt: skip
    return torch.stack(out)


def assert_entries_close(actual: Tensor, expected: Tensor, what: str, tol: float = 1e-9) -> None:
    """|actual - expected| <= tol * max(1, |expected|) entrywise; on failure, name the first
    entries (n, k, r, c) that differ with both values."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = (actual - expected).abs() > tol * expected.abs().clamp_min(1.0)
    if bad.any():
        where = bad.nonzero()[:8].tolist()
        lines = [f"  {tuple(i)}: got {actual[tuple(i)]:.12e}, expected {expected[tuple(i)]:.12e}"
                 for i in where]  # fmt: skip
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.numel()} entries differ by more than "
                    f"{tol:g}, first ones (n, k, row, col):\n" + "\n".join(lines))  # fmt: skip


def _inputs(case: Case, n: int = 3) -> tuple[nn.Module, Tensor, list[int]]:
    torch.manual_seed(0)
    model = case.build().double().eval()
    x = torch.randn(n, *case.shape)
    with torch.no_grad():
        c = model(x).shape[1]
    outputs = list(range(c)) if case.outputs == "all" else list(case.outputs)
    return model, x, outputs


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_taylor_schedule_matches_float64_reference(case):
    model, x, outputs = _inputs(case)
    tape = record(capture(model), x)
    assert taylor.supports(tape) == case.taylor, [type(s.rule).__name__ for s in tape.steps]
    expected = reference(model, x, outputs)
    if case.taylor:  # the schedule itself, whatever the planner would pick
        target = make_target(outputs, model(x).detach())
        h, _ = structured.compute(model, x, target, None, 1 << 30, (TAYLOR,))
        assert_entries_close(h, expected, f"{case.name}, Taylor schedule")
    h = pipeline.hessian(model, x, outputs)  # auto: Taylor or a fallback, never a wrong answer
    assert_entries_close(h, expected, f"{case.name}, auto")


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_taylor_with_a_loss_head(loss):
    """The join with a dense (cross-entropy) or diagonal (MSE) A, and the gradient."""
    torch.manual_seed(1)
    model = mlp(nn.Tanh, 3).double()
    x = torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 2]) if loss == "cross_entropy" else torch.randn(4, 3)
    target = make_target("loss", model(x).detach(), labels, loss)
    h, g = structured.compute(model, x, target, None, 1 << 30, (TAYLOR,))
    hs, gs = [], []
    for n in range(4):

        def f(v, n=n):
            return target.select(model(v.view(1, 3))[0], target.aux[n])[0]

        hs.append(torch.autograd.functional.hessian(f, x[n]))
        gs.append(torch.autograd.functional.jacobian(f, x[n]))
    assert_entries_close(h, torch.stack(hs)[:, None], f"{loss} Hessian")
    assert_entries_close(g, torch.stack(gs)[:, None], f"{loss} gradient")


def test_taylor_rows_and_sample_chunks():
    """Selected rows, and samples in chunks of a small memory budget, give the same entries."""
    torch.manual_seed(2)
    model = Residual(4).double()
    x = torch.randn(7, 4)
    target = make_target([0, 1], model(x).detach())
    full, grad = structured.compute(model, x, target, None, 1 << 30, (TAYLOR,))
    rows = torch.tensor([3, 0])
    some, _ = structured.compute(model, x, target, rows, 1 << 30, (TAYLOR,))
    assert_entries_close(some, full[:, :, rows], "rows [3, 0]")
    chunked, chunked_grad = structured.compute(model, x, target, None, 1, (TAYLOR,))
    assert_entries_close(chunked, full, "one sample at a time")
    assert_entries_close(chunked_grad, grad, "gradients one sample at a time")
    assert_entries_close(full, reference(model, x, [0, 1]), "against the reference")


def _plan(model: nn.Module, shape: tuple[int, ...], n: int, k: int = 1):
    tape = record(capture(model), torch.randn(2, *shape))
    d = tape.width(0)
    return make_plan(tape, d, k, head_kind("index"), samples=n)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_outer_schedule_matches_float64_reference(case):
    """Every row, selected rows and one sample at a time; it needs no forward second-order rule
    (the pair potential with a 3-norm has none)."""
    model, x, outputs = _inputs(case)
    expected = reference(model, x, outputs)
    target = make_target(outputs, model(x).detach())
    h, _ = structured.compute(model, x, target, None, 1 << 30, (OUTER,))
    assert_entries_close(h, expected, f"{case.name}, outer schedule")
    d = x[0].numel()
    rows = torch.tensor(sorted({d - 1, 0, d // 2}))
    some, _ = structured.compute(model, x, target, rows, 1, (OUTER,))
    assert_entries_close(some, expected[:, :, rows], f"{case.name}, outer, rows {rows.tolist()}")


def test_planner_picks_a_forward_schedule_for_small_inputs():
    """D = 1, 2 below width 32 for any number of samples, D = 6 at one sample: Taylor or outer
    (a call's fixed cost decides at one sample: Taylor makes one pass through the steps, outer
    two, tangent-adjoint three); tangent-adjoint or M-propagation never."""
    torch.manual_seed(3)
    cases = [(PINN(), (2,), (1, 64)), (mlp(nn.Tanh, 1, (32, 32)), (1,), (1, 64)),
             (mlp(nn.Tanh, 6, (8, 8)), (6,), (1,))]  # fmt: skip
    for model, shape, samples in cases:
        for n in samples:
            plan = _plan(model.double(), shape, n)
            assert plan.bottom in (TAYLOR, OUTER), (type(model).__name__, n, plan)
            if n == 1:
                assert plan.bottom == TAYLOR, (type(model).__name__, n, plan)


def test_planner_picks_outer_for_wide_physics_nets():
    """A PINN of width 128-512 on (x, t): Taylor carries D (D + 3) / 2 = 5 tangents through every
    layer, outer 2 and the gradient (measured on the 2-core CPU, 1,024-4,096 points: outer 1.5x
    faster than either other schedule; benchmarks/RESULTS.md)."""
    torch.manual_seed(6)
    for width in (128, 512):
        plan = _plan(PINN(width=width).double(), (2,), 1024)
        assert plan.bottom == OUTER, (width, plan)


def test_planner_never_picks_taylor_for_images():
    torch.manual_seed(4)
    mlp784 = nn.Sequential(nn.Flatten(), mlp(nn.Tanh, 784, (64, 64), 10))
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.Tanh(), nn.Flatten(),
                        nn.Linear(4 * 13 * 13, 10))  # fmt: skip
    for model in (mlp784, cnn):
        for n in (1, 64):
            plan = _plan(model.double(), (1, 28, 28), n)
            assert plan.bottom != TAYLOR, (n, plan)


def test_planner_never_picks_taylor_without_rules():
    """A step without a forward second-order rule (softmax inside) rules the schedule out."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 8), nn.Softmax(dim=-1), nn.Linear(8, 2)).double()
    tape = record(capture(model), torch.randn(2, 3))
    assert not taylor.supports(tape)
    assert _plan(model, (3,), 64).bottom != TAYLOR
    x = torch.randn(3, 3)
    assert_entries_close(pipeline.hessian(model, x, [0, 1]), reference(model, x, [0, 1]),
                         "softmax MLP, auto")  # fmt: skip
