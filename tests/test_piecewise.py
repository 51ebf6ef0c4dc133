"""Piecewise-linear nets: zero logit Hessians, J^T A J for losses, against float64 references."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pipeline import hessian, make_target
from pipeline.hessian.methods import resolve_method
from tests.zoo import assert_close_to_max as assert_close

pytestmark = pytest.mark.usefixtures("float64_default")  # every case runs in float64


def relu_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4))


def relu_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(3 * 3 * 3, 8), nn.LeakyReLU(0.1), nn.Linear(8, 4),
    )  # fmt: skip


def relu_cnn3d() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2), nn.ReLU(), nn.MaxPool3d(2, stride=1),
        nn.AvgPool3d((1, 2, 1)), nn.AdaptiveAvgPool3d((1, None, None)), nn.Flatten(),
        nn.Linear(2 * 1 * 1 * 2, 4),
    )  # fmt: skip


# (name, factory, input shape, loss, rows, seed)
CASES = [
    ("mlp_ce", relu_mlp, (3, 4), "cross_entropy", None, 0),
    ("mlp_mse", relu_mlp, (12,), "mse", None, 1),
    ("cnn_ce", relu_cnn, (1, 8, 8), "cross_entropy", None, 2),
    ("cnn_mse_rows", relu_cnn, (1, 8, 8), "mse", (0, 17, 63), 3),
    ("cnn3d_ce", relu_cnn3d, (1, 3, 5, 4), "cross_entropy", None, 5),
]


def _labels(loss: str, n: int, c: int):
    return torch.randn(n, c) if loss == "mse" else torch.arange(n) % c


@pytest.mark.parametrize(("name", "factory", "shape", "loss", "rows", "seed"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_loss_hessian_matches_autograd(name, factory, shape, loss, rows, seed):
    torch.manual_seed(seed)
    model = factory().eval()
    x = torch.randn(3, *shape)
    labels = _labels(loss, 3, 4)
    target = make_target("loss", model(x).detach(), labels, loss)
    assert resolve_method("auto", model, target, x).name == "piecewise"
    h, g = hessian(model, x, "loss", rows, method="piecewise", labels=labels, loss=loss,
                   return_gradient=True)  # fmt: skip
    idx = torch.arange(x[0].numel()) if rows is None else torch.tensor(rows)
    for n in range(3):

        def f(v, n=n):
            return target.select(model(v.view(1, *shape)).squeeze(0), target.aux[n])[0]

        xf = x[n].reshape(-1)
        ref = torch.autograd.functional.hessian(f, xf)[idx]
        assert_close(h[n, 0], ref, what=f"{name} sample {n} hessian")
        assert_close(g[n, 0], torch.autograd.functional.jacobian(f, xf), what=f"{name} gradient")
    h_gen = hessian(model, x, "loss", rows, method="reverse_over_reverse", labels=labels, loss=loss)
    assert_close(h, h_gen, what=f"{name} piecewise vs generic")


def test_logit_hessian_is_zero_with_a_reason_and_correct_gradient():
    torch.manual_seed(4)
    model = relu_cnn().eval()
    x = torch.randn(2, 1, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h, g = hessian(model, x, [1, 3], method="auto", return_gradient=True)
    assert h.shape == (2, 2, 64, 64) and not torch.any(h)
    assert any("piecewise linear" in str(w.message) for w in caught)
    with pytest.warns(UserWarning, match="piecewise linear"):
        _, g_gen = hessian(model, x, [1, 3], method="reverse_over_reverse", return_gradient=True)
    assert_close(g, g_gen, what="logit gradient")


def test_smooth_net_is_not_piecewise():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    target = make_target([0], torch.zeros(1, 2))
    assert resolve_method("auto", model, target, torch.zeros(2, 3)).name != "piecewise"


class Square(nn.Module):
    """A module whose forward hides curvature from the list of its leaves: lin(x) ** 2."""

    def __init__(self, n: int):
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        return self.lin(x) ** 2


@pytest.mark.parametrize("method", ["auto", "piecewise", "structured"])
def test_hidden_curvature_in_a_forward_gives_autograds_answer(method):
    """Issue 11, item 5: a ReLU net ending in a module that squares got all-zero Hessians.

    The graph sees the square: its curvature is the head's A in J^T A J (piecewise), or a step's
    second-order term (structured)."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), Square(4)).eval()
    x = torch.randn(2, 5)
    h = hessian(model, x, [1], method=method)
    for n in range(2):
        ref = torch.autograd.functional.hessian(lambda v: model(v[None])[0, 1], x[n])
        assert ref.abs().max() > 1e-3  # the case is not trivially zero
        assert_close(h[n, 0], ref, what=f"Square sample {n}, {method}")
