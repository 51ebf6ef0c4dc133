"""Every rule the graph engine registers, under every curvature form above it and through every
schedule that accepts it, against float64 autograd; and a check that no registered rule lacks a
case here, so that a new rule cannot land untested.

The registry is read from ``pipeline.hessian.ops`` (its matcher tables and module classes) and
``pipeline.hessian.elementwise`` (every closed-form s', s''). Each case names what it covers; the
op sits between a Linear below (so that tangents are not the identity) and one of three tops:

* ``zero``:  a Linear head (M = 0 above the op),
* ``diag``:  tanh, then the head (M diagonal),
* ``dense``: Linear, tanh, then the head (M dense).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pipeline
from pipeline.hessian import blocks, elementwise, ops
from pipeline.hessian.planner import OUTER
from pipeline.hessian.propagate import gradients, hessian_rows
from pipeline.hessian.rows import Rows
from tests.zoo import HardAsClamp, assert_close_to_max, every_plan

pytestmark = pytest.mark.usefixtures("float64_default")
aten = torch.ops.aten
D = 6


class Body(nn.Module):
    """x (N, 6) -> Linear -> the op (``body``) -> its first 5 features -> one of three tops."""

    def __init__(self, body: Callable, top: str):
        super().__init__()
        self.body, self.top = body, top
        self.fc = nn.Linear(D, 8)
        self.mid = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        self.w = nn.Parameter(torch.randn(2, 2, 2, 2) / 2)  # conv (C_out, C_in, kh, kw)
        self.bn = nn.BatchNorm2d(2).eval()
        self.conv = nn.Conv2d(2, 2, 2, padding=1)
        self.avg, self.adaptive = nn.AvgPool2d(2, stride=1), nn.AdaptiveAvgPool2d(1)
        self.max = nn.MaxPool2d(2)
        self.drop, self.identity = nn.Dropout(0.5), nn.Identity()
        self.norm = nn.LayerNorm(8)
        self.softmax, self.log_softmax = nn.Softmax(1), nn.LogSoftmax(-1)
        self.flatten, self.unflatten = nn.Flatten(), nn.Unflatten(1, (2, 4))
        self.acts = nn.ModuleList(cls(*(() if cls is not nn.PReLU else (1, 0.2)))
                                  for cls, _, _ in ops._ELEMENTWISE_MODULES)  # fmt: skip
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def image(self, x: Tensor) -> Tensor:
        """(N, 2, 2, 2) from the Linear layer: a small two-channel image."""
        return self.fc(x).view(x.shape[0], 2, 2, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(self, x).flatten(1)[:, :5]
        if self.top == "diag":
            h = torch.tanh(h)
        elif self.top == "dense":
            h = torch.tanh(self.mid(h))
        return self.head(h)


def _positive(m: Body, x: Tensor) -> Tensor:
    return F.softplus(m.fc(x)) + 0.5


def _norms(m: Body, x: Tensor) -> Tensor:
    """2-norms in their forms, each recorded as a product, a sum and ``norm_root`` (NOTE [norms]
    in ``graph``)."""
    return torch.cat([
        torch.linalg.vector_norm(m.fc(x).view(-1, 4, 2), dim=-1),
        m.fc(x).norm(dim=1, keepdim=True),
        torch.norm(torch.tanh(m.fc(x)).view(-1, 2, 4), dim=(1,)),
        torch.linalg.norm(m.fc(x).view(-1, 2, 4), dim=2),
    ], 1)  # fmt: skip


# Elementwise functions by name, with the input they need (log, sqrt, ... on positive values).
ELEMENTWISE: dict[str, Callable[[Body, Tensor], Tensor]] = {
    "tanh": lambda m, x: torch.tanh(m.fc(x)),
    "sigmoid": lambda m, x: torch.sigmoid(m.fc(x)),
    "softplus": lambda m, x: F.softplus(m.fc(x), beta=2.0),
    "gelu": lambda m, x: F.gelu(m.fc(x)) + F.gelu(m.fc(x), approximate="tanh"),
    "silu": lambda m, x: F.silu(m.fc(x)),
    "elu": lambda m, x: F.elu(3 * m.fc(x), alpha=0.7),
    "relu": lambda m, x: F.relu(m.fc(x)) * torch.sin(m.fc(x)),
    "leaky_relu": lambda m, x: F.leaky_relu(m.fc(x), 0.2) * torch.sin(m.fc(x)),
    "prelu": lambda m, x: F.prelu(m.fc(x), torch.tensor([0.3])) * torch.sin(m.fc(x)),
    "hardtanh": lambda m, x: F.hardtanh(2 * m.fc(x)) * torch.sin(m.fc(x)),
    "relu6": lambda m, x: F.relu6(6 * m.fc(x)) * torch.sin(m.fc(x)),
    "hardsigmoid": lambda m, x: F.hardsigmoid(6 * m.fc(x)) * torch.sin(m.fc(x)),
    "hardswish": lambda m, x: F.hardswish(6 * m.fc(x)),
    "abs": lambda m, x: torch.abs(m.fc(x)) * torch.sin(m.fc(x)),
    "exp": lambda m, x: torch.exp(m.fc(x)),
    "log": lambda m, x: torch.log(_positive(m, x)),
    "sin": lambda m, x: torch.sin(m.fc(x)),
    "cos": lambda m, x: torch.cos(m.fc(x)),
    "pow": lambda m, x: m.fc(x) ** 3 + _positive(m, x) ** 1.5,
    "sqrt": lambda m, x: torch.sqrt(_positive(m, x)),
    "norm_root": lambda m, x: _norms(m, x),
    "rsqrt": lambda m, x: torch.rsqrt(_positive(m, x)),
    "reciprocal": lambda m, x: torch.reciprocal(_positive(m, x)),
    "square": lambda m, x: torch.square(m.fc(x)),
    "log_sigmoid": lambda m, x: F.logsigmoid(m.fc(x)),
    "softsign": lambda m, x: F.softsign(m.fc(x)),
    "mish": lambda m, x: F.mish(m.fc(x)),
}


@dataclass(frozen=True)
class RuleCase:
    """A body using registered rules: ``covers`` names them (canonical names of ``ops``, module
    classes, or ``"elementwise:<name>"``)."""

    name: str
    covers: tuple[str, ...]
    body: Callable[[Body, Tensor], Tensor]
    # Relative tolerance of the schedules that carry the Jacobian forward through the body
    # (``outer``) where the body rounds to float32 in between (``.float().double()``): autograd's
    # reference rounds the adjoints there, those schedules the Jacobians, each exact to float32.
    forward_rtol: float = 1e-9


def _tokens(m: Body, x: Tensor) -> Tensor:
    return torch.tanh(m.fc(x)).view(x.shape[0], 2, 4)  # (N, 2 tokens, 4 features)


CASES: list[RuleCase] = [
    *(RuleCase(f"elementwise_{n}", (f"elementwise:{n}", "elementwise"), f)
      for n, f in ELEMENTWISE.items()),
    RuleCase("linear_matmul_addmm", ("linear", "matmul", "addmm"), lambda m, x: torch.tanh(
        F.linear(m.fc(x), m.fc.weight.T) + m.fc(x) @ m.fc.weight) * torch.sin(
        torch.addmm(m.fc.bias[:6], m.fc(x), m.fc.weight))),
    RuleCase("bilinear_attention", ("matmul", "softmax", "transpose"), lambda m, x: (
        torch.softmax(_tokens(m, x) @ _tokens(m, x).transpose(1, 2) / 2, -1) @ _tokens(m, x))),
    RuleCase("conv_functional_and_aten", ("conv", "convolution", "conv_transpose"),
             lambda m, x: torch.tanh(F.conv2d(m.image(x), m.w, padding=1)) + aten.convolution(
                 torch.sin(m.image(x)), m.w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
             + F.conv_transpose2d(m.image(x), m.w, padding=1)),
    RuleCase("conv_module_pools", ("Conv2d", "avg_pool", "AvgPool2d", "AdaptiveAvgPool2d"),
             lambda m, x: torch.cat([
                 torch.tanh(m.conv(m.image(x))).flatten(1),
                 F.avg_pool2d(torch.tanh(m.image(x)), 2, stride=1, padding=1).flatten(1),
                 m.avg(torch.sin(m.image(x))).flatten(1),
                 m.adaptive(torch.tanh(m.image(x))).flatten(1),
                 F.adaptive_avg_pool2d(torch.sigmoid(m.image(x)), 1).flatten(1)], 1)),
    RuleCase("max_pool", ("max_pool", "MaxPool2d"), lambda m, x: torch.cat([
        F.max_pool2d(torch.sin(m.image(x)), 2, stride=1, padding=1).flatten(1),
        m.max(torch.tanh(m.image(x)) ** 2).flatten(1)], 1)),
    RuleCase("batch_norm_all_forms", ("batch_norm", "batch_norm_eval", "BatchNorm2d"),
             lambda m, x: torch.tanh(m.bn(m.image(x))) + F.batch_norm(
                 torch.sin(m.image(x)), m.bn.running_mean, m.bn.running_var, m.bn.weight,
                 training=False) + aten._native_batch_norm_legit_no_training(
                 m.image(x) ** 2, None, None, m.bn.running_mean, m.bn.running_var, 0.1,
                 1e-5)[0]),
    RuleCase("dropout_identity_cast", ("dropout", "identity", "cast", "Dropout", "Identity"),
             lambda m, x: m.drop(F.dropout(torch.tanh(m.fc(x)), 0.3, training=False)).clone()
             .float().double() + m.identity(torch.sin(m.fc(x))).contiguous(), 1e-7),
    RuleCase("shapes", ("reshape", "permute", "movedim", "flip", "Flatten", "Unflatten"),
             lambda m, x: m.flatten(m.unflatten(torch.tanh(m.fc(x))).permute(
                 0, 2, 1).movedim(1, 2).flip(1).roll(1, 2)) * torch.sin(m.fc(x))),
    RuleCase("pieces", ("getitem", "narrow", "select", "split", "slice", "cat", "pad"),
             lambda m, x: torch.cat([
                 torch.tanh(m.fc(x))[:, 1:4], torch.sin(m.fc(x)).narrow(1, 2, 2),
                 torch.stack([m.fc(x), m.fc(x) ** 2], 1).select(1, 1),
                 torch.tanh(m.fc(x)).split(3, 1)[1], aten.slice(torch.cos(m.fc(x)), 1, 0, 3),
                 F.pad(torch.tanh(m.fc(x)), (1, 1))], 1)),
    RuleCase("sums_and_means", ("sum",), lambda m, x: torch.cat([_tokens(m, x).sum(1) * torch.sin(
        m.fc(x)[:, :4]), torch.tanh(m.fc(x)).view(-1, 2, 4).mean(-1, keepdim=True).flatten(1)], 1)),
    RuleCase("gathers_and_reductions", ("getitem", "sum"), lambda m, x: torch.cat([
        torch.tanh(m.fc(x))[:, torch.tensor([[3, 0], [3, -1]])].flatten(1),  # repeats, negative
        (_tokens(m, x)[:, :, torch.tensor([1, 1, 2])] ** 2).sum((1, 2), keepdim=True)[:, 0],
        torch.mean(torch.sin(m.fc(x)).view(-1, 2, 4), dim=(-1, 1)).unsqueeze(1) * m.fc(x)],
        1)),  # fmt: skip
    RuleCase("arithmetic", ("add", "sub", "mul", "div", "neg", "pow"), lambda m, x: (
        -(torch.tanh(m.fc(x)) - 1.5) / 2.0 + m.fc(x) * torch.sin(m.fc(x)) * 3 - m.fc(x) ** 2)),
    RuleCase("layer_norm", ("layer_norm", "LayerNorm"), lambda m, x: torch.tanh(
        F.layer_norm(m.fc(x), (8,), m.fc.bias)) + m.norm(torch.sin(m.fc(x))) +
        F.layer_norm(_tokens(m, x), (4,)).flatten(1)),
    RuleCase("softmax_heads", ("softmax", "log_softmax", "Softmax", "LogSoftmax"),
             lambda m, x: F.log_softmax(m.fc(x), 1) + m.softmax(torch.tanh(m.fc(x))) +
             m.log_softmax(_tokens(m, x)).flatten(1) + torch.softmax(m.fc(x) ** 2, 1)),
    RuleCase("modules_elementwise", tuple(cls.__name__ for cls, _, _ in ops._ELEMENTWISE_MODULES),
             lambda m, x: sum(act(m.fc(x)) * torch.sin(m.fc(x)) for act in m.acts)),
    RuleCase("batch_axis_moved", ("moved_batch_axis",), lambda m, x: torch.tanh(
        m.fc(x)).view(-1, 2, 4).permute(1, 0, 2).unbind(0)[1].repeat(1, 2) * torch.sin(m.fc(x))),
    RuleCase("general_by_torch_func", ("general",), lambda m, x: F.normalize(m.fc(x), dim=1)),
    RuleCase("blocks_fixed_graph", ("blocks:merge", "blocks:rows", "blocks:getitem",
                                    "blocks:index_select", "blocks:index_add"),
             lambda m, x: _fixed_graph(m, x)),
    RuleCase("blocks_gather_scatter_forms", ("blocks:gather", "blocks:scatter_add",
                                             "blocks:index_put", "blocks:scatter_reduce"),
             lambda m, x: _gather_scatter_forms(m, x)),
    RuleCase("blocks_neighbour_list", ("blocks:getitem", "blocks:index_add", "blocks:padding"),
             lambda m, x: _neighbour_list(m, x)),
]  # fmt: skip


# The blocks cases (NOTE [blocks] in ``pipeline.hessian.blocks``): each sample's 8 features as
# 4 nodes of 2 features, the samples concatenated along one node axis, and a graph on them.
SRC, DST = torch.tensor([0, 1, 2, 3, 0, 2, 3]), torch.tensor([1, 2, 3, 0, 2, 0, 0])


def _nodes(m: Body, x: Tensor) -> Tensor:
    return torch.tanh(m.fc(x)).reshape(-1, 2)  # (4 N, 2)


def _edges(x: Tensor) -> tuple[Tensor, Tensor]:
    offsets = torch.arange(x.shape[0]).unsqueeze(-1) * 4
    return (SRC + offsets).reshape(-1), (DST + offsets).reshape(-1)


def _fixed_graph(m: Body, x: Tensor) -> Tensor:
    """Gathers onto a fixed graph's edges, products, and sums back onto the nodes."""
    h = _nodes(m, x)
    src, dst = _edges(x)
    msg = h[src] * torch.sin(h.index_select(0, dst)) + h[dst] ** 2
    out = torch.zeros_like(h).index_add_(0, dst, msg) + h.index_add(0, src, msg, alpha=0.5)
    return out.view(x.shape[0], -1)


def _gather_scatter_forms(m: Body, x: Tensor) -> Tensor:
    """torch.gather with an expanded index, scatter_add(_), index_put_ with accumulate and
    scatter_reduce (sum), and a sum of each sample's nodes onto the sample (scatter_add over the
    batch index into a fresh tensor of N rows)."""
    h = _nodes(m, x)
    src, dst = _edges(x)
    hs = torch.gather(h, 0, src.unsqueeze(-1).expand(-1, 2))
    msg = torch.tanh(hs) * h[dst]
    a = torch.zeros_like(h).scatter_add_(0, dst.unsqueeze(-1).expand_as(msg), msg)
    b = h.new_zeros(h.shape).index_put_((src,), msg**2, accumulate=True)
    c = torch.scatter_reduce(h, 0, dst.unsqueeze(-1).expand(-1, 2), msg, "sum")
    batch = torch.arange(x.shape[0]).repeat_interleave(4)
    per_sample = torch.zeros(x.shape[0], 2).scatter_add(0, batch.unsqueeze(-1).expand(-1, 2),
                                                        h * h)  # fmt: skip
    return torch.cat([(a + b + c).view(x.shape[0], -1), per_sample], 1)


def _neighbour_list(m: Body, x: Tensor) -> Tensor:
    """Edges kept by a value of the input (a different neighbour list per sample: padded
    blocks), taken by a boolean mask, gathered and summed back."""
    h = _nodes(m, x)
    src, dst = _edges(x)
    keep = (h[src] - h[dst]).abs().sum(-1) > 0.4
    src, dst = src[keep], dst[keep]
    msg = torch.sin(h[src]) * h[dst]
    return torch.zeros_like(h).index_add_(0, dst, msg).view(x.shape[0], -1) + torch.tanh(m.fc(x))


def registered() -> set[str]:
    """Every rule ``ops`` can hand out: its canonical names, its elementwise functions, the
    module classes with their own rules, and the general and moved-batch-axis paths."""
    names = set(ops._MAKERS) | {f"elementwise:{n}" for n in elementwise.DERIVATIVES}
    names |= {cls.__name__ for cls, _, _ in ops._ELEMENTWISE_MODULES}
    names |= {"Linear", "Conv2d", "AvgPool2d", "AdaptiveAvgPool2d", "MaxPool2d", "BatchNorm2d",
              "Dropout", "Identity", "LayerNorm", "Softmax", "LogSoftmax", "Flatten",
              "Unflatten", "general", "moved_batch_axis"}  # fmt: skip
    names |= {f"blocks:{n.rstrip('_')}" for n in blocks._GATHERS | blocks._SCATTERS}
    names |= {"blocks:merge", "blocks:rows", "blocks:padding"}
    return names


def test_every_registered_rule_has_a_case():
    covered = {c for case in CASES for c in case.covers} | {"Linear"}  # Body.fc is one
    missing = sorted(registered() - covered)
    assert not missing, f"registered rules without a case in tests/test_rule_table.py: {missing}"


def _reference(model: nn.Module, x: Tensor, outputs: list[int]) -> Tensor:
    """(N, K, D, D) by torch.autograd.functional.hessian, one sample and output at a time."""
    from torch.autograd.functional import hessian

    with HardAsClamp():
        return torch.stack([
            torch.stack([hessian(lambda u, k=k: model(u.unsqueeze(0))[0, k], xn)
                         for k in outputs])
            for xn in x
        ])  # fmt: skip


@pytest.mark.parametrize("top", ["zero", "diag", "dense"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule_under_every_curvature_and_schedule(case: RuleCase, top: str):
    torch.manual_seed(3)
    model = Body(case.body, top).eval()
    x = torch.randn(2, D)
    outputs = [0, 2]
    h_ref = _reference(model, x, outputs)
    z = model(x).detach()
    target = pipeline.make_target(outputs, z, None, "cross_entropy")
    with torch.no_grad():
        tape, _, plans = every_plan(model, x, target, D)
        g_top, head = target.derivatives(tape.values[tape.output])
        g = gradients(tape, g_top)
        for plan in plans:
            h = hessian_rows(tape, plan, head, g, Rows(torch.arange(D), True), len(outputs))
            what = f"{case.name}, top {top}, cut {plan.cut}, bottom {plan.bottom}"
            rtol = case.forward_rtol if plan.bottom == OUTER else 1e-9
            assert_close_to_max(h.expand_as(h_ref), h_ref, rtol, what)
    if math.prod(h_ref.shape) and h_ref.abs().max() == 0:
        pytest.fail(f"{case.name}, top {top}: the reference is all zero, the case tests nothing")


def test_blocks_cases_are_laid_out_as_they_say():
    """At the table's seed, the fixed graph's gathers and scatters have one index for all
    samples, and the neighbour list a different number of edges per sample (padded blocks)."""
    from pipeline.hessian.graph import capture, record
    from pipeline.hessian.rules import Gather, Scatter

    def steps(case: str):
        torch.manual_seed(3)
        model = Body(next(c for c in CASES if c.name == case).body, "dense").eval()
        tape = record(capture(model), torch.randn(2, D))
        return [s.rule for s in tape.steps if isinstance(s.rule, (Gather, Scatter))]

    fixed = steps("blocks_fixed_graph")
    assert fixed and all(r.index.shape[0] == 1 for r in fixed)
    listed = steps("blocks_neighbour_list")
    padded = [r for r in listed if isinstance(r, Scatter) and (r.index == r.size).any()]
    assert padded, [r.index for r in listed]
