"""``method=autograd`` (plain double backward) on models no transform can take, against float64
references: TorchScript, neighbour lists built with ``nonzero``, caches and in-place buffers,
samples coupled in the batch, backward functions without ``vmap`` support."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

import pipeline
from pipeline.hessian import double_backward, methods
from pipeline.hessian.errors import ArgumentError
from pipeline.hessian.targets import make_target
from tests.zoo import assert_close_to_max

REL = 1e-9


class Mlp(nn.Module):
    def __init__(self, d: int = 6, out: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, out))

    def forward(self, x):
        return self.net(x.flatten(1))


class ScriptedInside(nn.Module):
    """A Python module around a TorchScript one, as e3nn builds its parts inside MACE."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.body = torch.jit.script(nn.Sequential(nn.Linear(d, 16), nn.Tanh()))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


class NeighbourList(nn.Module):
    """A pair potential over the pairs closer than a cutoff, found with ``nonzero`` on the
    positions (B, n, 3): value-dependent shapes, as TorchANI's neighbour list. ``scripted``: its
    pair MLP compiled with TorchScript (then only plain autograd takes it)."""

    def __init__(self, cutoff: float = 2.5, scripted: bool = False):
        super().__init__()
        self.cutoff = cutoff
        self.mlp = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        if scripted:
            self.mlp = torch.jit.script(self.mlp)

    def forward(self, pos):
        b, n, _ = pos.shape
        flat = pos.reshape(b * n, 3)
        sample = torch.arange(b, device=pos.device).repeat_interleave(n)
        dist = torch.cdist(flat.detach(), flat.detach())
        close = (dist < self.cutoff) & (sample[:, None] == sample[None, :])
        i, j = torch.triu(close, diagonal=1).nonzero(as_tuple=True)
        r = (flat[i] - flat[j]).norm(dim=-1, keepdim=True)
        cut = 0.5 * (torch.cos(torch.pi * r / self.cutoff) + 1)
        pair = self.mlp(r) * cut
        energy = torch.zeros(b, 1, dtype=pos.dtype, device=pos.device)
        return energy.index_add(0, sample[i], pair)


class Cached(nn.Module):
    """Keeps a tensor computed on its first call in an attribute, and counts its calls in an
    in-place buffer."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.fc = nn.Linear(d, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self._scale = None

    def forward(self, x):
        self.calls += 1
        if self._scale is None:
            self._scale = torch.linspace(0.5, 1.5, 4, dtype=x.dtype)
        h = self.fc(x)
        return torch.sin(h).mul_(self._scale) + (2 * h).tanh_() ** 2


class Centred(nn.Module):
    """Centres each batch on its mean: a sample's output depends on the others in its batch."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.net = Mlp(d)

    def forward(self, x):
        return self.net(torch.tanh(x - x.mean(0, keepdim=True) + x))


class _Cube(torch.autograd.Function):
    """x^3, whose gradient is the function below."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _CubeGradient.apply(g, x)


class _CubeGradient(torch.autograd.Function):
    """3 g x^2, with a backward that branches on its input's values: ``vmap`` (and so
    ``is_grads_batched``) cannot run it, a plain second backward can."""

    @staticmethod
    def forward(ctx, g, x):
        ctx.save_for_backward(g, x)
        return 3 * g * x * x

    @staticmethod
    def backward(ctx, u):
        g, x = ctx.saved_tensors
        if bool((u == 0).all()):
            return torch.zeros_like(g), torch.zeros_like(x)
        return 3 * u * x * x, 6 * u * g * x


class NoVmapBackward(nn.Module):
    def __init__(self, d: int = 6):
        super().__init__()
        self.fc = nn.Linear(d, 3)

    def forward(self, x):
        return self.fc(_Cube.apply(torch.tanh(x)))


class PairDistances(nn.Module):
    """A sum over ``torch.cdist``'s distances: its backward has no derivative in torch 2.13, so
    autograd cannot differentiate it twice and every method must refuse it."""

    def forward(self, pos):
        return torch.tanh(torch.cdist(pos, pos)).sum((1, 2)).unsqueeze(1)


def _molecules(b: int, n: int = 5) -> Tensor:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(n, 3, generator=gen, dtype=torch.float64) * 1.2
    return base + 0.1 * torch.randn(b, n, 3, generator=gen, dtype=torch.float64)


# (name, factory, inputs (N, *S), outputs, whether samples may share a forward, batched backward)
CASES = [
    ("mlp", Mlp, lambda: torch.randn(4, 6, dtype=torch.float64), [0, 2], True, True),
    (
        "script_whole",
        lambda: torch.jit.script(Mlp()),
        lambda: torch.randn(3, 6, dtype=torch.float64),
        [1],
        True,
        True,
    ),
    (
        "script_inside",
        ScriptedInside,
        lambda: torch.randn(3, 6, dtype=torch.float64),
        [0, 1],
        True,
        True,
    ),
    (
        "neighbour_list_scripted",
        lambda: NeighbourList(scripted=True),
        lambda: _molecules(3),
        [0],
        True,
        True,
    ),  # fmt: skip
    ("neighbour_list", NeighbourList, lambda: _molecules(3), [0], True, True),
    ("cached_inplace", Cached, lambda: torch.randn(3, 6, dtype=torch.float64), [0, 3], True, True),
    ("coupled_batch", Centred, lambda: torch.randn(3, 6, dtype=torch.float64), [2], False, True),
    (
        "no_vmap_backward",
        NoVmapBackward,
        lambda: torch.randn(3, 6, dtype=torch.float64),
        [1],
        True,
        False,
    ),  # fmt: skip
]


def _reference(model: nn.Module, x: Tensor, outputs: list[int]) -> Tensor:
    """(N, K, D, D): each sample alone (a batch of one), each output, by autograd.functional."""
    shape = x.shape[1:]
    return torch.stack([
        torch.stack([
            torch.autograd.functional.hessian(
                lambda v, k=k: model(v.view(1, *shape))[0, k], xn.reshape(-1)
            )
            for k in outputs
        ])
        for xn in x
    ])  # fmt: skip


@pytest.mark.parametrize("budget", [None, 1], ids=["default_budget", "one_row_per_call"])
@pytest.mark.parametrize("name, factory, inputs, outputs, shared, batched", CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_autograd_method_matches_float64(name, factory, inputs, outputs, shared, batched, budget):
    torch.manual_seed(0)
    model = factory().double().eval()
    x = inputs()
    h = pipeline.hessian(model, x, outputs, method="autograd", memory_budget=budget)
    assert_close_to_max(h, _reference(model, x, outputs), REL, name)
    plan = next(iter(double_backward._PLANS[model].values()))
    assert (plan.shared, plan.batched) == (shared, batched), plan


@pytest.mark.parametrize("name, factory, inputs, outputs", [c[:4] for c in CASES[1:4]],
                         ids=[c[0] for c in CASES[1:4]])  # fmt: skip
def test_auto_walks_to_autograd_where_nothing_else_can(name, factory, inputs, outputs, caplog):
    """TorchScript, also beside a ``nonzero`` neighbour list: ``auto`` ends in plain autograd
    and says why in one line; exact."""
    torch.manual_seed(0)
    model = factory().double().eval()
    x = inputs()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        h = pipeline.hessian(model, x, outputs)
    assert_close_to_max(h, _reference(model, x, outputs), REL, name)
    used = [r.message for r in caplog.records if r.message.startswith("method=auto uses")]
    assert used and all("\n" not in m for m in used)
    assert used[-1].startswith("method=auto uses autograd"), used
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        pipeline.hessian(model, x, outputs)  # the choice is known: nothing said again
    assert [r.message for r in caplog.records if r.message.startswith("method=")] == []


def test_torchscript_is_never_transformed_by_torch_func():
    """vmap of jvp through a scripted module gave wrong numbers (5e-2 in float64) on the graph
    path; such models are taken by autograd alone, and the torch.func methods refuse them."""
    torch.manual_seed(0)
    model = ScriptedInside().double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    target = make_target([0], model(x))
    assert methods.choose_method("auto", model, target, x).name == "autograd"
    for name in ("structured", "forward_over_reverse", "reverse_over_reverse"):
        with pytest.raises(ArgumentError, match="TorchScript modules \\('body'\\)"):
            pipeline.hessian(model, x, [0], method=name)


def test_generic_memory_estimate_needs_no_module_hooks():
    """ScriptModules refuse forward hooks; the estimate counts what autograd saves instead."""
    model = torch.jit.script(Mlp()).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    assert methods._directions(model, x, 1, 1 << 20) >= 1


@pytest.mark.parametrize("outputs, labels, loss", [
    ([0, 1], None, "cross_entropy"),
    ("loss", torch.tensor([0, 2, 1]), "cross_entropy"),
    ("loss", torch.tensor([1, 0, 2]), "mse"),
])  # fmt: skip
def test_autograd_gradients_and_losses(outputs, labels, loss):
    torch.manual_seed(1)
    model = Mlp().double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    h, g = pipeline.hessian(model, x, outputs, method="autograd", labels=labels, loss=loss,
                            return_gradient=True)  # fmt: skip
    ref_h, ref_g = pipeline.hessian(model, x, outputs, method="reverse_over_reverse",
                                    labels=labels, loss=loss, return_gradient=True)  # fmt: skip
    assert_close_to_max(h, ref_h, REL, "hessian")
    assert_close_to_max(g, ref_g, REL, "gradient")


class ZeroCurvature(nn.Module):
    """Output 0 is linear in x, output 1 does not depend on x at all."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return torch.cat([self.fc(x), torch.ones_like(x[:, :1]).detach()], dim=1)


def test_linear_and_constant_outputs_give_zeros_not_errors():
    model = ZeroCurvature().double().eval()
    x = torch.randn(2, 4, dtype=torch.float64)
    h, g = pipeline.hessian(model, x, [0, 1], method="autograd", return_gradient=True)
    assert torch.equal(h, torch.zeros_like(h))
    assert torch.allclose(g[:, 0], model.fc.weight.expand(2, 4)) and not g[:, 1].any()


def test_refused_only_when_autograd_cannot_differentiate_twice():
    x = _molecules(2)
    with pytest.raises(ArgumentError) as err:
        pipeline.hessian(PairDistances(), x, [0])
    message = str(err.value)
    assert "\n" not in message and message.startswith("no method can differentiate the model")
    for name in ("forward_over_reverse", "reverse_over_reverse", "autograd"):
        assert f"{name} failed on a probe" in message, name
    assert "the derivative for '_cdist_backward' is not implemented" in message
    assert message.endswith(
        "(the last method, plain torch.autograd, must be able to differentiate the forward twice) "
        "(argument: model)"
    )


def test_chunks_fit_the_budget():
    """Samples share a forward first, then rows are batched within the budget and while a call
    sweeps less than BATCHED_WORK bytes of graph."""
    plan = double_backward.Plan(graph_bytes=1000, batched=True, shared=True)
    d_bytes = 100
    per = 1000 + 2 * d_bytes
    chunks = double_backward.chunks
    assert chunks(plan, 10, 50, d_bytes, 1) == (1, 1)
    assert chunks(plan, 10, 50, d_bytes, 2 * 7 * per) == (7, 1)  # the graph takes half
    assert chunks(plan, 10, 50, d_bytes, 2 * 30 * per) == (10, 3)  # 30 seeds: 3 rows x 10
    assert chunks(plan, 10, 50, d_bytes, 1 << 40) == (10, 50)
    big = double_backward.Plan(graph_bytes=double_backward.BATCHED_WORK // 4, batched=True,
                               shared=True)  # fmt: skip
    assert chunks(big, 8, 50, d_bytes, 1 << 40) == (8, 1)  # a loop over rows
    assert chunks(big, 1, 50, d_bytes, 1 << 40) == (1, 3)
    unshared = double_backward.Plan(1000, True, False)
    assert chunks(unshared, 10, 50, d_bytes, 1 << 40) == (1, 50)
    looped = double_backward.Plan(1000, False, True)
    assert chunks(looped, 10, 50, d_bytes, 1 << 40) == (10, 1)


class Detached(nn.Module):
    """Part of the output computed from ``x.detach()`` (``whole``: all of it): autograd would
    return zeros for that part, silently; the probe compares with differences and refuses."""

    def __init__(self, whole: bool):
        super().__init__()
        self.whole = whole
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        hidden = torch.tanh(self.fc(x.detach()))
        return hidden if self.whole else hidden + torch.tanh(self.fc(x))


@pytest.mark.parametrize("whole", [True, False], ids=["all_detached", "partly_detached"])
def test_a_forward_outside_autograd_is_refused_not_zero(whole):
    torch.manual_seed(0)
    model = torch.jit.script(Detached(whole)).double().eval()  # (autograd is the only method)
    with pytest.raises(ArgumentError, match="autograd does not see how the output depends on"):
        pipeline.hessian(model, torch.randn(2, 6, dtype=torch.float64), [0])


@pytest.mark.parametrize("name, factory, inputs, outputs", [c[:4] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_products_for_lanczos_match_float64(name, factory, inputs, outputs):
    """H_k v by double backward (the block Lanczos products of models only autograd takes)."""
    torch.manual_seed(0)
    model = factory().double().eval()
    x = inputs()
    target = make_target(outputs, model(x).detach())
    d = x.shape[1:].numel()
    v = torch.randn(len(x), len(outputs), 3, d, dtype=torch.float64)
    got = double_backward.products(model, x, target)(v)
    expected = v @ _reference(model, x, outputs)  # H symmetric: v H = (H v^T)^T
    assert_close_to_max(got, expected, REL, name)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "mass_weighted"])
@pytest.mark.parametrize("path", ["dense", "lanczos"])
def test_eigenpairs_of_a_model_only_autograd_takes(path, weighted):
    """``eigen`` on the scripted neighbour-list potential (``auto`` ends in autograd): the dense
    path from its rows, block Lanczos from ``double_backward.products``; against eigh."""
    from pipeline.hessian import eigen

    torch.manual_seed(0)
    model = NeighbourList(scripted=True).double().eval()
    x = _molecules(2)
    target = make_target([0], model(x).detach())
    assert methods.choose_method("auto", model, target, x).name == "autograd"
    d = x[0].numel()
    masses = torch.linspace(1.0, 16.0, d // 3, dtype=torch.float64).repeat_interleave(3)
    h = _reference(model, x, [0])[:, 0]
    if weighted:
        h = h / masses.sqrt()[:, None] / masses.sqrt()[None, :]
    extra = {"dense_limit": 0, "tol": 1e-12} if path == "lanczos" else {}
    values, _, residuals = eigen(model, x, target, 3, "LA", masses=masses if weighted else None,
                                 **extra)  # fmt: skip
    expected = torch.linalg.eigvalsh(h).flip(-1)[:, :3]
    assert_close_to_max(values[:, 0], expected, 1e-9, f"{path} eigenvalues")
    assert (residuals <= 1e-8 * expected.abs().max()).all(), residuals
