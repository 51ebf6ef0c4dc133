"""Property tests: for small random smooth architectures and input shapes, Hessians are symmetric
and equal the float64 autograd reference."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd.functional import hessian as reference_hessian

from pipeline import hessian

ACTS = {
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "elu": nn.ELU,
}


@st.composite
def cases(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    widths = draw(st.lists(st.integers(1, 6), min_size=0, max_size=3))
    acts = [draw(st.sampled_from(sorted(ACTS))) for _ in widths]
    n_out = draw(st.integers(1, 4))
    outputs = draw(st.lists(st.integers(0, n_out - 1), min_size=1, max_size=n_out, unique=True))
    n = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return shape, widths, acts, n_out, outputs, n, seed


def build(shape, widths, acts, n_out, seed) -> nn.Module:
    torch.manual_seed(seed)
    layers, width = [nn.Flatten()], math.prod(shape)
    for w, a in zip(widths, acts, strict=True):
        layers += [nn.Linear(width, w), ACTS[a]()]
        width = w
    return nn.Sequential(*layers, nn.Linear(width, n_out)).double()


@settings(max_examples=30, deadline=None)
@given(cases(), st.sampled_from(["auto", "forward_over_reverse", "reverse_over_reverse"]))
def test_symmetric_and_equal_to_reference(case, method):
    shape, widths, acts, n_out, outputs, n, seed = case
    model = build(shape, widths, acts, n_out, seed)
    x = torch.randn((n, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # linear nets (no hidden layer) warn about zeros
        h = hessian(model, x, outputs, method=method)
    d = math.prod(shape)
    assert h.shape == (n, len(outputs), d, d)
    assert torch.allclose(h, h.transpose(-1, -2), rtol=0, atol=1e-12)
    for i in range(n):
        for j, k in enumerate(outputs):
            ref = reference_hessian(lambda u, k=k: model(u.view(1, *shape))[0, k], x[i].reshape(-1))
            err = (h[i, j] - ref).abs().max().item()
            assert err <= 1e-10 * max(1.0, ref.abs().max().item()), (i, k, err)
