"""Message-passing potentials (``tests/potentials.py``) on the graph path, against float64 autograd.

Each case is a potential written as users write them (samples concatenated along one node axis,
a fixed edge list or a neighbour list found from the positions, gathers and scatters in several
forms), a molecule, a batch of geometries and a dtype. ``auto`` must choose ``structured``, and
its Hessians, ``diagonal`` and ``eigen`` must equal those of ``torch.autograd.functional.hessian``
of each geometry's energy in float64. The rules of gathers and scatters are checked on their own
against ``torch.func`` (``test_gather_rule`` and ``test_scatter_rule``).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.func import jvp

import pipeline
from pipeline.hessian import diagonal, eigen, replay
from pipeline.hessian.graph import capture, record
from pipeline.hessian.methods import choose_method
from pipeline.hessian.rules import Gather, Scatter
from tests.potentials import (
    GatherScatterPotential,
    IndexPutPotential,
    MessagePassingPotential,
    random_molecule,
    trajectory,
)
from tests.zoo import assert_close_to_max

RTOL = {torch.float64: 1e-9, torch.float32: 2e-4}


@dataclass(frozen=True)
class Case:
    """A potential, its molecule and geometries. ``noise`` and ``cutoff`` are chosen so that a
    radius list differs between the geometries of a batch (checked: ``per_sample``)."""

    name: str
    model: type[nn.Module]
    atoms: int
    samples: int
    neighbours: str
    dtype: torch.dtype
    cutoff: float = 2.2
    noise: float = 0.3

    @property
    def per_sample(self) -> bool:
        """Whether some gather has an index per sample (the radius lists differ)."""
        return self.neighbours == "radius" and self.samples > 1

    def build(self) -> tuple[nn.Module, Tensor]:
        torch.manual_seed(self.atoms)
        numbers, positions = random_molecule(self.atoms, seed=self.atoms)
        model = self.model(numbers, cutoff=self.cutoff, width=8, n_rbf=6,
                           neighbours=self.neighbours)  # fmt: skip
        model = model.to(self.dtype).eval()
        x = trajectory(positions, self.samples, self.noise, seed=self.samples)
        return model, x.to(self.dtype)


CASES = [
    Case(f"{m.__name__}_{nb}_{n}atoms_B{b}_{str(dt)[6:]}", m, n, b, nb, dt)
    for m, n, b, nb, dt in [
        (MessagePassingPotential, 3, 1, "all", torch.float64),
        (MessagePassingPotential, 5, 3, "all", torch.float64),
        (MessagePassingPotential, 8, 3, "all", torch.float32),
        (MessagePassingPotential, 4, 1, "radius", torch.float64),
        (MessagePassingPotential, 6, 3, "radius", torch.float64),
        (MessagePassingPotential, 8, 3, "radius", torch.float32),
        (MessagePassingPotential, 5, 1, "radius", torch.float32),
        (GatherScatterPotential, 5, 3, "all", torch.float64),
        (GatherScatterPotential, 7, 3, "radius", torch.float64),
        (GatherScatterPotential, 6, 1, "radius", torch.float32),
        (IndexPutPotential, 6, 3, "all", torch.float64),
        (IndexPutPotential, 7, 3, "radius", torch.float64),
    ]
]  # fmt: skip


def reference(model: nn.Module, x: Tensor) -> Tensor:
    """(N, D, D): each geometry's energy Hessian by float64 autograd."""
    m64 = _float64(model)
    return torch.stack([
        torch.autograd.functional.hessian(lambda p: m64(p.unsqueeze(0))[0, 0], xn.double())
        .reshape(xn.numel(), xn.numel()) for xn in x
    ])  # fmt: skip


def _float64(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def _target(model: nn.Module, x: Tensor):
    with torch.no_grad():
        return pipeline.make_target([0], model(x), None, "cross_entropy")


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request) -> Case:
    return request.param


def test_hessian_on_the_graph_path(case: Case):
    model, x = case.build()
    choice = choose_method("auto", model, _target(model, x), x)
    assert choice.name == "structured", f"{case.name}: auto chose {choice.name}: {choice.note}"
    h = pipeline.hessian(model, x, [0])
    assert h.dtype == case.dtype
    h_ref = reference(model, x)
    assert_close_to_max(h[:, 0].double(), h_ref, RTOL[case.dtype], case.name)
    gathers = [s.rule for s in record(capture(model), x).steps if isinstance(s.rule, Gather)]
    assert gathers, f"{case.name}: no gather on the tape"
    per_sample = any(g.index.shape[0] > 1 for g in gathers)
    assert per_sample == case.per_sample, (
        f"{case.name}: per-sample neighbour lists {per_sample}, the case says {case.per_sample}"
    )


def test_diagonal_and_eigen(case: Case):
    model, x = case.build()
    h_ref = reference(model, x)
    target = _target(model, x)
    diag, _ = diagonal(model, x, target)
    assert_close_to_max(diag[:, 0].double(), torch.diagonal(h_ref, dim1=-2, dim2=-1),
                        RTOL[case.dtype], f"{case.name}: diagonal")  # fmt: skip
    values, vectors, _ = eigen(model, x, target, k=3, which="LM")
    ref_values = torch.linalg.eigvalsh(h_ref)
    top = ref_values.gather(-1, ref_values.abs().argsort(-1, descending=True)[:, :3])
    assert_close_to_max(values[:, 0].double(), top, RTOL[case.dtype], f"{case.name}: eigenvalues")
    v = vectors[:, 0].double()  # (N, 3, D): H v = lambda v with the reference H
    residual = (h_ref.unsqueeze(1) @ v.unsqueeze(-1)).squeeze(-1) - top.unsqueeze(-1) * v
    scale = h_ref.abs().amax((-2, -1)).max()
    assert residual.abs().max() <= 10 * RTOL[case.dtype] * scale, (
        f"{case.name}: eigenvectors: |H v - lambda v| {residual.abs().max():.2e}"
    )


# --------------------------------------------------------------------------------------------
# The rules on their own: jvp against torch.func, vjp as its transpose.


@dataclass(frozen=True)
class IndexCase:
    """A gather or scatter on tangents (B, R, rows, *f) with an index (1 or N, E)."""

    name: str
    index: tuple[tuple[int, ...], ...]
    rows: int  # of the input (gather) or the target (scatter)
    lead: int  # B of the tangents: 1 (shared by the samples) or N
    features: tuple[int, ...] = (3,)


GATHERS = [
    IndexCase("shared_repeats", ((0, 2, 2, 1, 0),), 3, 1),
    IndexCase("shared_on_per_sample_tangents", ((3, 0, 1),), 4, 2, (2, 2)),
    IndexCase("per_sample", ((0, 1, 1, 2), (2, 2, 0, 0)), 3, 2),
    IndexCase("per_sample_on_shared_tangents", ((1, 0), (0, 0)), 2, 1, ()),
]
SCATTERS = [
    IndexCase("shared", ((0, 2, 2, 1, 0),), 3, 1),
    IndexCase("per_sample_padded", ((0, 1, 3, 3), (2, 0, 3, 3)), 3, 2),  # 3: padding
    IndexCase("per_sample_on_shared_tangents", ((1, 1), (0, 2)), 3, 1, (2,)),
    IndexCase("into_one_row", ((0, 0, 0),), 1, 2, ()),
]


def _gather_reference(index: Tensor, v: Tensor, n: int) -> Tensor:
    """v (B, rows, *f) -> (N, E, *f): each sample's rows at its index."""
    v = v.expand(n, *v.shape[1:])
    index = index.expand(n, -1)
    return torch.stack([v[b, index[b]] for b in range(n)])


def _scatter_reference(index: Tensor, v: Tensor, n: int, size: int) -> Tensor:
    """v (B, E, *f) -> (N, size, *f): each sample's rows summed at its index, padding dropped."""
    v = v.expand(n, *v.shape[1:])
    index = index.expand(n, -1)
    out = v.new_zeros(n, size + 1, *v.shape[2:])
    for b in range(n):
        out[b].index_add_(0, index[b], v[b])
    return out[:, :size]


@pytest.mark.parametrize("case", GATHERS, ids=lambda c: c.name)
def test_gather_rule(case: IndexCase):
    torch.manual_seed(0)
    index = torch.tensor(case.index)
    e = index.shape[1]
    rule = Gather([(case.rows, *case.features)], (e, *case.features), index=index)
    t = torch.randn(case.lead, 3, case.rows, *case.features, dtype=torch.float64)
    out = rule.jvp([t])
    lead = max(case.lead, index.shape[0])
    expected = torch.stack([
        jvp(lambda v: _gather_reference(index, v, lead), (torch.zeros_like(t[:, r]),),
            (t[:, r],))[1] for r in range(t.shape[1])
    ], 1)  # fmt: skip
    assert_close_to_max(out, expected, 1e-14, f"gather {case.name}: jvp")
    _assert_transpose(rule, t, out, f"gather {case.name}")


@pytest.mark.parametrize("case", SCATTERS, ids=lambda c: c.name)
def test_scatter_rule(case: IndexCase):
    torch.manual_seed(0)
    index = torch.tensor(case.index)
    e = index.shape[1]
    for into in (False, True):
        shapes = [(e, *case.features)]
        if into:
            shapes = [(case.rows, *case.features), *shapes]
        rule = Scatter(shapes, (case.rows, *case.features), index=index, size=case.rows,
                       into=into, alpha=0.5 if into else 1.0)  # fmt: skip
        t = torch.randn(case.lead, 3, e, *case.features, dtype=torch.float64)
        base = torch.randn(case.lead, 3, case.rows, *case.features, dtype=torch.float64)
        ts = [base, t] if into else [t]
        out = rule.jvp(ts)
        lead = max(case.lead, index.shape[0])
        summed = torch.stack([_scatter_reference(index, t[:, r], lead, case.rows)
                              for r in range(t.shape[1])], 1)  # fmt: skip
        expected = base + 0.5 * summed if into else summed
        what = f"scatter {case.name} (into {into})"
        assert_close_to_max(out, expected, 1e-14, f"{what}: jvp")
        _assert_transpose(rule, ts, out, what)


def _assert_transpose(rule, ts, out: Tensor, what: str) -> None:
    """<vjp(u), t> == <u, jvp(t)> for a random u, summed over the inputs."""
    ts = ts if isinstance(ts, list) else [ts]
    u = torch.randn_like(out)
    left = sum((v * t.expand_as(v)).sum() for v, t in zip(rule.vjp(u), ts, strict=True))
    right = (u * out).sum()
    assert math.isclose(float(left), float(right), rel_tol=1e-12), (
        f"{what}: <vjp(u), t> = {float(left):.15e} != <u, jvp(t)> = {float(right):.15e}"
    )


# --------------------------------------------------------------------------------------------
# A model the recorder must refuse, with its reason.


class CrossSamples(nn.Module):
    """Edges between atoms of different samples: a batch the graph path must not take."""

    def forward(self, positions: Tensor) -> Tensor:
        pos = positions.reshape(-1, 3)
        rolled = pos[torch.roll(torch.arange(pos.shape[0]), 1)]  # atom i <- atom i - 1
        energy = ((pos - rolled) ** 2).sum(-1).tanh()
        return energy.view(positions.shape[0], -1).sum(1, keepdim=True)


def test_a_gather_across_samples_is_refused():
    from pipeline.hessian.ops import Unsupported

    x = torch.randn(3, 4, 3, dtype=torch.float64)
    with pytest.raises(Unsupported, match="out of their order|another"):
        record(capture(CrossSamples()), x)
    h = pipeline.hessian(CrossSamples(), x[:1], [0])  # one sample: its own atoms only
    h_ref = reference(CrossSamples(), x[:1])
    assert_close_to_max(h[:, 0], h_ref, 1e-9, "one sample")


# --------------------------------------------------------------------------------------------
# Memory: a 500-atom molecule (D = 1500) with a radius list within a 1 GiB budget.


@pytest.mark.slow
def test_large_molecule_within_the_budget():
    """Run in a fresh process: its peak RSS is the call's. Exactness at this size is checked on
    a few rows against float64 autograd."""
    script = textwrap.dedent("""
        import resource, time, torch
        import pipeline
        from tests.potentials import MessagePassingPotential, random_molecule, trajectory
        numbers, positions = random_molecule(500)
        model = MessagePassingPotential(numbers, neighbours="radius").eval()
        x = trajectory(positions, 1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        h = pipeline.hessian(model, x, [0], memory_budget=1 << 30)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rows = [0, 700, 1499]
        m64 = model.double()
        x64 = x.double().requires_grad_()
        (g,) = torch.autograd.grad(m64(x64)[0, 0], x64, create_graph=True)
        g = g.reshape(-1)
        ref = torch.stack([torch.autograd.grad(g[r], x64, retain_graph=True)[0].reshape(-1)
                           for r in rows])
        err = float((h[0, 0, rows].double() - ref).abs().max() / ref.abs().max())
        print(seconds, before / 1024, peak / 1024, err)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=3000)  # fmt: skip
    seconds, before, peak, err = map(float, out.stdout.split()[-4:])
    print(f"500 atoms, D = 1500: {seconds:.0f} s, peak RSS {peak:.0f} MiB ({before:.0f} before)")
    assert err < 1e-4, f"relative error {err:.2e} of float32 rows against float64"
    assert peak - before < 1.5 * 1024, f"peak RSS {peak:.0f} MiB, {before:.0f} before the call"


# --------------------------------------------------------------------------------------------
# Replays (NOTE [replay]): a fixed edge list is replayed, a neighbour list found from the
# positions is not; every call is exact.


@pytest.mark.parametrize("neighbours", ["all", "radius"])
def test_replayed_calls_stay_exact(monkeypatch, neighbours: str):
    monkeypatch.setattr(replay, "TRACE_COST", 0.0)  # the second call at a key is traced
    numbers, positions = random_molecule(6, seed=2)
    torch.manual_seed(2)
    model = MessagePassingPotential(numbers, cutoff=2.2, width=8, n_rbf=6,
                                    neighbours=neighbours).double().eval()  # fmt: skip
    edges = set()
    for call in range(4):
        x = trajectory(positions.double(), 3, noise=0.3, seed=10 + call)
        h = pipeline.hessian(model, x, [0])
        assert_close_to_max(h[:, 0], reference(model, x), 1e-9, f"{neighbours}, call {call}")
        edges.add(len(model.edges(x)[0]))
    if neighbours == "all":
        assert (replay.traces(model), replay.refused(model)) == (1, 0)
    else:
        assert len(edges) > 1, "the neighbour lists did not change between the calls"
        assert (replay.traces(model), replay.refused(model)) == (0, 1)


def test_sizes_with_a_proxy_are_traced_and_torch_is_left_as_it_was():
    """``torch.zeros(B, 1)`` and ``buffer.expand(B, -1)`` with B from the input's shape: torch's
    argument parser refuses a proxy among several sizes, the capture records them; afterwards
    torch's functions are its own again."""

    class Sizes(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(1, 3))

        def forward(self, x: Tensor) -> Tensor:
            base = torch.zeros(x.shape[0], 1, dtype=x.dtype) + self.w.expand(x.shape[0], -1)
            return torch.tanh(x * base).sum(-1, keepdim=True)

    zeros, expand = torch.zeros, torch.Tensor.expand
    model, x = Sizes().double(), torch.randn(2, 3, dtype=torch.float64)
    h = pipeline.hessian(model, x, [0], method="structured")
    assert_close_to_max(h[:, 0], reference(model, x), 1e-9, "sizes")
    assert torch.zeros is zeros and torch.Tensor.expand is expand


class RowsMixed(nn.Module):
    """Atoms of all samples in one axis, then a call across all of its rows (a cumulative sum):
    the rows of one sample depend on the others'."""

    def forward(self, positions: Tensor) -> Tensor:
        pos = positions.reshape(-1, 3)
        energy = torch.tanh(torch.cumsum(pos * pos, 0)).sum(-1)
        return energy.view(positions.shape[0], -1).sum(1, keepdim=True)


def test_a_call_across_the_rows_of_all_samples_is_refused():
    from pipeline.hessian.ops import Unsupported

    with pytest.raises(Unsupported, match="mixes the rows"):
        record(capture(RowsMixed()), torch.randn(2, 4, 3, dtype=torch.float64))
