"""The adjoint W^T u of convolutions (``rules.conv_input``) against torch's input gradient, one
case a geometry: patch embeddings (stride = kernel, in one matrix product), the flipped-kernel
path (few input channels, stride 1) and the transposed convolution."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from pipeline.hessian.rules import conv_input

pytestmark = pytest.mark.usefixtures("float64_default")

_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
          3: torch.nn.grad.conv3d_input}  # fmt: skip


@dataclass(frozen=True)
class Geometry:
    name: str
    size: tuple[int, ...]  # the input's spatial size
    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int = 0
    dilation: int = 1
    groups: int = 1


CASES = [
    Geometry("vit_patches_2d", (32, 32), 3, 12, 8, 8),
    Geometry("mixer_patches_2d", (16, 16), 3, 5, 4, 4),
    Geometry("patches_1d", (12,), 2, 4, 3, 3),
    Geometry("patches_3d", (4, 4, 4), 2, 3, 2, 2),
    Geometry("patches_not_covering_the_input", (10, 10), 3, 4, 4, 4),  # a border left out
    Geometry("patches_padded", (8, 8), 3, 4, 4, 4, padding=1),
    Geometry("patches_grouped", (8, 8), 4, 4, 4, 4, groups=2),
    Geometry("flipped_stride_1", (9, 9), 3, 5, 3, 1, padding=1),
    Geometry("strided_overlapping", (9, 9), 3, 5, 3, 2, padding=1),
    Geometry("dilated", (9, 9), 3, 5, 3, 1, padding=2, dilation=2),
]


@pytest.mark.parametrize("g", CASES, ids=[c.name for c in CASES])
def test_conv_adjoint_matches_torchs_input_gradient(g: Geometry):
    torch.manual_seed(0)
    nsp = len(g.size)
    weight = torch.randn(g.c_out, g.c_in // g.groups, *(g.kernel,) * nsp)
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
            3: torch.nn.functional.conv3d}[nsp]  # fmt: skip
    x = torch.randn(5, g.c_in, *g.size)
    out = conv(x, weight, None, g.stride, g.padding, g.dilation, g.groups)
    u = torch.randn_like(out)
    got = conv_input(u, weight, g.size, g.stride, g.padding, g.dilation, g.groups)
    ref = _INPUT[nsp](list(x.shape), weight, u, g.stride, g.padding, g.dilation, g.groups)
    assert got.shape == ref.shape
    err = (got - ref).abs()
    worst = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
    assert err.max() <= 1e-12 * ref.abs().max(), f"{g.name}: entry {worst} off by {err.max():.2e}"
