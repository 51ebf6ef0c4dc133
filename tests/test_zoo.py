"""The model zoo (class-style models, ``tests/model_zoo.py``) through ``auto``: the graph path is
taken for every one of them and matches float64 autograd to 1e-9 relative."""

from __future__ import annotations

import pytest
import torch

import pipeline
from pipeline.hessian.methods import resolve_method
from pipeline.hessian.propagate import gradients, hessian_rows
from pipeline.hessian.rows import Rows
from tests.model_zoo import ZOO, ZooModel
from tests.zoo import TargetCase, assert_rel_close, every_plan, reference

pytestmark = pytest.mark.usefixtures("float64_default")

GRAPH_METHODS = {"structured", "piecewise"}


def _case(entry: ZooModel):
    torch.manual_seed(0)
    model = entry.small().eval()
    x = torch.randn(3, *entry.small_shape)
    if entry.outputs == "loss":
        labels = torch.tensor([0, 3, 1])
        return model, x, TargetCase("ce", "loss", "cross_entropy", "classes"), labels
    return model, x, TargetCase("index", entry.outputs), None


@pytest.mark.parametrize("entry", ZOO, ids=[z.name for z in ZOO])
def test_auto_takes_the_graph_path_and_matches_autograd(entry: ZooModel):
    model, x, case, labels = _case(entry)
    z = model(x).detach()
    target = pipeline.make_target(case.outputs, z, labels, case.loss)
    assert resolve_method("auto", model, target, x).name in GRAPH_METHODS
    h, g = pipeline.hessian(model, x, case.outputs, labels=labels, loss=case.loss,
                            return_gradient=True)  # fmt: skip
    h_ref, g_ref = reference(model, x, case, labels)
    assert_rel_close(h, h_ref, 1e-9)
    assert_rel_close(g, g_ref, 1e-9)


@pytest.mark.parametrize("entry", ZOO, ids=[z.name for z in ZOO])
def test_rows_and_outputs_subsets(entry: ZooModel):
    model, x, case, labels = _case(entry)
    d = x[0].numel()
    rows = [d - 1, 0, d // 2]
    outputs = "loss" if case.outputs == "loss" else [0, 3]
    case = case if outputs == "loss" else TargetCase("two", outputs)
    h = pipeline.hessian(model, x, outputs, rows, labels=labels, loss=case.loss)
    h_ref, _ = reference(model, x, case, labels)
    assert_rel_close(h, h_ref[:, :, rows], 1e-9)


@pytest.mark.parametrize("entry", ZOO, ids=[z.name for z in ZOO])
def test_every_plan_matches_autograd(entry: ZooModel):
    """Every cut of the class-style graphs and every bottom schedule, not only the cheapest."""
    model, x, case, labels = _case(entry)
    z = model(x).detach()
    target = pipeline.make_target(case.outputs, z, labels, case.loss)
    h_ref, g_ref = reference(model, x, case, labels)
    d = x[0].numel()
    with torch.no_grad():
        tape, _, plans = every_plan(model, x, target, d)
        g_top, head = target.derivatives(tape.values[tape.output])
        g = gradients(tape, g_top)
        for plan in plans:
            h = hessian_rows(tape, plan, head, g, Rows(torch.arange(d), True), target.n_outputs)
            assert_rel_close(h, h_ref, 1e-9)
