"""Structured second-order propagation against float64 references: a table of cases."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from pipeline import hessian, make_target
from pipeline.hessian.errors import ArgumentError
from pipeline.hessian.graph import capture, record
from pipeline.hessian.methods import resolve_method
from pipeline.hessian.planner import make_plan
from pipeline.hessian.propagate import gradients, hessian_rows
from pipeline.hessian.rows import Rows
from pipeline.hessian.support import analyze
from tests.zoo import assert_close_to_max as assert_close
from tests.zoo import every_plan

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
def test_every_plan_matches_autograd(case: Case):
    """Every cut of the graph and every bottom schedule, not only the one the planner picks."""
    model, x, _, target, rows = _setup(case)
    h_ref, g_ref = reference(model, x, target, rows)
    full = case.rows is None
    with torch.no_grad():
        tape, best, plans = every_plan(model, x, target, len(rows))
        g_top, head = target.derivatives(tape.values[tape.output])
        g = gradients(tape, g_top)
        assert_close(g[0].reshape(g_ref.shape), g_ref, what=f"{case.name} gradient")
        for plan in plans:
            h = hessian_rows(tape, plan, head, g, Rows(rows, full), target.n_outputs)
            assert_close(h, h_ref, what=f"{case.name} hessian, cut {plan.cut} {plan.bottom}")


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


ELEMENTWISE = [
    ("tanh", {}), ("sigmoid", {}), ("softplus", {"beta": 2.0, "threshold": 3.0}), ("gelu", {}),
    ("gelu", {"approximate": "tanh"}), ("silu", {}), ("elu", {"alpha": 1.3}), ("relu", {}),
    ("leaky_relu", {"negative_slope": 0.1}), ("hardtanh", {"min_val": -0.5, "max_val": 2.0}),
    ("relu6", {}), ("abs", {}), ("exp", {}), ("sin", {}), ("cos", {}), ("square", {}),
    ("log_sigmoid", {}), ("softsign", {}), ("mish", {}),
]  # fmt: skip
POSITIVE = [("log", {}), ("sqrt", {}), ("rsqrt", {}), ("reciprocal", {}),
            ("pow", {"exponent": 2.5}), ("pow", {"exponent": -1.5})]  # fmt: skip
FUNCTIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": torch.nn.functional.softplus,
             "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
             "elu": torch.nn.functional.elu, "relu": torch.relu,
             "leaky_relu": torch.nn.functional.leaky_relu,
             "hardtanh": torch.nn.functional.hardtanh, "relu6": torch.nn.functional.relu6,
             "abs": torch.abs, "exp": torch.exp, "sin": torch.sin, "cos": torch.cos,
             "square": torch.square, "log_sigmoid": torch.nn.functional.logsigmoid,
             "softsign": torch.nn.functional.softsign, "mish": torch.nn.functional.mish,
             "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
             "reciprocal": torch.reciprocal, "pow": torch.pow}  # fmt: skip


_IDS = [f"{n}{i}" for i, (n, _) in enumerate(ELEMENTWISE + POSITIVE)]


@pytest.mark.parametrize(("name", "params"), ELEMENTWISE + POSITIVE, ids=_IDS)
def test_elementwise_derivatives_match_autograd(name, params):
    from pipeline.hessian.elementwise import derivatives

    a = torch.linspace(-4, 4, 101) if (name, params) in ELEMENTWISE else torch.linspace(0.1, 4, 101)
    a = a + 1e-3  # away from the kinks at 0

    def f(t):
        return FUNCTIONS[name](t, **params)

    d1, d2 = derivatives(name, a, **params)
    assert_close(d1, torch.func.vmap(torch.func.grad(f))(a), what=f"{name} s'")
    assert_close(d2, torch.func.vmap(torch.func.grad(torch.func.grad(f)))(a), rtol=1e-12,
                 what=f"{name} s''")  # fmt: skip


def seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


class ScaledLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


class Branching(nn.Module):
    """Control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)


class BatchCentred(nn.Module):
    """Subtracts the batch mean: a sample's output depends on the other samples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x - x.mean(0, keepdim=True)))


class BatchRolled(nn.Module):
    """Mixes samples without changing any shape: only a numerical check can see it."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x + 0.5 * torch.roll(x, 1, 0))


class RandomDropout(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.dropout(torch.tanh(x), 0.5)  # training=True by default


# (id, model, the method auto picks, a phrase of structured's reason when it refuses the model)
AUTO_CASES = [
    ("tanh_mlp", seq(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), "structured", None),
    ("relu_mlp", seq(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), "piecewise", None),
    ("hardswish_by_torch_func", seq(nn.Linear(4, 3), nn.Hardswish(), nn.Linear(3, 2)),
     "structured", None),
    ("reflect_padding", seq(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 3, padding=1,
                            padding_mode="reflect"), nn.Tanh(), nn.Flatten()), "structured", None),
    ("own_forward", seq(ScaledLinear(4, 3), nn.Tanh()), "structured", None),
    ("prelu_tanh", seq(nn.Linear(4, 3), nn.PReLU(), nn.Linear(3, 3), nn.Tanh()), "piecewise",
     None),  # a piecewise-linear body under a smooth head
    ("adaptive_pool_2", seq(nn.Unflatten(1, (1, 2, 2)), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten()), "structured", None),
    ("ceil_mode", seq(nn.Unflatten(1, (1, 2, 2)), nn.Tanh(), nn.AvgPool2d(3, ceil_mode=True),
                      nn.Flatten()), "structured", None),
    ("control_flow", Branching(), "forward_over_reverse", "cannot be traced"),
    ("batch_mean", BatchCentred(), "forward_over_reverse", "mixes the samples"),
    ("batch_roll", BatchRolled(), "forward_over_reverse", "other samples"),
    ("batch_statistics", seq(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False),
                             nn.Tanh()), None, "batch statistics"),
    ("random_dropout", RandomDropout(), None, "dropout is active"),  # None: no method can
]  # fmt: skip


@pytest.mark.parametrize(
    ("model", "expected", "refusal"), [pytest.param(*c[1:], id=c[0]) for c in AUTO_CASES]
)
def test_auto_picks(model, expected, refusal):
    model.double().eval()
    x = torch.randn(3, 4)
    target = make_target([0], model(x).detach())
    if expected is None:  # no method of the chain can: one line with each one's reason
        with pytest.raises(ArgumentError, match=f"no method can differentiate.*{refusal}"):
            resolve_method("auto", model, target, x)
        return
    assert resolve_method("auto", model, target, x).name == expected
    reason = analyze(model, x, target).structured
    if refusal is None:
        assert reason is None, reason
        h = hessian(model, x, [0], method=expected)
        assert_close(h, reference(model, x, target, torch.arange(4))[0], what=expected)
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
        # Wide convolutions stay in the tangent part: the cut is above the second one (step 2).
        (
            "cnn",
            seq(
                nn.Conv2d(1, 16, 3, stride=2, padding=1),
                nn.Tanh(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.Tanh(),
                nn.Flatten(),
                nn.Linear(32 * 7 * 7, 64),
                nn.Tanh(),
                nn.Linear(64, 10),
            ),
            (1, 28, 28),
            [0],
            "above step 2",
        ),
    ],
)
def test_plan_picks(name, model, shape, outputs, expected):
    model = model.to(torch.float64).eval()
    tape = record(capture(model), torch.zeros(2, *shape))
    d = torch.Size(shape).numel()
    plan = make_plan(tape, d, len(outputs), "zero")
    ok = plan.cut_step > 2 if expected == "above step 2" else plan.cut_step == expected
    assert ok, f"{name}: cut at step {plan.cut_step}, expected {expected}"


def test_triangle_product_equals_the_full_product():
    """The triangle form that benchmarks/plans.py times against one product (NOTE [symmetric
    product]) computes the same symmetric matrix."""
    from pipeline.hessian.products import triangle_product

    torch.manual_seed(5)
    w = torch.randn(7, 37)
    m = torch.randn(3, 2, 7, 7)
    u = w.T @ (m + m.mT)
    assert_close(triangle_product(u, w), u @ w, what="triangle")
