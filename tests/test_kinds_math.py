"""Beyond the dense matrix: diagonal, eigenpairs and J^T A J against float64 dense references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.hessian import diagonal, eigen, factored, make_target
from pipeline.hessian.diagonal import DiagonalPlan, diagonal_plan
from pipeline.hessian.errors import ArgumentError
from tests.zoo import assert_close_to_max as assert_close

pytestmark = pytest.mark.usefixtures("float64_default")  # every case runs in float64

ROOT = Path(__file__).resolve().parents[1]


# --- models --------------------------------------------------------------------------------


def tanh_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 9), nn.Tanh(),
                         nn.Linear(9, 4))  # fmt: skip


def tanh_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(27, 4))  # fmt: skip


def relu_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4))


def relu_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(3 * 3 * 3, 8), nn.LeakyReLU(0.1), nn.Linear(8, 4),
    )  # fmt: skip


class Residual(nn.Module):
    """x -> h = A x; h + tanh(B h) -> gelu -> C: curvature inside a residual block."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x.flatten(1))
        return self.c(F.gelu(h + torch.tanh(self.b(h))))


class Gated(nn.Module):
    """A product of two branches: a curved step that is not elementwise."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 8), nn.Linear(12, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = x.flatten(1)
        return self.c(torch.tanh(self.a(x)) * self.b(x))


def log_softmax_relu() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4), nn.LogSoftmax(-1))


def wide_tanh(d: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 3))


# --- references ----------------------------------------------------------------------------


def _setup(factory, shape, outputs, seed, n=3, loss="cross_entropy"):
    torch.manual_seed(seed)
    model = factory().eval()
    x = torch.randn(n, *shape)
    with torch.no_grad():
        z = model(x)
    labels = None
    if outputs == "loss":
        labels = torch.randn(n, z.shape[1]) if loss == "mse" else torch.arange(n) % z.shape[1]
    return model, x, make_target(outputs, z, labels, loss)


def dense_reference(model, x, target):
    """(N, K, D, D) Hessians and (N, K, D) gradients by torch.autograd.functional, per entry."""
    n, shape = x.shape[0], x.shape[1:]
    hs, gs = [], []
    for i in range(n):

        def f(v, i=i):
            return target.select(model(v.view(1, *shape)).squeeze(0), target.aux[i])

        xf = x[i].reshape(-1)
        k = f(xf).shape[0]
        hs.append(torch.stack([torch.autograd.functional.hessian(lambda v, j=j: f(v)[j], xf)
                               for j in range(k)]))  # fmt: skip
        gs.append(torch.autograd.functional.jacobian(f, xf))
    return torch.stack(hs), torch.stack(gs)


# --- diagonal ------------------------------------------------------------------------------

# (name, factory, input shape, outputs, loss, seed, route the default takes)
DIAGONAL_CASES = [
    ("tanh_mlp_logits", tanh_mlp, (3, 4), [0, 2], "cross_entropy", 0, "propagated"),
    ("tanh_mlp_mse", tanh_mlp, (12,), "loss", "mse", 1, "propagated"),
    ("tanh_cnn_all", tanh_cnn, (1, 8, 8), "all", "cross_entropy", 2, "propagated"),
    ("relu_cnn_ce", relu_cnn, (1, 8, 8), "loss", "cross_entropy", 3, "propagated"),
    ("residual", Residual, (12,), [1, 3], "cross_entropy", 4, "propagated"),
    ("log_softmax_head", log_softmax_relu, (12,), [0, 3], "cross_entropy", 5, "propagated"),
    ("gated_rows", Gated, (12,), [2], "cross_entropy", 6, "rows"),
]


@pytest.mark.parametrize(("name", "factory", "shape", "outputs", "loss", "seed", "route"),
                         DIAGONAL_CASES, ids=[c[0] for c in DIAGONAL_CASES])  # fmt: skip
def test_diagonal_matches_dense(name, factory, shape, outputs, loss, seed, route):
    model, x, target = _setup(factory, shape, outputs, seed, loss=loss)
    ref_h, ref_g = dense_reference(model, x, target)
    ref = torch.diagonal(ref_h, dim1=-2, dim2=-1)
    plan = diagonal_plan(model, x, target, 1 << 30)
    assert isinstance(plan, DiagonalPlan) == (route == "propagated"), f"{name}: {plan}"
    methods = ["auto", "forward_over_reverse", "structured"]
    if route == "propagated":
        methods.append("propagated")
    else:
        with pytest.raises(ArgumentError, match="'propagated' does not apply: "):
            diagonal(model, x, target, method="propagated")
    for method in methods:
        diag, grad = diagonal(model, x, target, method=method)
        assert diag.dtype == x.dtype and diag.shape == ref.shape
        assert_close(diag, ref, what=f"{name} diagonal, method {method}")
        assert_close(grad, ref_g, what=f"{name} gradient, method {method}")


@pytest.mark.parametrize("name", ["tanh_mlp_logits", "tanh_cnn_all", "residual"])
def test_diagonal_in_the_smallest_pieces_the_budget_allows(name):
    """A budget that admits one sample at a time and one cotangent per sweep (propagated), or
    one row per block (rows): the same numbers."""
    case = next(c for c in DIAGONAL_CASES if c[0] == name)
    _, factory, shape, outputs, loss, seed, _ = case
    model, x, target = _setup(factory, shape, outputs, seed, loss=loss)
    ref = torch.diagonal(dense_reference(model, x, target)[0], dim1=-2, dim2=-1)
    k = target.n_outputs
    plan = diagonal_plan(model, x, target, 1 << 30)
    tight = plan.fixed + (1 + k) * plan.sweep
    while isinstance(plan := diagonal_plan(model, x, target, tight - 1), DiagonalPlan):
        tight = plan.fixed + (1 + k) * plan.sweep  # down to the smallest budget a cut fits
    diag = diagonal(model, x, target, budget=tight, method="propagated")[0]
    assert_close(diag, ref, what=f"{name} tight budget")
    assert isinstance(diagonal_plan(model, x, target, tight - 1), str)  # then: row blocks
    with pytest.raises(ArgumentError, match="no cut of the graph leaves a working set"):
        diagonal(model, x, target, budget=tight - 1, method="propagated")
    one_row = 4 * x.shape[0] * target.n_outputs * x[0].numel() * x.element_size()
    diag = diagonal(model, x, target, budget=one_row, method="structured")[0]
    assert_close(diag, ref, what=f"{name} 1-row blocks")


def test_diagonal_of_relu_logits_is_zero():
    model, x, target = _setup(relu_cnn, (1, 8, 8), [0, 1], 7)
    diag, grad = diagonal(model, x, target)
    assert torch.count_nonzero(diag) == 0
    assert_close(grad, dense_reference(model, x, target)[1], what="relu logits gradient")


# --- eigen ---------------------------------------------------------------------------------

# (name, factory, input shape, outputs, seed): Hessians of full rank with simple eigenvalues
EIGEN_CASES = [
    ("tanh_mlp_two_logits", tanh_mlp, (12,), [0, 3], 10),
    ("wide_tanh_loss", lambda: wide_tanh(10, 24), (10,), "loss", 11),
    ("tanh_cnn_logit", tanh_cnn, (1, 8, 8), [1], 12),
]


def _wanted(values, which, k):
    """Indices of the wanted eigenvalues of ascending ``values`` (..., D), in their order."""
    if which == "SA":
        return torch.arange(k).expand(*values.shape[:-1], k)
    if which == "LA":
        d = values.shape[-1]
        return torch.arange(d - 1, d - 1 - k, -1).expand(*values.shape[:-1], k)
    return values.abs().argsort(dim=-1, descending=True, stable=True)[..., :k]


def _assert_within(actual, expected, atol, what):
    """|actual - expected| <= atol entrywise, else fail naming the worst entry."""
    excess = (actual - expected).abs() - atol
    if bool((excess > 0).any()):
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        pytest.fail(f"{what}: at index {idx} got {actual[idx]:.6e}, expected {expected[idx]:.6e} "
                    f"within {atol.expand_as(actual)[idx]:.3e}")  # fmt: skip


def _check_eigen(what, h, values, vectors, residuals, which, k):
    ref_values, ref_vectors = torch.linalg.eigh(h)
    idx = _wanted(ref_values, which, k)
    scale = ref_values.abs().amax(-1, keepdim=True)
    expected = ref_values.gather(-1, idx)
    assert_close(values, expected, rtol=1e-6, what=f"{what} values")
    true_res = (vectors @ h - values.unsqueeze(-1) * vectors).norm(dim=-1)
    _assert_within(residuals, true_res, 1e-9 * scale, f"{what} residuals as returned vs true")
    _assert_within(true_res, 0 * true_res, 1e-6 * scale, f"{what} residuals")
    assert_close(vectors.norm(dim=-1), torch.ones_like(values), what=f"{what} unit norm")
    # vectors up to sign, where the eigenvalue is simple enough for the vector to be defined
    ref_v = ref_vectors.gather(-1, idx.unsqueeze(-2).expand(*h.shape[:-1], k)).mT
    sign = torch.sign((ref_v * vectors).sum(-1, keepdim=True))
    gaps = (ref_values.unsqueeze(-2) - expected.unsqueeze(-1)).abs()
    gaps = gaps.masked_fill(gaps == 0, float("inf")).amin(-1)  # to the nearest other eigenvalue
    simple = (gaps > 1e-3 * scale).unsqueeze(-1)
    assert bool(simple.any())
    assert_close(torch.where(simple, vectors * sign, 0), torch.where(simple, ref_v, 0),
                 rtol=1e-6, what=f"{what} vectors up to sign")  # fmt: skip


@pytest.mark.parametrize("path", ["dense", "lanczos"])
@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(("name", "factory", "shape", "outputs", "seed"), EIGEN_CASES,
                         ids=[c[0] for c in EIGEN_CASES])  # fmt: skip
def test_eigen_matches_eigh_of_dense(name, factory, shape, outputs, seed, k, which, path):
    model, x, target = _setup(factory, shape, outputs, seed, n=2)
    h = dense_reference(model, x, target)[0]
    extra = {"dense_limit": 0, "tol": 1e-12} if path == "lanczos" else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="eigen:")  # converged: no Krylov-limit warning
        values, vectors, residuals = eigen(model, x, target, k, which, **extra)
    n, kk, d = h.shape[0], h.shape[1], h.shape[-1]
    assert values.shape == (n, kk, k) and vectors.shape == (n, kk, k, d)
    assert residuals.shape == (n, kk, k) and values.dtype == x.dtype
    _check_eigen(f"{name} {path} {which} k={k}", h, values, vectors, residuals, which, k)
    order = values.abs() if which == "LM" else values
    steps = order[..., :-1] - order[..., 1:]
    assert bool((steps >= 0).all() if which != "SA" else (steps <= 0).all()), f"order {values}"


# (name, factory, input shape, outputs, seed, masses per coordinate: "shared" (D,) or
# "per_sample" (N, D)): M^-1/2 H M^-1/2 against eigh of the weighted float64 reference
MASS_CASES = [
    ("tanh_mlp_two_logits", tanh_mlp, (12,), [0, 3], 40, "shared"),
    ("tanh_mlp_atoms_per_sample", tanh_mlp, (4, 3), [1], 41, "per_sample"),
    ("wide_tanh_loss", lambda: wide_tanh(10, 24), (10,), "loss", 42, "per_sample"),
]


@pytest.mark.parametrize("path", ["dense", "lanczos"])
@pytest.mark.parametrize("which", ["LM", "SA"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(("name", "factory", "shape", "outputs", "seed", "masses"), MASS_CASES,
                         ids=[c[0] for c in MASS_CASES])  # fmt: skip
def test_mass_weighted_eigen_matches_eigh_of_weighted_dense(name, factory, shape, outputs, seed,
                                                            masses, k, which, path):  # fmt: skip
    model, x, target = _setup(factory, shape, outputs, seed, n=2)
    h = dense_reference(model, x, target)[0]  # (N, K, D, D)
    n, d = x.shape[0], h.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    m = 1 + 15 * torch.rand(n if masses == "per_sample" else 1, d, generator=gen)  # 1..16 "amu"
    w = m.expand(n, d).rsqrt()[:, None]  # (N, 1, D)
    weighted = w.unsqueeze(-1) * h * w.unsqueeze(-2)  # explicitly M^-1/2 H M^-1/2
    extra = {"dense_limit": 0, "tol": 1e-12} if path == "lanczos" else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="eigen:")
        values, vectors, residuals = eigen(model, x, target, k, which, masses=m.squeeze(0),
                                           **extra)  # fmt: skip
    _check_eigen(f"{name} {path} {which} k={k} mass-weighted", weighted, values, vectors,
                 residuals, which, k)  # fmt: skip
    # the weighting matters: the unweighted Hessian's eigenvalues are others
    plain = torch.linalg.eigvalsh(h)
    assert not torch.allclose(torch.linalg.eigvalsh(weighted), plain, rtol=1e-3)


@pytest.mark.parametrize(("masses", "match"), [
    (torch.ones(11), r"shape \(12,\) or \(2, 12\)"),
    (torch.ones(3, 12), r"got \(3, 12\)"),
    (torch.zeros(12), "positive and finite"),
    (torch.full((12,), float("nan")), "positive and finite"),
])  # fmt: skip
def test_bad_masses_are_refused(masses, match):
    model, x, target = _setup(tanh_mlp, (12,), [0], 31, n=2)
    with pytest.raises(ArgumentError, match=match) as err:
        eigen(model, x, target, 1, masses=masses)
    assert err.value.argument == "masses"


def test_lanczos_stops_before_the_whole_space_and_at_its_limit_says_so():
    model, x, target = _setup(lambda: wide_tanh(60, 96), (60,), "loss", 13, n=2)
    h = dense_reference(model, x, target)[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="eigen:")  # converged within 40 of 60
        values, vectors, residuals = eigen(model, x, target, 2, "LA", tol=1e-9, dense_limit=0,
                                           max_krylov=40)  # fmt: skip
    _check_eigen("lanczos within 40 of 60", h, values, vectors, residuals, "LA", 2)
    with pytest.warns(UserWarning, match="Krylov limit of 4 vectors") as caught:
        values, vectors, residuals = eigen(model, x, target, 2, "LA", dense_limit=0, max_krylov=4)
    assert caught[0].filename == __file__  # pointing at the caller
    true_res = (vectors @ h - values.unsqueeze(-1) * vectors).norm(dim=-1)
    scale = torch.linalg.eigvalsh(h).abs().amax(-1, keepdim=True)
    _assert_within(residuals, true_res, 1e-9 * scale, "honest residuals at the limit")
    assert bool((residuals > 1e-8).any())


def test_eigen_of_a_zero_hessian():
    model, x, target = _setup(relu_mlp, (12,), [0], 14, n=2)
    values, _, residuals = eigen(model, x, target, 2, dense_limit=0)
    assert torch.count_nonzero(values) == 0 and torch.count_nonzero(residuals) == 0


# --- factored ------------------------------------------------------------------------------

# (name, factory, input shape, outputs, loss, seed, C)
FACTORED_CASES = [
    ("relu_mlp_ce", relu_mlp, (3, 4), "loss", "cross_entropy", 20, 4),
    ("relu_mlp_mse", relu_mlp, (12,), "loss", "mse", 21, 4),
    ("relu_cnn_ce", relu_cnn, (1, 8, 8), "loss", "cross_entropy", 22, 4),
    ("relu_under_log_softmax", log_softmax_relu, (12,), [0, 2], "cross_entropy", 23, 4),
]


@pytest.mark.parametrize(("name", "factory", "shape", "outputs", "loss", "seed", "c"),
                         FACTORED_CASES, ids=[c[0] for c in FACTORED_CASES])  # fmt: skip
def test_factored_reconstructs_dense(name, factory, shape, outputs, loss, seed, c):
    model, x, target = _setup(factory, shape, outputs, seed, loss=loss)
    ref_h, ref_g = dense_reference(model, x, target)
    jac, curv, grad = factored(model, x, target)
    n, k, d = ref_g.shape
    assert jac.shape == (n, c, d) and curv.shape == (n, k, c, c) and grad.shape == (n, k, d)
    assert_close(jac.mT.unsqueeze(1) @ curv @ jac.unsqueeze(1), ref_h, what=f"{name} J^T A J")
    assert_close(grad, ref_g, what=f"{name} gradient")
    assert_close(curv, curv.mT, what=f"{name} A symmetric")
    body = model[:-1] if isinstance(model[-1], nn.LogSoftmax) else model
    for i in range(n):  # J is the Jacobian of the logits
        ref_j = torch.autograd.functional.jacobian(
            lambda v, i=i: body(v.view(1, *shape)).squeeze(0), x[i].reshape(-1)
        )
        assert_close(jac[i], ref_j, what=f"{name} sample {i} jacobian")
    one = factored(model, x, target, budget=1)  # one sample at a time
    for got, want, part in zip(one, (jac, curv, grad), ("J", "A", "grad"), strict=True):
        assert_close(got, want, what=f"{name} {part} sample by sample")


@pytest.mark.parametrize("factory", [tanh_mlp, tanh_cnn, Residual])
def test_factored_refuses_a_curved_body(factory):
    shape = (1, 8, 8) if factory is tanh_cnn else (12,)
    model, x, target = _setup(factory, shape, "loss", 24)
    with pytest.raises(ArgumentError, match=r"no exact J\^T A J form.*\(tanh\)") as err:
        factored(model, x, target)
    assert err.value.argument == "model" and "\n" not in str(err.value)


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "argument", "match"), [
    (lambda m, x, t: eigen(m, x, t, 0), "k", "k must be an integer in 1..D = 12"),
    (lambda m, x, t: eigen(m, x, t, 13), "k", "1..D = 12, got 13"),
    (lambda m, x, t: eigen(m, x, t, 2.0), "k", "got 2.0"),
    (lambda m, x, t: eigen(m, x, t, 1, which="BE"), "which", "'LM', 'LA', 'SA'"),
    (lambda m, x, t: eigen(m, x, t, 1, tol=-1.0), "tol", "tol must be >= 0"),
    (lambda m, x, t: eigen(m, x, t, 1, method="nope"), "method", "unknown method 'nope'"),
    (lambda m, x, t: diagonal(m, x, t, method="nope"), "method", "unknown method 'nope'"),
    (lambda m, x, t: diagonal(m, x, t, method="piecewise"), "method", "does not support"),
    (lambda m, x, t: diagonal(m, x[0], t), "x", "batch"),
])  # fmt: skip
def test_bad_arguments_are_refused(call, argument, match):
    model, x, target = _setup(tanh_mlp, (12,), [0], 30)
    with pytest.raises(ArgumentError, match=match) as err:
        call(model, x, target)
    assert err.value.argument == argument


# --- the large case ------------------------------------------------------------------------


@pytest.mark.slow
def test_diagonal_at_d_65536_within_3_gib(tmp_path):
    """``benchmarks/kinds.py``: a tanh MLP 65536 -> 64 -> 64 -> 1 in float32, 2 samples, in a
    process of its own: peak RSS <= 3 GiB, entries equal to Hessian-vector products."""
    out = tmp_path / "kinds.json"
    script = ROOT / "benchmarks" / "kinds.py"
    command = [sys.executable, str(script), "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["route"].startswith("propagated"), result
    assert max(result["peak_rss_self_mib"], result["peak_rss_children_mib"]) <= 3 * 1024, result
    assert result["max_error_vs_hvp_relative_to_max_entry"] <= 1e-4, result
