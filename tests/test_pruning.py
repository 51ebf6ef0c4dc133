"""Steps whose outputs the output reads only in part compute that part (NOTE [pruning]): each
model of the table is narrowed or not as its output reads it, and its Hessians stay exact."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pipeline
from pipeline.hessian import graph
from tests.library_models import LIBRARY, unavailable
from tests.zoo import assert_rel_close, logit_reference

TOKENS, WIDTH = 5, 8


class Tokens(nn.Module):
    """A class token and a patch embedding, a block of attention and a GELU MLP, then ``read``
    of the block's tokens (B, T, C) to the logits; ``extra`` adds a constant along the tokens
    after the block; ``functional``: the MLP's first layer as ``F.linear`` of its weights."""

    def __init__(self, read: Callable[[nn.Module, Tensor], Tensor], extra: bool = False,
                 functional: bool = False):  # fmt: skip
        super().__init__()
        self.read, self.functional = read, functional
        self.embed = nn.Linear(3, WIDTH)
        self.cls = nn.Parameter(torch.randn(1, 1, WIDTH))
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 3)
        self.bias = nn.Parameter(torch.randn(1, TOKENS + 1, WIDTH)) if extra else None

    def forward(self, x: Tensor) -> Tensor:  # x (B, TOKENS, 3)
        z = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], 1)
        b, n, c = z.shape
        q, k, v = self.qkv(self.norm1(z)).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
        z = z + self.proj((a @ v).transpose(1, 2).reshape(b, n, c))
        h = self.norm2(z)
        h = F.linear(h, self.fc1.weight, self.fc1.bias) if self.functional else self.fc1(h)
        z = z + self.fc2(F.gelu(h))
        if self.bias is not None:
            z = z + self.bias
        return self.read(self, z)


@dataclass(frozen=True)
class Case:
    name: str
    read: Callable[[nn.Module, Tensor], Tensor]
    narrowed: bool  # whether the last block computes part of its tokens
    extra: bool = False
    functional: bool = False


CASES = [
    Case("class_token", lambda m, z: m.head(z[:, 0]), True),
    Case("last_token", lambda m, z: m.head(z[:, -1]), True),
    Case("token_range", lambda m, z: m.head(z[:, 2:4].sum(1)), True),
    Case("select", lambda m, z: m.head(z.select(1, 3)), True),
    Case("narrow_and_tanh", lambda m, z: torch.tanh(m.head(z.narrow(1, 1, 1)[:, 0])), True),
    Case("mean_of_tokens", lambda m, z: m.head(z.mean(1)), False),
    Case("token_and_mean", lambda m, z: m.head(z[:, 0] + z.mean(1)), False),
    Case("token_and_channel", lambda m, z: m.head(z[:, 0, :]) + z[:, :, 0].sum(1, True), False),
    Case("constant_along_tokens", lambda m, z: m.head(z[:, 0]), False, extra=True),
    Case("functional_linear", lambda m, z: m.head(z[:, 0]), True, functional=True),
]


def counted(model: nn.Module, x: Tensor) -> tuple[int, int]:
    """Multiply-adds counted by the steps as recorded, narrowed and as captured."""
    gm = graph.capture(model)
    whole = graph._record(gm, x)[0]
    return (sum(s.rule.macs for s in graph.record(gm, x).steps),
            sum(s.rule.macs for s in whole.steps))  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_narrowed_as_the_output_reads(case: Case):
    torch.manual_seed(0)
    model = Tokens(case.read, case.extra, case.functional).double().eval()
    x = torch.randn(3, TOKENS, 3, dtype=torch.float64)
    narrow, whole = counted(model, x)
    assert (narrow < 0.9 * whole) == case.narrowed, f"counted {narrow} of {whole}"
    if case.functional:  # narrowed as far as the same model with its module
        assert narrow == counted(Tokens(case.read).double().eval(), x)[0]
    h = pipeline.hessian(model, x, [0, 2], method="structured")
    h_ref, _ = logit_reference(model, x)
    assert_rel_close(h, h_ref[:, [0, 2]], 1e-9)


VITS = [m for m in LIBRARY if m.name in ("timm_vit", "tv_vit")]


@pytest.mark.parametrize("entry", VITS, ids=[m.name for m in VITS])
def test_library_vits_read_their_class_token_alone(entry):
    """timm's and torchvision's ViTs classify from the class token: their last block computes
    it alone (their Hessians, narrowed so, are checked against float64 in ``test_library``)."""
    reason = unavailable(entry.package)
    if reason:
        pytest.skip(reason)
    model = entry.build().double()
    x = torch.randn(2, *entry.shape, dtype=torch.float64)
    narrow, whole = counted(model, x)
    assert narrow < 0.9 * whole, f"counted {narrow} of {whole}"


TIMM = {  # timm's ViT variants at toy sizes: (keyword arguments, whether the last block narrows)
    "register_tokens": ({"reg_tokens": 2}, True),
    "distilled": ({"distilled": True}, True),
    "average_pool": ({"global_pool": "avg"}, False),
}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_vit_variants(name):
    """Other ways a ViT reads its tokens: two registers beside the class token, DeiT's class
    and distillation tokens (a range of two), and a mean over the patches (nothing to spare)."""
    reason = unavailable("timm")
    if reason:
        pytest.skip(reason)
    from pipeline.inputs.libraries import import_torchvision

    import_torchvision()
    from timm.models import deit, vision_transformer
    from torch.autograd.functional import hessian
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kwargs, narrowed = TIMM[name]
    kwargs = dict(kwargs)
    size = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    torch.manual_seed(0)
    if kwargs.pop("distilled", False):
        model = deit.VisionTransformerDistilled(**size, **kwargs)
    else:
        model = vision_transformer.VisionTransformer(**size, **kwargs)
    model = model.double().eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    narrow, whole = counted(model, x)
    assert (narrow < 0.9 * whole) == narrowed, f"counted {narrow} of {whole}"
    h = pipeline.hessian(model, x, [1], method="structured")
    with sdpa_kernel([SDPBackend.MATH]):
        ref = torch.stack([hessian(lambda u: model(u.unsqueeze(0))[0, 1], xn).reshape(768, 768)
                           for xn in x])  # fmt: skip
    assert_rel_close(h[:, 0], ref, 1e-9)


class _Twice(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return 2 * self.model(x)


def test_a_narrowed_graph_that_changes_the_output_is_not_kept(monkeypatch):
    """The narrowed graph is kept only where it gives the recorded output again: one that does
    not (here, twice the output) is dropped and the graph is recorded as captured."""
    from pipeline.hessian import pruning

    torch.manual_seed(0)
    model = Tokens(CASES[0].read).double().eval()
    x = torch.randn(2, TOKENS, 3, dtype=torch.float64)
    wrong = torch.fx.symbolic_trace(_Twice(Tokens(CASES[0].read).double().eval()))
    monkeypatch.setattr(pruning, "pruned", lambda *args: wrong)
    tape = graph.record(graph.capture(model), x)
    with torch.no_grad():
        assert torch.equal(tape.values[tape.output], model(x))
    assert graph._NARROWED[graph.capture(model)][(tuple(x.shape[1:]), x.dtype, "cpu")] is (
        graph.capture(model)
    )
