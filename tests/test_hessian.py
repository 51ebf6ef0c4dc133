"""``pipeline.hessian`` against float64 autograd references, over the case tables of ``zoo``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import pipeline
from pipeline import make_target
from pipeline.hessian import generic
from pipeline.hessian.errors import ArgumentError
from pipeline.inputs.models import digits_mlp
from tests.zoo import (
    MODEL_BY_NAME,
    MODELS,
    ROWS,
    TARGET_BY_NAME,
    TARGETS,
    assert_close,
    assert_rel_close,
    cached_case,
    make_labels,
    reference,
)

REL = 1e-9  # float64 against float64 autograd, relative to the largest reference entry


def compute(model, x, target_case, labels, **kwargs):
    return pipeline.hessian(
        model, x, target_case.outputs, labels=labels, loss=target_case.loss,
        return_gradient=True, **kwargs,
    )  # fmt: skip


MATRIX = [
    pytest.param(m.name, t.name, meth, id=f"{m.name}-{t.name}-{meth}")
    for m in MODELS
    for t in TARGETS
    for meth in ("auto", "reverse_over_reverse", "autograd")
]


@pytest.mark.parametrize("model_name, target_name, method", MATRIX)
def test_matches_autograd(model_name, target_name, method):
    model, x, labels, h_ref, g_ref = cached_case(model_name, target_name)
    h, g = compute(model, x, TARGET_BY_NAME[target_name], labels, method=method)
    assert_rel_close(h, h_ref, REL)
    assert_rel_close(g, g_ref, REL)
    assert_close(h, h.transpose(-1, -2), rtol=0, atol=REL * h.abs().max().item())


@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
@pytest.mark.parametrize("target_name", ["indices", "cross_entropy"])
def test_row_subsets(model_case, target_name, rows, method):
    model, x, labels, h_ref, g_ref = cached_case(model_case.name, target_name)
    case = TARGET_BY_NAME[target_name]
    h, g = compute(model, x, case, labels, rows=rows, method=method)
    d = x[0].numel()
    index = torch.arange(d)[rows] if isinstance(rows, slice) else torch.tensor(rows) % d
    assert_rel_close(h, h_ref[:, :, index], REL)
    assert_rel_close(g, g_ref, REL)


# Directions per vectorized call that take each path of the block loop in ``generic._batched``
# (N = 3 samples, R = 5 rows): all samples at once, 2 samples then 1, rows in chunks of 2, 1 row.
MAX_DIRECTIONS = {"all_samples": 1000, "two_samples": 10, "row_chunks": 2, "one_row": 1}
GENERIC = {"forward_over_reverse": generic.forward_over_reverse,
           "reverse_over_reverse": generic.reverse_over_reverse}  # fmt: skip


@pytest.mark.parametrize("max_directions", MAX_DIRECTIONS.values(), ids=MAX_DIRECTIONS.keys())
@pytest.mark.parametrize("fn", GENERIC.values(), ids=GENERIC.keys())
@pytest.mark.parametrize("model_name", ["layernorm_gelu", "nonsquare_2x7x5"])
def test_block_size_does_not_change_result(model_name, fn, max_directions):
    model, x, _, h_ref, g_ref = cached_case(model_name, "indices")
    rows = torch.tensor([4, 0, 9, 1, 2])
    with torch.no_grad():
        target = make_target(TARGET_BY_NAME["indices"].outputs, model(x))
    h, g = fn(model, x, target, rows, max_directions)
    assert_rel_close(h, h_ref[:, :, rows], REL)
    assert_rel_close(g, g_ref, REL)


def test_memory_budget_of_one_byte_still_computes(method):
    model, x, labels, h_ref, g_ref = cached_case("residual", "cross_entropy")
    h, g = compute(model, x, TARGET_BY_NAME["cross_entropy"], labels, rows=[3, 8], method=method,
                   memory_budget=1)  # fmt: skip
    assert_rel_close(h, h_ref[:, :, [3, 8]], REL)
    assert_rel_close(g, g_ref, REL)


@pytest.mark.parametrize("target_name", ["indices", "cross_entropy", "mse_soft"])
@pytest.mark.parametrize("model_name", ["digits_cnn", "layernorm_gelu", "elu_softplus"])
def test_float32_agrees_with_float64(model_name, target_name):
    model, x, labels, h_ref, g_ref = cached_case(model_name, target_name)
    case = TARGET_BY_NAME[target_name]
    model32 = MODEL_BY_NAME[model_name].build(torch.float32)[0]
    lab32 = labels.float() if labels is not None and labels.is_floating_point() else labels
    h, g = compute(model32, x.float(), case, lab32)
    assert h.dtype == g.dtype == torch.float32
    assert_rel_close(h.double(), h_ref, 1e-4)
    assert_rel_close(g.double(), g_ref, 1e-4)


@pytest.mark.parametrize("model_name", ["layernorm_gelu", "digits_cnn", "residual"])
def test_taylor_remainder_is_third_order(model_name):
    """|f(x+tv) - f(x) - t g.v - t^2/2 v.Hv| shrinks 8x when t halves (4x without the H term)."""
    model, x, _, _, _ = cached_case(model_name, "index")
    h, g = pipeline.hessian(model, x[:1], [1], return_gradient=True)
    gen = torch.Generator().manual_seed(7)
    v = torch.randn(x[0].numel(), generator=gen, dtype=torch.float64)

    def f(t: float) -> float:
        return model((x[0].flatten() + t * v).reshape(x[:1].shape))[0, 1].item()

    gv, vhv = (g[0, 0] @ v).item(), (v @ h[0, 0] @ v).item()
    ts = [0.02 / 2**i for i in range(4)]
    second = [abs(f(t) - f(0) - t * gv - t * t / 2 * vhv) for t in ts]
    first = [abs(f(t) - f(0) - t * gv) for t in ts]
    assert vhv != 0
    for a, b in zip(second, second[1:], strict=False):
        assert 6.0 < a / b < 10.0, second
    for a, b in zip(first, first[1:], strict=False):
        assert 3.0 < a / b < 5.0, first


@pytest.mark.parametrize("method_name", ["auto", "forward_over_reverse", "reverse_over_reverse"])
def test_linear_model_gives_zeros_and_says_why(method_name):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="linear in the input"):
        h, g = pipeline.hessian(model, x, "all", method=method_name, return_gradient=True)
    assert h.shape == (2, 3, 12, 12)
    assert torch.equal(h, torch.zeros_like(h))
    assert_close(g, model[1].weight.detach().expand(2, 3, 12), rtol=0, atol=1e-15)


def test_linear_model_loss_hessian_is_not_zero():
    """Cross-entropy of a linear model: H = W^T (diag(p) - p p^T) W, no warning."""
    model = nn.Linear(6, 4).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    labels = torch.tensor([0, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = pipeline.hessian(model, x, "loss", labels=labels)
    w = model.weight.detach()
    p = torch.softmax(model(x).detach(), -1)
    expected = torch.stack([w.T @ (torch.diag(q) - torch.outer(q, q)) @ w for q in p])[:, None]
    assert_rel_close(h, expected, REL)


def test_relu_logit_hessian_is_zero_with_hint_and_loss_hessian_is_not():
    model = digits_mlp(activation="relu").double()
    x = MODEL_BY_NAME["digits_mlp"].build()[1]
    with pytest.warns(UserWarning, match="target=loss"):
        h = pipeline.hessian(model, x, [2])
    assert not torch.any(h)
    labels = make_labels(TARGET_BY_NAME["cross_entropy"], len(x), 10)
    h = pipeline.hessian(model, x, "loss", labels=labels)
    assert torch.any(h)
    h_ref, _ = reference(model, x, TARGET_BY_NAME["cross_entropy"], labels)
    assert_rel_close(h, h_ref, REL)


def test_training_mode_is_restored_and_result_is_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(2, 5, dtype=torch.float64)
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        h = pipeline.hessian(model, x, [0])
    assert model.training
    model.eval()
    assert_rel_close(h, pipeline.hessian(model, x, [0]), 0.0)


def test_each_modules_own_mode_is_restored():
    """A model training with one layer frozen in eval mode (a fine-tuned BatchNorm) gets back
    exactly those modes, not one mode for all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.1),
                          nn.Linear(8, 2)).double()  # fmt: skip
    model.train()
    model[1].eval()
    before = [m.training for m in model.modules()]
    with pytest.warns(UserWarning, match="training mode"):
        pipeline.hessian(model, torch.randn(3, 5, dtype=torch.float64), [0])
    assert [m.training for m in model.modules()] == before


# (arguments of hessian(), the argument the error names): library terms, not config keys (the
# command line maps them: tests/test_errors.py).
ERRORS = {
    "index_out_of_range": (dict(outputs=[10]), "outputs"),
    "no_index": (dict(outputs=[]), "outputs"),
    "unknown_name": (dict(outputs="largest"), "outputs"),
    "loss_without_labels": (dict(outputs="loss"), "labels"),
    "label_out_of_range": (dict(outputs="loss", labels=torch.tensor([0, 1, 10])), "labels"),
    "mse_label_out_of_range": (
        dict(outputs="loss", labels=torch.tensor([0, 1, 10]), loss="mse"),
        "labels",
    ),
    "negative_label": (dict(outputs="loss", labels=torch.tensor([0, -1, 1])), "labels"),
    "unknown_loss": (dict(outputs="loss", labels=torch.zeros(3).long(), loss="l1"), "loss"),
    "row_out_of_range": (dict(outputs=[0], rows=[64]), "rows"),
    "unknown_method": (dict(outputs=[0], method="newton"), "method"),
}


@pytest.mark.parametrize("kwargs, argument", ERRORS.values(), ids=ERRORS.keys())
def test_user_errors_name_the_argument(kwargs, argument):
    model, x, _, _, _ = cached_case("digits_mlp", "index")
    with pytest.raises(ArgumentError, match=rf"\(argument: {argument}\)$") as caught:
        pipeline.hessian(model, x, **kwargs)
    assert isinstance(caught.value, ValueError) and caught.value.argument == argument
    assert "config key" not in str(caught.value) and "target." not in str(caught.value)


def test_an_unbatched_input_is_refused_in_one_line():
    """Issue 11, item 16: one sample without its batch axis gave a raw matmul shape error."""
    model, x, _, _, _ = cached_case("layernorm_gelu", "index")
    with pytest.raises(ArgumentError, match="batch") as caught:
        pipeline.hessian(model, x[0, 0], [0])
    assert caught.value.argument == "x"
    with pytest.raises(ArgumentError, match="fails on x of shape") as caught:
        pipeline.hessian(model, x[0], [0])  # (3, 4): read as 3 samples of 4 features
    assert caught.value.argument == "x"


def test_mse_regression_targets_of_shape_n_for_one_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.randn(3, dtype=torch.float64)
    h = pipeline.hessian(model, x, "loss", labels=y, loss="mse")
    h_ref, _ = reference(model, x, TARGET_BY_NAME["mse_soft"], y[:, None])
    assert_rel_close(h, h_ref, REL)


def test_an_exported_program_module_works_directly():
    """torch.export's .module() refuses eval()/train(); hessian() must still accept it."""
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 5)
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (x,), dynamic_shapes=({0: batch},))
    got = pipeline.hessian(program.module(), x, [1])
    want = pipeline.hessian(net, x, [1])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()


def test_a_forward_that_branches_on_values_falls_back_in_one_line(caplog):
    """torch.fx cannot capture data-dependent control flow and vmap over samples cannot follow
    it: auto says why in one line and the generic method goes sample by sample."""
    from tests.nets import Branching

    torch.manual_seed(3)
    model = Branching(6).double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="pipeline.hessian.methods"):
        h = pipeline.hessian(model, x, [1])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "forward_over_reverse" in lines[0] and "torch.fx" in lines[0]
    for n in range(3):
        ref = torch.autograd.functional.hessian(lambda v: model(v[None])[0, 1], x[n])
        assert_rel_close(h[n, 0], ref, REL)


def test_a_model_changed_in_place_is_not_served_its_old_output_width():
    """hessian() skips the forward pass for index targets once it knows the output width; a
    model whose last layer was replaced must still have its indices checked against the new one."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(2, 4, dtype=torch.float64)
    model.double()
    pipeline.hessian(model, x, [2])
    model[2] = torch.nn.Linear(8, 2).double()
    with pytest.raises(ValueError, match="out of range for a model with 2 outputs"):
        pipeline.hessian(model, x, [2])
    h = pipeline.hessian(model, x, [-1])
    ref = torch.autograd.functional.hessian(lambda v: model(v[None])[0, 1], x[0])
    torch.testing.assert_close(h[0, 0], ref, rtol=1e-10, atol=1e-12)
    from pipeline.hessian import diagonal

    diag, _ = diagonal(model, x, make_target([1], model(x).detach()))
    torch.testing.assert_close(diag[0, 0], torch.diagonal(ref), rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # new weights, same modules: the caches stay, the numbers follow
        model[0].weight.mul_(2.0)
    ref = torch.autograd.functional.hessian(lambda v: model(v[None])[0, 1], x[0])
    torch.testing.assert_close(pipeline.hessian(model, x, [1])[0, 0], ref, rtol=1e-10,
                               atol=1e-12)  # fmt: skip
