"""Structured second-order propagation against float64 references: a table of cases."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from pipeline import hessian, make_target
from pipeline.hessian import structured
from pipeline.hessian.methods import resolve_method
from pipeline.hessian.structured import build_chain, plan_split, structured_hessian
from tests.zoo import assert_close_to_max as assert_close

pytestmark = [
    pytest.mark.usefixtures("float64_default"),  # every case runs in float64
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),  # torch's note
]


def reference(model: nn.Module, x: Tensor, target, rows: Tensor) -> tuple[Tensor, Tensor]:
    """torch.autograd.functional.hessian / jacobian per sample and output: (N,K,R,D), (N,K,D)."""
    hs, gs = [], []
    for n in range(x.shape[0]):

        def f(v, n=n):
            return target.select(model(v.view(1, *x.shape[1:])).squeeze(0), target.aux[n])

        xf = x[n].reshape(-1)
        k = target.n_outputs
        hs.append(torch.stack([
            torch.autograd.functional.hessian(lambda v, j=j: f(v)[j], xf)[rows] for j in range(k)
        ]))  # fmt: skip
        gs.append(torch.autograd.functional.jacobian(f, xf))
    return torch.stack(hs), torch.stack(gs)


def mlp(act: Callable[[], nn.Module], d: int = 12, widths=(9, 7), out: int = 4) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for w in widths:
        layers += [nn.Linear(d, w), act()]
        d = w
    return nn.Sequential(*layers, nn.Linear(d, out))


def conv_net() -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, stride=2), nn.Tanh(),
        nn.Conv2d(3, 4, (3, 2), padding=(1, 0), dilation=(1, 2)), nn.BatchNorm2d(4), nn.SiLU(),
        nn.Flatten(), nn.Linear(4 * 3 * 1, 5), nn.Softplus(beta=2.0, threshold=0.5),
        nn.Linear(5, 3),
    )  # fmt: skip
    bn = net[3]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    return net


def randomize_batchnorm(net: nn.Module) -> nn.Module:
    """Running statistics and weights away from 0 and 1, so that BatchNorm is not an identity."""
    for bn in net.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 2)
    return net


def conv1d_net() -> nn.Sequential:
    """Conv1d with padding="same" and an even kernel (one more zero after than before)."""
    return nn.Sequential(
        nn.Conv1d(2, 3, 4, padding="same"), nn.Tanh(),
        nn.Conv1d(3, 3, 3, stride=2, padding=1, groups=3), nn.Softplus(),
        nn.Conv1d(3, 2, 2, padding="valid", dilation=2), nn.Flatten(), nn.Linear(6, 3),
    )  # fmt: skip


def conv3d_net() -> nn.Sequential:
    return randomize_batchnorm(nn.Sequential(
        nn.Conv3d(1, 2, 2, padding="same"), nn.BatchNorm3d(2), nn.GELU(),
        nn.Conv3d(2, 2, (2, 1, 2), stride=(1, 2, 1), padding=(0, 1, 1)), nn.Tanh(),
        nn.Flatten(), nn.Linear(2 * 2 * 3 * 5, 3),
    ))  # fmt: skip


def same_dilated_net() -> nn.Sequential:
    """padding="same" with dilation: (3 - 1) * 2 zeros split evenly, (2 - 1) * 3 unevenly."""
    return nn.Sequential(
        nn.Conv2d(1, 2, (3, 2), padding="same", dilation=(2, 3)), nn.SiLU(), nn.Flatten(),
        nn.Linear(2 * 4 * 5, 3),
    )  # fmt: skip


def prelu(channels: int = 1) -> nn.PReLU:
    """A PReLU with a different slope per channel."""
    act = nn.PReLU(channels)
    act.weight.data.uniform_(-0.5, 0.5)
    return act


def prelu_conv_net() -> nn.Sequential:
    """PReLU slopes per channel of (C, H, W) features, and one slope after the Linear."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), prelu(3), nn.Conv2d(3, 2, 2), nn.Tanh(), nn.Flatten(),
        nn.Linear(2 * 2 * 3, 4), prelu(), nn.Linear(4, 3), nn.Softplus(), nn.Linear(3, 2),
    )  # fmt: skip


def pool1d_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.AvgPool1d(3, stride=2, padding=1),
        nn.Softplus(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(3, 4), nn.Tanh(),
        nn.Linear(4, 2),
    )  # fmt: skip


def pool2d_net() -> nn.Sequential:
    """Average pools with a divisor override, zero padding (counted) and adaptive (None, 1)."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2, divisor_override=3),
        nn.Sigmoid(), nn.AvgPool2d(3, stride=1, padding=1), nn.SiLU(),
        nn.AdaptiveAvgPool2d((None, 1)), nn.Flatten(), nn.Linear(9, 3),
    )  # fmt: skip


def pool3d_net() -> nn.Sequential:
    return nn.Sequential(
        nn.AvgPool3d((1, 2, 2), stride=1), nn.Conv3d(1, 2, 2), nn.ELU(),
        nn.AdaptiveAvgPool3d((1, None, 1)), nn.Flatten(), nn.Linear(2 * 2, 3),
    )  # fmt: skip


def pool_first_net() -> nn.Sequential:
    """A pool as the first op: it acts on the one-hot basis of the rows."""
    return nn.Sequential(
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)
    )  # fmt: skip


def maxpool1d_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(2, 3, 2), nn.GELU(), nn.MaxPool1d(3, stride=2, dilation=2, ceil_mode=True),
        nn.Tanh(), nn.Flatten(), nn.Linear(9, 2),
    )  # fmt: skip


def maxpool2d_net() -> nn.Sequential:
    """The second pool's windows overlap: one input can be the maximum of several outputs."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 2),
        nn.Softplus(), nn.MaxPool2d(2, stride=1, padding=1), nn.Flatten(), nn.Linear(18, 3),
    )  # fmt: skip


def maxpool3d_first_net() -> nn.Sequential:
    return nn.Sequential(
        nn.MaxPool3d(2, stride=1), nn.Flatten(), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2)
    )  # fmt: skip


def channelless_pool_net() -> nn.Sequential:
    """Pools of (N, H, W) inputs (torch reads them as unbatched (C, H, W)): one channel each."""
    return nn.Sequential(
        nn.Tanh(), nn.AvgPool2d(2, stride=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 3),
        nn.Softplus(), nn.Linear(3, 2),
    )  # fmt: skip


@dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[[], nn.Module]
    shape: tuple[int, ...]
    outputs: object  # list of indices, "all", or "loss"
    loss: str = "cross_entropy"
    rows: tuple[int, ...] | None = None
    seed: int = 0
    # torch.func cannot differentiate PReLU twice under vmap (torch 2.13: both generic methods
    # raise), so the public API is compared with the autograd reference instead.
    generic: bool = True


CASES = [
    Case("tanh", lambda: mlp(nn.Tanh), (3, 4), [1]),
    Case("sigmoid", lambda: mlp(nn.Sigmoid), (12,), [0, 3]),
    Case("softplus", lambda: mlp(lambda: nn.Softplus(beta=1.5, threshold=1.0)), (12,), "all"),
    Case("gelu", lambda: mlp(nn.GELU), (12,), [2]),
    Case("gelu_tanh", lambda: mlp(lambda: nn.GELU("tanh")), (12,), [2], rows=(0, 5, 11)),
    Case("silu", lambda: mlp(nn.SiLU), (12,), "loss"),
    Case("elu", lambda: mlp(lambda: nn.ELU(0.7)), (12,), "loss", loss="mse"),
    Case("relu_ce", lambda: mlp(nn.ReLU), (12,), "loss"),
    Case("leaky_mse", lambda: mlp(lambda: nn.LeakyReLU(0.2)), (12,), "loss", loss="mse"),
    Case("narrow_input", lambda: mlp(nn.Tanh, d=3, widths=(16, 16)), (3,), "all"),
    Case("wide_input", lambda: mlp(nn.Tanh, d=150, widths=(6,)), (150,), [1, 2]),
    Case("wide_rows", lambda: mlp(nn.Tanh, d=150, widths=(6,)), (150,), "loss", rows=(3, 149)),
    Case("linear_ce", lambda: nn.Sequential(nn.Linear(5, 4)), (5,), "loss"),
    Case("conv", conv_net, (1, 5, 5), [0, 2]),
    Case("conv_ce", conv_net, (1, 5, 5), "loss", rows=(0, 7, 24)),
    Case("conv1d_same", conv1d_net, (2, 9), [0, 2]),
    Case("conv1d_mse", conv1d_net, (2, 9), "loss", loss="mse"),
    Case("conv3d_bn", conv3d_net, (1, 3, 3, 4), [1], rows=(0, 5, 17, 35)),
    Case("same_dilated", same_dilated_net, (1, 4, 5), "loss"),
    Case("prelu_mlp", lambda: mlp(lambda: prelu(9), widths=(9, 9)), (12,), "loss", generic=False),
    Case("prelu_conv", prelu_conv_net, (1, 5, 6), "all", generic=False),
    Case("prelu_conv_ce", prelu_conv_net, (1, 5, 6), "loss", rows=(1, 29), generic=False),
    Case("avgpool1d", pool1d_net, (2, 9), "all"),
    Case("avgpool2d", pool2d_net, (1, 6, 6), [0, 1], rows=(0, 7, 20, 35)),
    Case("avgpool2d_ce", pool2d_net, (1, 6, 6), "loss"),
    Case("avgpool3d", pool3d_net, (1, 3, 4, 4), [2]),
    Case("avgpool_first", pool_first_net, (1, 4, 4), [1]),
    Case("maxpool1d", maxpool1d_net, (2, 9), [0, 1]),
    Case("maxpool2d", maxpool2d_net, (1, 6, 6), "all", rows=(0, 8, 21, 35)),
    Case("maxpool2d_mse", maxpool2d_net, (1, 6, 6), "loss", loss="mse"),
    Case("maxpool3d_first", maxpool3d_first_net, (1, 3, 3, 3), [1]),
    Case("channelless_pools", channelless_pool_net, (5, 6), [0, 1]),
]


def _setup(case: Case):
    torch.manual_seed(case.seed)
    model = case.factory().eval()
    x = torch.randn(3, *case.shape)
    z = model(x).detach()
    labels = None
    if case.outputs == "loss":
        c = z.shape[1]
        labels = torch.randn(3, c) if case.loss == "mse" else torch.arange(3) % c
    target = make_target(case.outputs, z, labels, case.loss)
    d = x[0].numel()
    rows = torch.arange(d) if case.rows is None else torch.tensor(case.rows)
    return model, x, labels, target, rows


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_cut_matches_autograd(case: Case):
    model, x, _, target, rows = _setup(case)
    h_ref, g_ref = reference(model, x, target, rows)
    with torch.no_grad():
        ops, inputs, z = build_chain(model, x)
        lowest = plan_split(ops, len(rows), target.n_outputs, "zero")[0]
        sparse = max((i + 1 for i, op in enumerate(ops) if not getattr(op, "dense", True)),
                     default=0)  # fmt: skip
        assert lowest >= sparse
        for cut in range(sparse, len(ops) + 1):
            h, g = structured_hessian(ops, inputs, z, target, rows, cut)
            assert_close(h, h_ref, what=f"{case.name} hessian, cut {cut}")
            assert_close(g, g_ref, what=f"{case.name} gradient, cut {cut}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_public_api_matches_generic(case: Case):
    model, x, labels, target, rows = _setup(case)
    kw = dict(labels=labels, loss=case.loss, return_gradient=True)
    h, g = hessian(model, x, case.outputs, rows, method="structured", **kw)
    if case.generic:
        h_gen, g_gen = hessian(model, x, case.outputs, rows, method="reverse_over_reverse", **kw)
    else:
        h_gen, g_gen = reference(model, x, target, rows)
    assert_close(h, h_gen, what="structured vs generic hessian")
    assert_close(g, g_gen, what="structured vs generic gradient")


def test_symmetric_blocks_and_chunking():
    """D >= 512 uses the block-triangular product; a tiny budget forces sample and row chunks."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(520, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 520)
    h_gen = hessian(model, x, [0, 2], method="reverse_over_reverse")
    assert_close(hessian(model, x, [0, 2], method="structured"), h_gen, what="full")
    small = hessian(model, x, [0, 2], method="structured", memory_budget=1 << 16)
    assert_close(small, h_gen, what="chunked")


def test_sample_chunks_keep_their_max_positions():
    """Max-pool positions are per sample: each chunk of samples has its own."""
    torch.manual_seed(3)
    model = maxpool2d_net().eval()
    x = torch.randn(5, 1, 6, 6)
    whole = hessian(model, x, [0, 2], method="structured")
    one_by_one = hessian(model, x, [0, 2], method="structured", memory_budget=1 << 10)
    assert_close(one_by_one, whole, what="chunked")
    assert_close(whole, hessian(model, x, [0, 2], method="reverse_over_reverse"), what="whole")


def test_activation_derivatives_match_autograd():
    from pipeline.hessian.structured import activation_derivatives

    a = torch.linspace(-4, 4, 101)
    acts = [nn.Tanh(), nn.Sigmoid(), nn.Softplus(2.0, 3.0), nn.GELU(), nn.GELU("tanh"), nn.SiLU(),
            nn.ELU(1.3), nn.ReLU(), nn.LeakyReLU(0.1), nn.PReLU(init=-0.3)]  # fmt: skip
    for act in acts:
        d1, d2 = activation_derivatives(act, a)
        g = torch.func.vmap(torch.func.grad(lambda t, act=act: act(t)))(a)
        gg = torch.func.vmap(torch.func.grad(torch.func.grad(lambda t, act=act: act(t))))(a)
        assert_close(d1, g, what=f"{act} s'")
        assert_close(d2, gg, rtol=1e-12, what=f"{act} s''")


def seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


class ScaledLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


# (id, model, the method auto picks, a phrase of structured's reason when it refuses the model)
AUTO_CASES = [
    ("tanh_mlp", seq(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), "structured", None),
    ("gelu_cnn", seq(nn.Conv2d(1, 2, 3), nn.GELU(), nn.Flatten(), nn.Linear(8, 2)), "structured",
     None),
    ("relu_mlp", seq(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), "piecewise", None),
    ("hardswish", seq(nn.Linear(4, 3), nn.Hardswish(), nn.Linear(3, 2)), "forward_over_reverse",
     "Hardswish is not a supported layer"),
    ("same_padding", seq(nn.Conv2d(1, 2, 2, padding="same"), nn.Tanh()), "structured", None),
    ("conv1d_3d", seq(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Conv3d(2, 1, 1)), "structured", None),
    ("reflect_padding", seq(nn.Conv2d(1, 2, 3, padding_mode="reflect"), nn.Tanh()),
     "forward_over_reverse", "padding_mode='reflect'"),
    ("avg_pools", pool2d_net(), "structured", None),
    ("max_pool_tanh", seq(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2)), "structured", None),
    ("max_pool_indices", seq(nn.Tanh(), nn.MaxPool1d(2, return_indices=True)),
     "forward_over_reverse", "return_indices=True"),
    ("own_forward", seq(ScaledLinear(4, 3), nn.Tanh()), "forward_over_reverse",
     "a Linear subclass with its own forward"),
    ("prelu_tanh", seq(nn.Linear(4, 3), nn.PReLU(), nn.Linear(3, 3), nn.Tanh()), "structured",
     None),
    ("global_pool", seq(nn.Tanh(), nn.AdaptiveAvgPool2d(1)), "structured", None),
    ("adaptive_pool_2", seq(nn.Tanh(), nn.AdaptiveAvgPool2d(2)), "forward_over_reverse",
     "only sizes 1 and None"),
    ("ceil_mode", seq(nn.Tanh(), nn.AvgPool2d(2, ceil_mode=True)), "forward_over_reverse",
     "ceil_mode=True"),
    ("pad_not_counted", seq(nn.Tanh(), nn.AvgPool1d(3, padding=1, count_include_pad=False)),
     "forward_over_reverse", "count_include_pad=False"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("model", "expected", "refusal"), [pytest.param(*c[1:], id=c[0]) for c in AUTO_CASES]
)
def test_auto_picks(model, expected, refusal):
    target = make_target([0], torch.zeros(1, 2))
    assert resolve_method("auto", model, target).name == expected
    reason = structured.unsupported(model, target)
    if refusal is None:
        assert reason is None, reason
    else:
        assert refusal in (reason or "supported"), reason


def test_nested_sequential_with_shared_activation():
    torch.manual_seed(2)
    act = nn.Tanh()
    model = nn.Sequential(nn.Sequential(nn.Linear(5, 6), act), nn.Linear(6, 6), act,
                          nn.Linear(6, 2))  # fmt: skip
    x = torch.randn(2, 5)
    expected = hessian(model, x, "all", method="reverse_over_reverse")
    assert_close(hessian(model, x, "all", method="structured"), expected, what="nested")


def tanh_mlp(d: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    )


@pytest.mark.parametrize(
    "name, model, shape, outputs, expected",
    [
        # Wide input: M-propagation down to the first activation, one join, one symmetric product
        # (cut 2 would run three elementwise passes over R x 256 per output instead).
        ("mlp784 one logit", tanh_mlp(784), (784,), [2], 1),
        ("mlp784 ten logits", tanh_mlp(784), (784,), list(range(10)), 1),
        # Narrow input: forward tangents through the first hidden layer.
        ("mlp64 one logit", tanh_mlp(64), (64,), [2], 3),
        # Convolutions stay in the tangent part: the cut is above the last one (op 2).
        ("cnn", conv_net(), (1, 5, 5), [0], "above op 2"),
    ],
)
def test_plan_split_picks(name, model, shape, outputs, expected):
    model = model.to(torch.float64).eval()
    ops, _, z = build_chain(model, torch.zeros(1, *shape))
    d = torch.Size(shape).numel()
    cut = plan_split(ops, d, len(outputs), "zero")[0]
    ok = cut > 2 if expected == "above op 2" else cut == expected
    assert ok, f"{name}: cut {cut}, expected {expected}"
