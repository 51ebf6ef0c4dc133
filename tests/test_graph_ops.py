"""Per-node rules of the graph engine, one small class-style model per kind of call, against
float64 autograd: functional calls, tensor methods, residual adds, products of branches, shape
ops, normalisations, ATen graphs of exported programs and calls that only torch.func knows."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import pipeline
from pipeline.hessian.graph import capture, record
from pipeline.hessian.rules import General
from tests.zoo import HardAsClamp, TargetCase, assert_rel_close, reference

pytestmark = pytest.mark.usefixtures("float64_default")


class Fn(nn.Module):
    """A model whose forward is ``body(self, x)`` with a few linear layers at hand."""

    def __init__(self, body: Callable, d: int = 6, hidden: int = 5, channels: int = 3):
        super().__init__()
        self.body = body
        self.fc = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 4)
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.w = nn.Parameter(torch.randn(channels, 1, 2, 2))
        self.gn = nn.GroupNorm(1, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self, x)


def _image(m, x):
    return x.view(x.size(0), 1, 2, 3)


@dataclass(frozen=True)
class OpCase:
    name: str
    body: Callable[[Fn, Tensor], Tensor]
    general: bool = False  # whether a step needs torch.func (no closed-form rule)


CASES = [
    OpCase("tanh_method_and_function", lambda m, x: m.out(m.fc(x).tanh() + torch.tanh(m.fc(x)))),
    OpCase("residual_add", lambda m, x: m.out(m.fc2(F.silu(m.fc(x))) + F.gelu(m.fc(x)))),
    OpCase("product_of_branches", lambda m, x: m.out(torch.sigmoid(m.fc(x)) * m.fc2(m.fc(x)))),
    OpCase("sub_neg_div_pow", lambda m, x: m.out(-(m.fc(x) - 1.5) / 2.0 + m.fc(x) ** 3)),
    OpCase("exp_log_sin_cos", lambda m, x: m.out(torch.log(torch.exp(m.fc(x)) + 1) *
                                                  torch.sin(m.fc(x)) + torch.cos(x[:, :5]))),
    OpCase("rsub_and_scalar_mul", lambda m, x: m.out(1 - 3 * F.softplus(m.fc(x), beta=2))),
    OpCase("in_place_relu_then_square", lambda m, x: m.out(F.relu(m.fc(x), inplace=True) ** 2)),
    OpCase("iadd_residual", lambda m, x: m.out(_iadd(m.fc(x), torch.tanh(m.fc(x))))),
    OpCase("cat_split_chunk", lambda m, x: m.out(_cat_split(m.fc2(m.fc(x))))),
    OpCase("pieces_of_a_middle_axis", lambda m, x: m.out(_pieces(m, x))),
    OpCase("overlapping_pieces", lambda m, x: m.out(_overlapping(torch.tanh(m.fc(x))))),
    OpCase("pieces_with_gaps", lambda m, x: m.out(torch.cat(
        [torch.sin(m.fc(x)).narrow(1, 1, 2), torch.tanh(m.fc(x)[:, 4:]) ** 2, x[:, 2:4]], 1))),
    OpCase("stack_mean_sum", lambda m, x: m.out(torch.stack(
        [m.fc(x).tanh(), m.fc(x).sigmoid()], dim=1).mean(1) + m.fc(x).sum(-1, keepdim=True))),
    OpCase("getitem_slices", lambda m, x: m.out(torch.tanh(m.fc(x))[:, [4, 0, 1, 2, 3]] +
                                               torch.tanh(x[:, 1:6]))),
    OpCase("view_permute_transpose", lambda m, x: m.out(
        torch.tanh(m.fc(x)).view(-1, 5, 1).permute(0, 2, 1).transpose(1, 2).flatten(1))),
    OpCase("functional_conv_pool", lambda m, x: m.out(F.avg_pool2d(torch.tanh(
        F.conv2d(_image(m, x), m.w, padding=1)), 2, stride=1, ceil_mode=True).flatten(1)[:, :5])),
    OpCase("conv_same_even", lambda m, x: m.out(torch.tanh(F.conv2d(
        _image(m, x), m.w, padding="same")).flatten(1)[:, :5])),
    OpCase("conv_module_max_pool", lambda m, x: m.out(F.max_pool2d(
        torch.tanh(m.conv(_image(m, x))), 2, stride=1).flatten(1)[:, :5])),
    OpCase("pad_and_transposed_conv", lambda m, x: m.out(torch.tanh(F.conv_transpose2d(
        F.pad(_image(m, x), (1, 0, 0, 1)), m.w.transpose(0, 1))).flatten(1)[:, 2:7])),
    OpCase("layer_norm_functional", lambda m, x: m.out(F.layer_norm(m.fc(x), (5,)) * 2)),
    OpCase("layer_norm_as_the_head", lambda m, x: F.layer_norm(m.out(torch.tanh(m.fc(x))), (4,),
                                                               m.out.bias)),
    OpCase("softmax_attention", lambda m, x: m.out(_attention(m.fc(x)))),
    OpCase("sdpa_by_rules", lambda m, x: m.out(_sdpa(m, x))),
    OpCase("sdpa_with_its_scale", lambda m, x: m.out(_sdpa(m, x, scale=0.7))),
    OpCase("sdpa_causal", lambda m, x: m.out(_sdpa(m, x, is_causal=True))),
    OpCase("sdpa_float_mask", lambda m, x: m.out(_sdpa(m, x, attn_mask=torch.arange(
        25.0).view(5, 5).cos()))),
    OpCase("sdpa_bool_mask", lambda m, x: m.out(_sdpa(m, x, attn_mask=torch.ones(
        5, 5, dtype=torch.bool).triu()))),
    OpCase("unbind_of_a_permute", lambda m, x: m.out(_split_heads(m.fc(x), rows=False))),
    OpCase("unbind_of_a_permute_in_blocks", lambda m, x: m.out(_split_heads(m.fc(x), rows=True))),
    OpCase("cat_with_a_constant_token", lambda m, x: m.out(torch.cat(
        [m.fc.bias.expand(x.shape[0], -1), torch.tanh(m.fc(x))], dim=1)[:, 3:8])),
    OpCase("log_softmax_head", lambda m, x: F.log_softmax(m.out(torch.tanh(m.fc(x))), dim=1)),
    OpCase("normalize_by_torch_func", lambda m, x: m.out(F.normalize(m.fc(x), dim=1)),
           general=True),
    OpCase("group_norm_by_torch_func", lambda m, x: m.out(torch.tanh(m.gn(
        m.conv(_image(m, x)))).flatten(1)[:, :5]), general=True),
    OpCase("hardswish_and_hardsigmoid", lambda m, x: m.out(F.hardswish(4 * m.fc(x)) *
                                                          F.hardsigmoid(4 * m.fc(x)) * m.fc(x))),
    OpCase("erf_by_torch_func", lambda m, x: m.out(torch.erf(m.fc(x)) * m.fc(x)), general=True),
    OpCase("quotient_of_branches", lambda m, x: m.out(m.fc(x) / (2 + torch.sigmoid(m.fc2(
        m.fc(x))))), general=True),
]  # fmt: skip


def _cat_split(h: Tensor) -> Tensor:
    a, b = h.split([2, 3], dim=1)
    c, d = torch.tanh(b).chunk(2, dim=1)  # sizes 2 and 1
    return torch.cat([a.sigmoid(), d, c], dim=1)


def _pieces(m: Fn, x: Tensor) -> Tensor:
    z = torch.stack([m.fc(x), torch.tanh(m.fc2(m.fc(x)))], dim=1)  # (N, 2, 5)
    a = z.narrow(2, 1, 3).sum(1)  # (N, 3)
    b = z.select(1, 1)  # (N, 5)
    c = z.chunk(2, dim=1)[0].squeeze(1)  # (N, 5)
    return torch.cat([a, b[:, :2]], 1) * torch.sigmoid(c)


def _overlapping(h: Tensor) -> Tensor:
    """Pieces that share entries (h[:, 2] is in both), one of them read twice."""
    a, b = h[:, :3], h[:, 2:]
    return torch.cat([a * b, torch.sigmoid(a[:, 2:]), b[:, :1] * a[:, :1]], 1)


def _iadd(a: Tensor, b: Tensor) -> Tensor:
    a += b
    return a


def _attention(h: Tensor) -> Tensor:
    """h (N, 5) as 5 tokens of 1 feature, attention of each token over the others."""
    t = h.unsqueeze(-1)  # (N, 5, 1)
    att = torch.softmax(t @ t.transpose(1, 2) / math.sqrt(1.0), dim=-1)
    return (att @ torch.tanh(t)).squeeze(-1)


def _split_heads(a: Tensor, rows: bool) -> Tensor:
    """q, k, v split as attention splits them (``permute(...).unbind(0)``, NOTE [unbind]), on
    batch-first values or, with ``rows``, on the 5 rows of every sample concatenated along axis 0
    (the windows of window attention, NOTE [blocks])."""
    qkv = torch.stack([a, torch.tanh(a), torch.sin(a)], dim=2)  # (N, 5, 3)
    if rows:
        q, k, v = qkv.reshape(-1, 3, 1).permute(1, 0, 2).unbind(0)  # each (N * 5, 1)
        return (q * torch.sigmoid(k) + v * v).reshape(-1, 5)
    q, k, v = qkv.unsqueeze(-1).permute(2, 0, 3, 1).unbind(0)  # each (N, 1, 5)
    return (q * torch.sigmoid(k) + v * v).flatten(1)


def _sdpa(m: Fn, x: Tensor, **kwargs) -> Tensor:
    """``F.scaled_dot_product_attention`` over 5 tokens, 2 heads: queries and keys of width 1,
    values of width 2, each from its own branch."""
    a = m.fc(x)
    b = m.fc2(torch.tanh(a))
    q = torch.stack([a, b], 1).unsqueeze(-1)  # (N, 2, 5, 1)
    k = torch.stack([b, torch.sin(a)], 1).unsqueeze(-1)
    v = torch.stack([torch.stack([a, b], -1), torch.stack([b * b, a], -1)], 1)  # (N, 2, 5, 2)
    return F.scaled_dot_product_attention(q, k, v, **kwargs).sum((1, 3))


def plain_reference(model: nn.Module, x: Tensor, outputs: list[int]) -> tuple[Tensor, Tensor]:
    """Hessians (N, K, D, D) and gradients by ``torch.autograd.functional`` without vmap (some
    double backwards, GroupNorm's, cannot be vmapped)."""
    from torch.autograd.functional import hessian, jacobian

    hs, gs = [], []
    for xn in x:
        fs = [lambda u, k=k: model(u.unsqueeze(0))[0, k] for k in outputs]
        with HardAsClamp():  # torch cannot differentiate its hardswish twice
            hs.append(torch.stack([hessian(f, xn) for f in fs]))
            gs.append(torch.stack([jacobian(f, xn) for f in fs]))
    return torch.stack(hs), torch.stack(gs)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule_matches_autograd(case: OpCase):
    torch.manual_seed(1)
    model = Fn(case.body).eval()
    x = torch.randn(3, 6)
    h, g = pipeline.hessian(model, x, [0, 2], method="structured", return_gradient=True)
    with sdpa_kernel([SDPBackend.MATH]):  # (the fused attention has no double backward)
        h_ref, g_ref = plain_reference(model, x, [0, 2])
    assert_rel_close(h, h_ref, 1e-9)
    assert_rel_close(g, g_ref, 1e-9)
    tape = record(capture(model), x)
    general = [s.name for s in tape.steps if isinstance(s.rule, General)]
    assert bool(general) == case.general, f"steps by torch.func: {general}"


def test_exported_program_graph_of_aten_ops():
    """A torch.export program traces to ATen ops (linear, conv2d, max_pool2d, log_softmax):
    the graph path handles it and matches the eager model."""
    torch.manual_seed(2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 2 * 2, 5)

        def forward(self, x):
            h = F.max_pool2d(torch.tanh(self.conv(x)), 2)
            return F.log_softmax(self.fc(torch.flatten(h, 1)), dim=1)

    net = Net().eval()
    x = torch.randn(3, 1, 6, 6)
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (x,), dynamic_shapes=({0: batch},)).module()
    h = pipeline.hessian(program, x, [1], method="structured")
    h_ref, _ = reference(net, x, TargetCase("one", [1]), None)
    assert_rel_close(h, h_ref, 1e-9)


class Attention(nn.Module):
    """torch's own attention modules: nn.MultiheadAttention is written as its projections and
    attention by rules where its call is the plain case (``need_weights=False``, or weights
    unused), and stays whole where its weights are read (``weighted``); nn.TransformerEncoderLayer
    stays whole (a leaf module) and gets its derivatives from torch.func; their fused attention
    kernels have neither forward-mode AD nor a double backward, the math kernel has both."""

    def __init__(self, weighted: bool = False):
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.weighted = weighted

    def forward(self, x):
        h, w = self.att(x, x, x, need_weights=self.weighted)
        if self.weighted:
            h = h * w.sum(-1, keepdim=True)
        return self.head(self.enc(h + x).mean(1))


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weights_read"])
def test_torch_attention_modules(weighted):
    torch.manual_seed(4)
    model = Attention(weighted).eval()
    x = torch.randn(2, 4, 8)
    h = pipeline.hessian(model, x, [1], method="structured")
    with sdpa_kernel([SDPBackend.MATH]):  # the reference needs a double backward too
        h_ref, _ = plain_reference(model, x, [1])
    general = [s.name for s in record(capture(model), x).steps if isinstance(s.rule, General)]
    # the attention module's steps (its two outputs) are general only where its weights are read
    assert general[-1] == "enc" and (len(general) > 1) == weighted, general
    assert_rel_close(h, h_ref.reshape(h.shape), 1e-9)
