"""Interatomic potentials (the ``atoms`` extra: mace-torch, e3nn, torchani, ase), as users wrap
them (``pipeline/inputs/potentials.py``), with random weights, in float64: ``hessian()`` equals
MACE's own Hessian (``compute_hessian=True``) and ``torch.autograd.functional.hessian`` of
TorchANI, per geometry of a batch; the command line's eigenvalues equal ``eigh`` of those
references; the wrappers compute the energies the libraries compute themselves. Then two timm
architectures (``poolformerv2_s12``, ``levit_128s``) that only plain autograd differentiates,
through ``auto``, against float64 double-backward rows. Skipped, with the reason, where a package
is absent."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import Tensor, nn

import pipeline
from pipeline.errors import PipelineError
from pipeline.hessian.errors import ArgumentError
from tests.zoo import assert_close, assert_close_to_max

ROOT = Path(__file__).resolve().parents[1]


@cache
def _unavailable(kind: str) -> str | None:
    """Why the ``kind`` ("mace" or "ani") potential cannot be built here, or None."""
    try:
        if kind == "mace":
            from pipeline.inputs.libraries import import_mace

            import_mace()
        else:
            import ase.units  # noqa: F401
            import torchani  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure is a reason to skip
        return f"the atoms extra is not importable here ({type(err).__name__}: {str(err)[:120]})"
    return None


def _need(kind: str) -> None:
    if reason := _unavailable(kind):
        pytest.skip(reason)


# Equilibrium-like geometries (Angstrom); each test geometry adds 0.05 A of seeded noise.
MOLECULES: dict[str, tuple[list[int], list[list[float]]]] = {
    "CH4": ([6, 1, 1, 1, 1], [[0.0, 0.0, 0.0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                              [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]]),
    "H2O": ([8, 1, 1], [[0.0, 0.0, 0.12], [0.0, 0.76, -0.47], [0.0, -0.76, -0.47]]),
    "C2H4O": ([6, 6, 8, 1, 1, 1, 1], [[0.0, 0.0, 0.0], [1.50, 0.0, 0.0], [2.10, 1.05, 0.0],
                                      [2.05, -0.95, 0.0], [-0.36, 1.03, 0.0],
                                      [-0.36, -0.51, 0.89], [-0.36, -0.51, -0.89]]),
}  # fmt: skip


def geometries(molecule: str, count: int, seed: int = 0) -> tuple[list[int], Tensor]:
    """The molecule's atomic numbers and ``count`` noisy copies of its geometry (count, n, 3)."""
    numbers, base = MOLECULES[molecule]
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(base, dtype=torch.float64)
    return numbers, x + 0.05 * torch.randn(count, *x.shape, generator=g, dtype=torch.float64)


@cache
def _potential(kind: str, numbers: tuple[int, ...]) -> nn.Module:
    from pipeline.inputs.potentials import ani_energy, mace_energy

    factory = mace_energy if kind == "mace" else ani_energy
    return factory(list(numbers)).to(torch.float64)


def potential(kind: str, numbers: list[int]) -> nn.Module:
    """The ``kind`` potential for ``numbers``, random weights (seed 0), float64 (built once)."""
    _need(kind)
    return _potential(kind, tuple(numbers))


def reference_hessian(kind: str, net: nn.Module, positions: Tensor) -> Tensor:
    """The library's own Hessian (3n, 3n) of one geometry (n, 3)."""
    from pipeline.inputs.potentials import ani_reference_hessian, mace_own_hessian

    if kind == "mace":
        return mace_own_hessian(net, positions)
    return ani_reference_hessian(net, positions)


@dataclass(frozen=True)
class Case:
    kind: str  # "mace" or "ani"
    molecule: str
    count: int  # geometries in the batch

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.molecule}-x{self.count}"


CASES = [
    Case("mace", "CH4", 2),
    Case("mace", "H2O", 3),
    Case("mace", "C2H4O", 2),
    Case("ani", "CH4", 3),
    Case("ani", "H2O", 2),
    Case("ani", "C2H4O", 2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hessian_equals_the_librarys_own_per_geometry(case):
    numbers, x = geometries(case.molecule, case.count)
    net = potential(case.kind, numbers)
    h = pipeline.hessian(net, x, [0])
    d = x[0].numel()
    assert h.shape == (case.count, 1, d, d) and h.dtype == torch.float64
    for b in range(case.count):
        expected = reference_hessian(case.kind, net, x[b])
        assert_close_to_max(h[b, 0], expected, 1e-9, f"{case.name}, geometry {b}")


@pytest.mark.parametrize("kind", ["mace", "ani"])
def test_a_batch_is_its_geometries_one_by_one(kind):
    """No edges between the molecules of a batch: each energy is that geometry's alone."""
    numbers, x = geometries("C2H4O", 3, seed=1)
    net = potential(kind, numbers)
    with torch.no_grad():
        together = net(x)
        alone = torch.cat([net(x[b : b + 1]) for b in range(3)])
    assert together.shape == (3, 1)
    assert_close_to_max(together, alone, 1e-13, kind)
    assert (together - together.mean()).abs().max() > 1e-6  # the geometries differ


@pytest.mark.usefixtures("float64_default")  # MACE's data pipeline keeps the default dtype
def test_mace_energy_equals_maces_own_radius_graph():
    """Every pair an edge (ours) and MACE's own data pipeline (pairs within r_max = 5 A) give the
    same energy: a chain 12 A long, so that most pairs lie beyond the cutoff."""
    _need("mace")
    from mace import data, tools
    from mace.tools import torch_geometric

    numbers = [6, 1, 8, 6, 1, 1, 6, 8, 1]
    g = torch.Generator().manual_seed(2)
    pos = torch.arange(9, dtype=torch.float64)[:, None] * torch.tensor([1.4, 0.3, 0.0])
    pos = pos + 0.1 * torch.randn(9, 3, generator=g, dtype=torch.float64)
    net = potential("mace", numbers)
    table = tools.AtomicNumberTable(sorted(set(numbers)))
    config = data.Configuration(atomic_numbers=np.array(numbers), positions=pos.numpy(),
                                properties={}, property_weights={})  # fmt: skip
    atomic = data.AtomicData.from_config(config, z_table=table, cutoff=5.0)
    loader = torch_geometric.dataloader.DataLoader([atomic], batch_size=1)
    batch = next(iter(loader)).to_dict()
    assert batch["positions"].dtype == torch.float64
    within = batch["edge_index"].shape[1]
    assert 0 < within < 9 * 8  # the cutoff removed pairs
    own = net.model(batch, training=False, compute_force=False)["energy"]
    with torch.no_grad():
        ours = net(pos[None])
    assert_close_to_max(ours.reshape(-1), own.detach().reshape(-1), 1e-12, "radius graph")


def test_ani_energy_is_torchanis_ase_calculator_in_ev():
    """The Hartree -> eV conversion: TorchANI's own ASE calculator gives eV."""
    _need("ani")
    import ase

    numbers, x = geometries("C2H4O", 1)
    net = potential("ani", numbers)
    atoms = ase.Atoms(numbers=numbers, positions=x[0].numpy())
    atoms.calc = net.model.ase()
    with torch.no_grad():
        ours = net(x).item()
    # torchani and ASE take Hartree from different CODATA releases (1e-8 apart)
    assert ours == pytest.approx(atoms.get_potential_energy(), rel=1e-7)
    assert abs(ours) > 100  # eV: 27 times the Hartree figure


def test_mace_seed_and_architecture_options():
    _need("mace")
    from pipeline.inputs.potentials import mace_energy

    numbers, x = geometries("H2O", 2)
    base = potential("mace", numbers)
    other = mace_energy(numbers, seed=1, hidden_irreps="8x0e + 8x1o", num_interactions=1)
    with torch.no_grad():
        e0 = base(x)
        same = mace_energy(numbers, seed=0).double()(x)
        e1 = other.double()(x)
    assert torch.equal(e0, same)
    assert (e1 - e0).abs().max() > 1e-6
    assert sum(p.numel() for p in other.parameters()) < sum(p.numel() for p in base.parameters())


def test_mace_saved_model_loads_only_when_trusted(tmp_path):
    _need("mace")
    from pipeline.inputs.potentials import mace_energy

    numbers, x = geometries("CH4", 2)
    net = potential("mace", numbers)
    path = tmp_path / "MACE.model"
    torch.save(net.model, path)
    with pytest.raises(PipelineError, match="model.net.trust") as err:
        mace_energy(numbers, model_path=str(path))
    assert err.value.key == "model.net.trust"
    loaded = mace_energy(numbers, model_path=str(path), trust=True).double()
    with torch.no_grad():
        assert_close_to_max(loaded(x), net(x), 0.0, "saved model")
    # its element table is the file's: an element it does not know is refused in one line
    with pytest.raises(PipelineError, match=r"knows the elements \[1, 6\], not \[8\]"):
        mace_energy([6, 8, 1], model_path=str(path), trust=True)
    with pytest.raises(PipelineError, match="not found") as err:
        mace_energy(numbers, model_path=str(tmp_path / "absent.model"), trust=True)
    assert err.value.key == "model.net.model_path"
    torch.save({"weights": torch.zeros(2)}, tmp_path / "dict.model")
    with pytest.raises(PipelineError, match="not a MACE model"):
        mace_energy(numbers, model_path=str(tmp_path / "dict.model"), trust=True)


BAD_NUMBERS = {
    "ani nitrogen": ("ani", [7, 1, 1, 1], "covers H, C and O .* not the atomic numbers \\[7\\]"),
    "ani empty": ("ani", [], "empty"),
    "mace not elements": ("mace", [0, 1, 200], "\\[0, 200\\] are not elements"),
    "mace string": ("mace", "CH4", "must be a list"),
}


@pytest.mark.parametrize("name", BAD_NUMBERS)
def test_bad_atomic_numbers_are_one_line(name):
    kind, numbers, message = BAD_NUMBERS[name]
    _need(kind)
    from pipeline.inputs.potentials import ani_energy, mace_energy

    with pytest.raises(PipelineError, match=message) as err:
        (mace_energy if kind == "mace" else ani_energy)(numbers)
    assert err.value.key == "model.net.atomic_numbers"
    assert "\n" not in str(err.value)


def test_positions_of_another_molecule_are_refused():
    numbers, _ = geometries("CH4", 1)
    _, x = geometries("H2O", 1)
    with pytest.raises(PipelineError, match="3 atoms per geometry, the molecule 5"):
        potential("ani", numbers)(x)


# The command line: positions in an .npy file, model=custom, the smallest eigenvalues.
CLI = {
    "mace": ("CH4", "pipeline.inputs.potentials.mace_energy"),
    "ani": ("C2H4O", "pipeline.inputs.potentials.ani_energy"),
}


@pytest.fixture(scope="module", autouse=True)
def cli_runs(request, tmp_path_factory):
    """Both runs, started side by side when this module's first test starts (they overlap with
    the other tests), if a command-line test is selected: {kind: (process, file, numbers, x)}."""
    here = request.node.path
    if not any(item.path == here and item.name.startswith("test_command_line")
               for item in request.session.items):  # fmt: skip
        yield {}
        return
    tmp = tmp_path_factory.mktemp("atoms_cli")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    runs = {}
    for kind, (molecule, target) in CLI.items():
        if _unavailable(kind):
            continue
        numbers, x = geometries(molecule, 2, seed=3)
        np.save(tmp / f"{kind}.npy", x.numpy())
        path = tmp / f"{kind}.h5"
        args = [
            "model=custom", f"model.net._target_={target}",
            f"+model.net.atomic_numbers=[{','.join(map(str, numbers))}]",
            "data=npy", f"data.path={tmp / f'{kind}.npy'}", "target.indices=[0]",
            "output=eigen", "output.which=SA", "dtype=float64", f"storage.path={path}",
            f"hydra.run.dir={tmp / kind}", "progress=false", "plots=false",
        ]  # fmt: skip
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        runs[kind] = (process, path, numbers, x)
    yield runs
    for process, *_ in runs.values():
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("kind", list(CLI))
def test_command_line_eigenvalues_equal_eigh_of_the_reference(cli_runs, kind):
    _need(kind)
    process, path, numbers, x = cli_runs[kind]
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, f"exit {process.returncode}\n{out}\n{err}"
    net = potential(kind, numbers)
    with h5py.File(path, "r") as f:
        values = torch.from_numpy(f["eigenvalues"][:])  # (N, 1, k)
        vectors = torch.from_numpy(f["eigenvectors"][:])  # (N, 1, k, D)
        assert f.attrs["dtype"] == "float64"
        np.testing.assert_array_equal(f["inputs"][:], x.numpy())
    k = values.shape[-1]
    assert k == 6
    for b in range(len(x)):
        h = reference_hessian(kind, net, x[b])
        ev = torch.linalg.eigvalsh(h)  # ascending: SA takes the first k
        scale = ev.abs().max()
        assert_close(values[b, 0], ev[:k], rtol=0.0, atol=1e-9 * scale.item())
        residual = (vectors[b, 0] @ h - values[b, 0, :, None] * vectors[b, 0]).norm(dim=-1)
        assert (residual <= 1e-8 * scale).all(), (kind, b, residual)


# timm architectures that torch.func cannot transform or that hide a trap for plain autograd.
# poolformerv2_s12: GroupNorm's double backward under vmap fails in float32. levit_128s: at one
# sample its BatchNorm2d outputs are flattened and transposed, and torch 2.13's CPU
# native_batch_norm_backward (eval) returns a wrong input gradient for the channels-last
# gradient of batch stride C that this gives (tested below): the reference folds every BatchNorm
# into a per-channel affine map, the same function without that kernel.
TIMM = {
    "poolformerv2_s12": {"num_classes": 4},
    "levit_128s": {"num_classes": 4, "img_size": 32},
}


@dataclass(frozen=True)
class TimmCase:
    name: str
    method: str
    dtype: torch.dtype
    samples: int

    @property
    def id(self) -> str:
        return f"{self.name}-{self.method}-{str(self.dtype)[6:]}-x{self.samples}"


TIMM_CASES = [
    TimmCase("poolformerv2_s12", "auto", torch.float32, 1),
    TimmCase("poolformerv2_s12", "autograd", torch.float64, 2),
    TimmCase("levit_128s", "auto", torch.float32, 1),
    TimmCase("levit_128s", "auto", torch.float64, 2),
]


@pytest.mark.parametrize("samples", [1, 2])
def test_autograd_refuses_levit_instead_of_a_wrong_hessian(samples):
    """method=autograd's probe (one sample) compares the gradient with differences of the
    outputs and sees torch's wrong BatchNorm gradient (see TIMM): one line, no numbers."""
    model = _timm_model("levit_128s")
    x = torch.randn(samples, 3, 32, 32, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)  # fmt: skip
    with pytest.raises(ArgumentError) as err:
        pipeline.hessian(model, x, [1], [0, 1], method="autograd")
    message = str(err.value)
    assert "\n" not in message and message.startswith("no method can differentiate the model")
    assert "autograd failed on a probe" in message and "disagrees with differences" in message


class ChannelAffine(nn.Module):
    """An eval-mode BatchNorm as x * scale + shift over dimension 1 (elementwise ops only)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", bn.bias.detach() - bn.running_mean * scale)

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)


def without_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every BatchNorm replaced by ``ChannelAffine``."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, name, ChannelAffine(child))
    return model.eval()


def _autograd_rows(model: nn.Module, x: Tensor, k: int, rows: list[int]) -> Tensor:
    """Rows (N, R, D) of output k's Hessian by double backward, one row at a time."""
    out = []
    for xn in x:
        u = xn[None].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(u)[0, k], u, create_graph=True)
        g = g.reshape(-1)
        out.append(torch.stack([torch.autograd.grad(g[r], u, retain_graph=True)[0].reshape(-1)
                                for r in rows]))  # fmt: skip
    return torch.stack(out)


@cache
def _timm_model(name: str) -> nn.Module:
    from tests.library_models import LibraryModel, unavailable

    if reason := unavailable("timm"):
        pytest.skip(reason)
    import timm

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        entry = LibraryModel(name, "timm", lambda: timm.create_model(name, **TIMM[name]),
                             (3, 32, 32), [1])  # fmt: skip
        return entry.build()
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize(
    "case", TIMM_CASES, ids=lambda c: c.id if isinstance(c, TimmCase) else None
)
def test_timm_model_is_exact(case):
    """Whatever method ``auto`` picks (or the one named), sampled rows equal float64 double
    backward rows of the BatchNorm-free copy: to 1e-9 in float64, to float32 rounding (1e-4 of the
    largest entry) in float32."""
    model64 = _timm_model(case.name)
    reference_model = without_batchnorm(model64)
    model = copy.deepcopy(model64).to(case.dtype).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.samples, 3, 32, 32, generator=g, dtype=torch.float64).to(case.dtype)
    d = x[0].numel()
    rows = [0, d // 2, d - 1]
    h = pipeline.hessian(model, x, [1], rows, method=case.method)
    expected = _autograd_rows(reference_model, x.double(), 1, rows)
    assert expected.abs().max() > 0
    rtol = 1e-9 if case.dtype == torch.float64 else 1e-4
    assert_close_to_max(h[:, 0].double(), expected, rtol, case.id)
