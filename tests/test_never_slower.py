"""NOTE [never slower]: ``auto`` takes ``forward_over_reverse`` before the graph path where the
plan counts more multiply-adds than the generic method, and the generic method's count
(``planner.generic_cost``) is checked against the matrix products torch.func actually runs."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import pipeline
from pipeline.hessian import structured
from pipeline.hessian.graph import capture, record
from pipeline.hessian.methods import default_memory_budget, resolve_method
from pipeline.hessian.planner import generic_cost
from tests.zoo import assert_rel_close

pytestmark = pytest.mark.usefixtures("float64_default")


class Between(nn.Module):
    """``body`` between two wide layers."""

    def __init__(self, body, d: int = 64, width: int = 256):
        super().__init__()
        self.fc = nn.Linear(d, width)
        self.out = nn.Linear(width, 2)
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(self.fc(x)))


def GeneralSteps() -> nn.Module:  # noqa: N802 - a model class's name
    """Steps without a rule of their own (``erf``, ``F.normalize``: torch.func a step at a time)."""
    return Between(lambda h: torch.erf(F.normalize(torch.erf(h), dim=1)))


def Ruled() -> nn.Module:  # noqa: N802
    """The same widths with rules for every step (tanh, softmax)."""
    return Between(lambda h: torch.tanh(torch.softmax(torch.tanh(h), dim=1)))


class BehindAnIdentity(nn.Module):
    """An MLP of width 64 behind one ``General`` step (an identity torch.func differentiates):
    it counts 2.1x forward_over_reverse, and runs 1.4x faster than it."""

    def __init__(self, d: int = 64, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width),
                                 nn.Tanh(), nn.Linear(width, 2))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(_identity(x))


def _identity(x: Tensor) -> Tensor:
    return x.clone()


torch.fx.wrap("_identity")  # (a call the graph records whole: a General step)

# (id, model, the method auto takes)
CASES = [
    ("general_steps", GeneralSteps, "forward_over_reverse"),
    ("ruled", Ruled, "structured"),
    ("one_general_step", BehindAnIdentity, "structured"),
]


@pytest.mark.parametrize(("factory", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_auto_takes_the_method_that_counts_less(factory, expected, caplog):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(4, 64)
    target = pipeline.make_target([1], model(x))
    plan, generic, general = structured.counted(model, x, target, 64,
                                                default_memory_budget(x.device))  # fmt: skip
    dearer = 4 * generic < plan and general > 0  # (methods.GENERIC_MARGIN)
    assert dearer == (expected == "forward_over_reverse"), (plan, generic)
    with caplog.at_level(logging.WARNING):
        assert resolve_method("auto", model, target, x).name == expected
    said = [r.getMessage() for r in caplog.records if "forward_over_reverse" in r.getMessage()]
    assert bool(said) == (expected == "forward_over_reverse"), said
    h = pipeline.hessian(model, x, [1])
    ref = pipeline.hessian(model, x, [1], method="reverse_over_reverse")
    assert_rel_close(h, ref, 1e-9)


def _mm_macs(fn) -> int:
    """Multiply-adds of the matrix products (mm, bmm, addmm...) that ``fn()`` runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("rows", [64, 16])
def test_the_generic_count_of_products_matches_what_torch_func_runs(rows):
    """A tanh network's products: its forward, the backward of the output, and per row a
    forward tangent and the backward's tangent (``generic_cost`` without its elementwise and
    fixed parts), against torch.func's products counted by ``FlopCounterMode``."""
    torch.manual_seed(1)
    d, width = 64, 256
    model = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 1)).eval()  # fmt: skip
    x = torch.randn(1, d)
    tape = record(capture(model), x)
    dense = [s for s in tape.steps if type(s.rule).__name__ == "Dense"]
    f = sum(s.rule.macs for s in dense)
    predicted = (1 + 1) * f + rows * (f + f)  # generic_cost's products, K = 1

    def call():
        return pipeline.hessian(model, x, [0], rows=slice(0, rows), method="forward_over_reverse")

    call()  # (the first call also runs the method's probe)
    counted = _mm_macs(call)
    assert abs(counted - predicted) <= 0.1 * predicted, (counted, predicted)
    assert generic_cost(tape, rows, 1, "zero") >= predicted  # (plus elementwise, fixed costs)


class Branching(nn.Module):
    """A forward that branches on a value: off the graph path, to the generic methods."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return torch.tanh(h) if h.sum() > 0 else torch.sin(h)


# (id, seconds of forward_over_reverse and of reverse_over_reverse on the timed rows, expected)
TIMED = [
    ("second_faster", (0.10, 0.05), "reverse_over_reverse"),
    ("second_not_faster_enough", (0.10, 0.09), "forward_over_reverse"),
    ("first_too_quick_to_time", (0.001, 0.0001), "forward_over_reverse"),
]


@pytest.mark.parametrize(("seconds", "expected"), [c[1:] for c in TIMED], ids=[c[0] for c in TIMED])
def test_auto_takes_the_faster_generic_method(monkeypatch, caplog, seconds, expected):
    """The generic methods' times on the timed rows decide their order (the clock replaced: a
    real one makes a tiny model's choice a coin toss, which is why it is timed only from
    TIMED_FROM seconds)."""
    from pipeline.hessian import methods

    timed = []

    def fake(method, model, x, target, rows):
        timed.append(method.name)
        assert len(rows) == min(x[0].numel(), methods.TIMED_ROWS)
        return seconds[0] if method.name == "forward_over_reverse" else seconds[1]

    monkeypatch.setattr(methods, "_seconds", fake)
    torch.manual_seed(0)
    model = Branching()
    x = torch.randn(3, 6)
    target = pipeline.make_target([1], model(x))
    with caplog.at_level(logging.WARNING):
        choice = methods.choose_method("auto", model, target, x)
    assert choice.name == expected
    assert ("reverse_over_reverse" in timed) == (seconds[0] >= methods.TIMED_FROM)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert ("reverse_over_reverse took" in said) == (expected == "reverse_over_reverse"), said
    other = {"forward_over_reverse": "reverse_over_reverse"}.get(expected, "forward_over_reverse")
    assert choice.after[0] == other  # the other one takes over where the chosen one fails
    ref = pipeline.hessian(model, x, [1], method="autograd")
    assert_rel_close(choice.compute(model, x, target, None, None)[0], ref, 1e-9)
