"""The local bottom schedule (NOTE [local] in ``pipeline/hessian/local.py``): window geometry
against brute force, and every local plan of conv nets with strides, padding, dilation, odd map
sizes, pools that overlap, pad or round up, and the places where the schedule goes dense, against
float64 autograd at 1e-9; each with the default dense threshold and with patches everywhere."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import hessian, make_target
from pipeline.hessian import local
from pipeline.hessian.graph import capture, record
from pipeline.hessian.planner import LOCAL, Plan, all_plans, head_kind, make_plan
from pipeline.hessian.propagate import gradients, hessian_rows
from pipeline.hessian.rows import Rows
from pipeline.hessian.rules import Sliding
from pipeline.hessian.structured import bytes_per_sample
from pipeline.hessian.windows import Blocks, Window, cells, extent
from tests.model_zoo import ZOO_BY_NAME, MnistNet
from tests.zoo import assert_close_to_max as assert_close

pytestmark = pytest.mark.usefixtures("float64_default")


# ---------------------------------------------------------------- geometry against brute force


def _reads(y: int, op: Sliding, a: int) -> range:
    """Input positions (unbounded) that output position y reads along axis a."""
    start = y * op.stride[a] - op.padding[a]
    return range(start, start + op.reach[a], op.dilation[a])


GEOMETRY = [
    Sliding((3,), (1,), (0,), (1,)), Sliding((3,), (1,), (1,), (1,)),
    Sliding((5,), (1,), (2,), (1,)), Sliding((2,), (2,), (0,), (1,)),
    Sliding((3,), (2,), (1,), (1,)), Sliding((3,), (1,), (2,), (2,)),
    Sliding((1,), (2,), (0,), (1,)), Sliding((2,), (3,), (0,), (1,)),
    Sliding((4,), (3,), (1,), (1,)),
]  # fmt: skip


@pytest.mark.parametrize("op", GEOMETRY, ids=lambda o: f"k{o.kernel}s{o.stride}p{o.padding}"
                         f"d{o.dilation}")  # fmt: skip
@pytest.mark.parametrize("scale, shift, size", [(6, 0, 6), (6, -3, 4), (12, 5, 3), (6, 2, 1)])
def test_cells_hold_every_output_that_reads_the_window(op, scale, shift, size):
    """For every block b: the outputs whose input windows meet the patch lie in ``cells``, and
    the inputs those outputs read lie in ``extent`` of it."""
    w = Window((scale,), (shift,), (size,), (40,), (4,))
    c = cells(w, op, (40,))
    e = extent(c, op, (40,))
    for b in range(4):
        lo = scale * b + shift
        patch = set(range(lo, lo + size))
        c_lo = c.scale[0] * b + c.shift[0]
        e_lo = e.scale[0] * b + e.shift[0]
        for y in range(-20, 40):
            if patch & set(_reads(y, op, 0)):
                assert c_lo <= y < c_lo + c.size[0], (b, y)
        for y in range(c_lo, c_lo + c.size[0]):
            assert all(e_lo <= i < e_lo + e.size[0] for i in _reads(y, op, 0))


def test_gather_and_scatter_against_loops():
    """Blocks.gather reads each row's window of a map (zero outside), scatter puts it back."""
    shape, block = (2, 7, 5), (2, 3)
    rows = torch.tensor([0, 4, 34, 35, 69, 17, 17])
    blocks = Blocks(rows, shape, block)
    w = Window((2, 3), (-2, 1), (4, 3), (6, 4), (4, 2))
    value = torch.randn(3, 2, 6, 4)
    got = blocks.gather(value, w)  # (3, R, 2, 4, 3)
    for i, r in enumerate(rows.tolist()):
        by, bx = (r % 35) // 5 // 2, (r % 5) // 3
        for p, q in itertools.product(range(4), range(3)):
            y, z = 2 * by - 2 + p, 3 * bx + 1 + q
            inside = 0 <= y < 6 and 0 <= z < 4
            expect = value[:, :, y, z] if inside else torch.zeros(3, 2)
            assert torch.equal(got[:, i, :, p, q], expect)
    dense = blocks.scatter(got * blocks.mask(w, got), w)
    for i, r in enumerate(rows.tolist()):
        by, bx = (r % 35) // 5 // 2, (r % 5) // 3
        expect = torch.zeros(3, 2, 6, 4)
        ys = slice(max(0, 2 * by - 2), min(6, 2 * by + 2))
        zs = slice(max(0, 3 * bx + 1), min(4, 3 * bx + 4))
        expect[:, :, ys, zs] = value[:, :, ys, zs]
        assert torch.equal(dense[:, i], expect)


# ---------------------------------------------------------------- every local plan against autograd


class Gated(nn.Module):
    """x * tanh(conv(x)): a product of branches inside the conv stack (runs densely)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 9 * 8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = x * torch.tanh(self.conv(x))
        return self.head(torch.sigmoid(self.conv(h)).flatten(1))


class Weighted(nn.Module):
    """conv -> times a constant map per position (no per-channel scale: runs densely) -> tanh."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.register_buffer("weight", torch.linspace(0.5, 2.0, 8 * 9).reshape(1, 8, 9))
        self.head = nn.Linear(2 * 8 * 9, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(torch.tanh(self.conv(x)) * self.weight).flatten(1))


class Block(nn.Module):
    """conv-BN-GELU-conv-BN + residual add, GELU (the ResNet block)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x + self.bn2(self.conv2(F.gelu(self.bn1(self.conv1(x))))))


def _bn(net: nn.Module) -> nn.Module:
    for bn in net.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 2)
    return net


def _head(n_out: int = 3) -> list[nn.Module]:
    """Flatten, a hidden tanh layer and the outputs (sized by the first call)."""
    return [nn.Flatten(), nn.LazyLinear(5), nn.Tanh(), nn.Linear(5, n_out)]


class Sin(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x)


@dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[[], nn.Module]
    shape: tuple[int, ...]
    outputs: object = (0, 2)


S = nn.Sequential
CASES = [
    # MNIST-like: valid convs, max pool 2 on an odd map (the last row and column dropped)
    Case("valid_maxpool_odd", lambda: S(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 3),
                                        nn.Tanh(), nn.MaxPool2d(2), *_head()),
         (1, 13, 11)),
    # LeNet-like: padded 5 x 5, average pools, softplus
    Case("padded_avgpool", lambda: S(nn.Conv2d(1, 2, 5, padding=2), nn.Softplus(),
                                     nn.AvgPool2d(2), nn.Conv2d(2, 3, 3), nn.Tanh(),
                                     nn.AvgPool2d(2), *_head()), (1, 12, 13)),
    Case("strided_conv", lambda: S(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                                   nn.Conv2d(3, 2, 3, padding=1), nn.Sigmoid(), *_head()),
         (2, 9, 7)),
    Case("overlapping_maxpool", lambda: S(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
                                          nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
                                          nn.SiLU(), *_head()), (1, 11, 10)),
    Case("maxpool_after_curved", lambda: S(nn.Conv2d(1, 2, 3), nn.ELU(), nn.Conv2d(2, 2, 3),
                                           nn.GELU(), nn.MaxPool2d(2, stride=1), nn.Tanh(),
                                           *_head()), (1, 12, 12)),
    Case("avgpool_padded_divisor", lambda: S(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.AvgPool2d(3, stride=2, padding=1),
        nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(),
        nn.AvgPool2d(2, divisor_override=3), *_head()), (1, 10, 11)),
    Case("dilated_grouped", lambda: S(nn.Conv2d(2, 4, 3, dilation=2, padding=1), nn.Tanh(),
                                      nn.Conv2d(4, 4, 3, groups=2), nn.Softplus(),
                                      *_head()), (2, 9, 9)),
    Case("residual_bn", lambda: _bn(S(nn.Conv2d(2, 3, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(3), nn.GELU(), Block(3),
                                      nn.AdaptiveAvgPool2d(1), *_head())), (2, 9, 8)),
    Case("conv1d", lambda: S(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.MaxPool1d(2), nn.Conv1d(3, 2, 3),
                             nn.Tanh(), nn.AvgPool1d(2), *_head()), (2, 21)),
    Case("conv3d", lambda: S(nn.Conv3d(1, 2, 3, padding=1), nn.Tanh(), nn.MaxPool3d(2),
                             nn.Conv3d(2, 2, 3, padding=1), nn.Sigmoid(), *_head()),
         (1, 5, 6, 4)),
    # the schedule goes dense: avg pools that are no window op here, a product of branches
    Case("dense_pools", lambda: S(nn.Conv2d(1, 2, 3), nn.Tanh(),
                                  nn.AvgPool2d(3, 2, padding=1, count_include_pad=False),
                                  nn.Tanh(), nn.AvgPool2d(2, ceil_mode=True), *_head()),
         (1, 12, 12)),
    # a max pool above the last curved step: its selection differs between samples, so J_L
    # comes from the adjoint sweeps there (NOTE [patch Jacobian])
    Case("maxpool_after_sin", lambda: S(nn.Conv2d(1, 2, 3), Sin(), nn.MaxPool2d(2), *_head()),
         (1, 10, 9)),
    Case("gated", Gated, (2, 9, 8)),
    Case("scaled_by_position", Weighted, (1, 10, 11)),
    Case("loss", lambda: S(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 3), nn.Tanh(),
                           nn.MaxPool2d(2), *_head(4)), (1, 11, 10), "loss"),
]  # fmt: skip


def _reference(model: nn.Module, x: Tensor, target, rows: Tensor) -> Tensor:
    """(N, K, R, D) by torch.autograd.functional.hessian per sample and output."""
    out = []
    for n in range(x.shape[0]):

        def f(v, n=n):
            return target.select(model(v.view(1, *x.shape[1:])).squeeze(0), target.aux[n])

        xf = x[n].reshape(-1)
        out.append(torch.stack([torch.autograd.functional.hessian(lambda v, j=j: f(v)[j], xf)[rows]
                                for j in range(target.n_outputs)]))  # fmt: skip
    return torch.stack(out)


def _corner_rows(shape: tuple[int, ...]) -> list[int]:
    """Rows at the corners and borders of the first and last channel, one inside, a repeat."""
    c, sp = shape[0], shape[1:]
    plane = math.prod(sp)
    corners = [sum(i * math.prod(sp[a + 1 :]) for a, i in enumerate(p))
               for p in itertools.product(*[(0, m - 1) for m in sp])]  # fmt: skip
    rows = corners + [(c - 1) * plane + i for i in corners] + [plane // 2 + 1, corners[-1]]
    return rows


@pytest.fixture(params=["default", "patches_everywhere"])
def dense_at(request, monkeypatch):
    if request.param == "patches_everywhere":
        monkeypatch.setattr(local, "DENSE_AT", math.inf)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_local_plan_matches_autograd(case: Case, dense_at):
    torch.manual_seed(0)
    model = case.factory().eval()
    x = torch.randn(2, *case.shape)
    z = model(x).detach()
    labels = torch.tensor([1, 0]) if case.outputs == "loss" else None
    outputs = "loss" if case.outputs == "loss" else list(case.outputs)
    target = make_target(outputs, z, labels)
    d = x[0].numel()
    with torch.no_grad():
        tape = record(capture(model), x)
        g_top, head = target.derivatives(tape.values[tape.output])
        g = gradients(tape, g_top)
        best = make_plan(tape, d, target.n_outputs, head_kind(target.kind))
        plans = [Plan(best.segments, cut, LOCAL, 0, best.zero)
                 for cut in range(len(best.segments) + 1)
                 if local.layout(tape, best.segments[cut].start if cut < len(best.segments)
                                 else len(tape.steps)) is not None]  # fmt: skip
    assert plans, "no local plan applies"
    for rows, full in ((torch.arange(d), True), (torch.tensor(_corner_rows(case.shape)), False)):
        h_ref = _reference(model, x, target, rows)
        with torch.no_grad():
            for plan in plans:
                h = hessian_rows(tape, plan, head, g, Rows(rows, full), target.n_outputs)
                assert_close(h, h_ref, rtol=1e-9, what=f"{case.name}, cut {plan.cut}")


def test_patches_are_used_where_they_pay():
    """The full-size MNIST tanh net: the planner takes the local schedule, with patches on both
    convolutions and the max pool."""
    entry = ZOO_BY_NAME["mnist_tanh"]
    torch.manual_seed(0)
    model = entry.factory().eval()
    x = torch.randn(2, *entry.shape)
    tape = record(capture(model), x)
    plan = make_plan(tape, 784, 1, head_kind("index"))
    assert plan.bottom == LOCAL
    lay = local.layout(tape, plan.cut_step)
    on_patches = {tape.steps[i].name for i in range(lay.last + 1)
                  if isinstance(lay.tangent[tape.steps[i].out], Window)}  # fmt: skip
    assert {"conv1", "conv2", "max_pool2d"} <= on_patches
    costs = {p.bottom: p.cost for p in all_plans(tape, 784, 1, head_kind("index"))
             if p.cut_step == plan.cut_step}  # fmt: skip
    assert costs[LOCAL] < costs["tangent"] / 3


def test_not_admissible_without_spatial_input_or_curvature_below():
    """An MLP (no spatial axes) and a cut with nothing curved below it get no local plan."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    tape = record(capture(mlp), torch.randn(2, 6))
    assert all(local.layout(tape, stop) is None for stop in range(len(tape.steps) + 1))
    net = MnistNet("tanh", side=14, c1=2, c2=2, hidden=4).eval()
    tape = record(capture(net), torch.randn(2, 1, 14, 14))
    assert local.layout(tape, 1) is None  # only conv1 below: no curvature
    assert local.layout(tape, 2) is not None


def test_chunks_of_samples_and_rows():
    """A small memory budget splits samples and rows (rows then not all in order: no kept
    index tensors); every chunk matches the whole call and autograd."""
    torch.manual_seed(0)
    model = MnistNet("tanh", side=14, c1=3, c2=4, hidden=8).eval()
    x = torch.randn(3, 1, 14, 14)
    target = make_target([1, 4], model(x).detach())
    tape = record(capture(model), x)
    plan = make_plan(tape, 196, 2, head_kind("index"))
    assert plan.bottom == LOCAL
    assert bytes_per_sample(tape, plan, 196, 2) > 16 << 18  # chunks of a few rows
    whole = hessian(model, x, [1, 4], method="structured")
    chunked = hessian(model, x, [1, 4], method="structured", memory_budget=1 << 18)
    assert_close(chunked, whole, rtol=1e-12, what="chunked")
    h_ref = _reference(model, x, target, torch.arange(196))
    assert_close(whole, h_ref, rtol=1e-9, what="whole")


def test_patch_jacobian_with_many_samples_a_call():
    """NOTE [patch Jacobian]: the planner takes J_L from the patches where the gathered weights
    are shared by enough samples (16 here, not 1); ``hessian`` then matches autograd and reads
    nothing back from the device."""
    torch.manual_seed(0)
    model = MnistNet("tanh", side=14, c1=4, c2=8, hidden=16).eval()
    x = torch.randn(16, 1, 14, 14)
    tape = record(capture(model), x[:2])
    one, many = (make_plan(tape, 196, 1, head_kind("index"), samples=n) for n in (1, 16))
    assert many.bottom == LOCAL and many.layout.head is not None
    assert one.layout is None or one.layout.head is None
    with torch.no_grad():
        hessian(model, x, [3], method="structured")  # analyses the model
        with torch.profiler.profile() as prof:
            h = hessian(model, x, [3], method="structured")
    found = {e.name for e in prof.events()} & {"aten::item", "aten::nonzero", "aten::is_nonzero"}
    assert not found, f"host synchronisation: {sorted(found)}"
    h_ref = _reference(model, x, make_target([3], model(x).detach()), torch.arange(196))
    assert_close(h, h_ref, rtol=1e-9, what="patch Jacobian")
