"""Interatomic potentials as the pipeline's models: positions (B, n, 3) in Angstrom -> energy
(B, 1) in eV, for one fixed molecule (its atomic numbers are part of the model).

``mace_energy`` wraps a MACE model (random weights, or a saved model file), ``ani_energy`` a
TorchANI model (random weights). Both are ``_target_``s for ``model=custom``::

    python -m pipeline model=custom model.net._target_=pipeline.inputs.potentials.mace_energy \\
        +model.net.atomic_numbers=[6,1,1,1,1] data=npy data.path=positions.npy

mace-torch, e3nn, torchani and ase (the ``atoms`` extra) are imported inside the factories.
``mace_own_hessian`` and ``ani_reference_hessian`` are the references the tests and
``benchmarks/potentials.py`` compare against: MACE's own ``compute_hessian=True`` and
``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PipelineError
from .libraries import import_mace

ANI_SYMBOLS = ("H", "C", "O")
"""The elements of the TorchANI model ``ani_energy`` builds."""
ANI_NUMBERS = (1, 6, 8)


def _numbers(atomic_numbers: Sequence[int]) -> list[int]:
    """The atomic numbers as a list of ints, checked (Hydra passes a ListConfig)."""
    key = "model.net.atomic_numbers"
    if isinstance(atomic_numbers, (str, bytes)) or not isinstance(atomic_numbers, Sequence):
        raise PipelineError(
            f"atomic_numbers must be a list of atomic numbers, got {atomic_numbers!r}", key
        )
    try:
        numbers = [int(z) for z in atomic_numbers]
    except (TypeError, ValueError):
        raise PipelineError(
            f"atomic_numbers must be a list of atomic numbers, got {list(atomic_numbers)!r}", key
        ) from None
    if not numbers:
        raise PipelineError("atomic_numbers is empty: a molecule needs atoms", key)
    bad = sorted({z for z in numbers if not 1 <= z <= 118})
    if bad:
        raise PipelineError(f"atomic numbers {bad} are not elements (1 to 118)", key)
    return numbers


def _import(name: str, package: str) -> Any:
    """``name`` imported, or a one-line error naming the extra to install."""
    try:
        if name == "mace.modules":
            return import_mace()
        import importlib

        return importlib.import_module(name)
    except ImportError as err:
        raise PipelineError(
            f"{package} is not installed ({err}): pip install 'pipeline[atoms]'",
            "model.net._target_",
        ) from None


class MACEEnergy(nn.Module):
    """A MACE model as positions (B, n, 3) -> energy (B, 1) in eV for one molecule.

    The B geometries become one graph of B * n nodes with a batch index; every ordered pair of
    distinct atoms of a molecule is an edge (MACE's smooth cutoff makes the pairs beyond its
    ``r_max`` contribute exactly zero, so this equals the energy on a radius graph).

    Args:
        model: a ``mace.modules.MACE`` (or ``ScaleShiftMACE``), called as MACE's calculator
            calls it, on a dict of graph tensors.
        atomic_numbers: the molecule's atomic numbers (n,); each must be in the model's table.
    """

    def __init__(self, model: nn.Module, atomic_numbers: Sequence[int]):
        super().__init__()
        self.model = model
        table = [int(z) for z in model.atomic_numbers.tolist()]
        missing = sorted({z for z in atomic_numbers if z not in table})
        if missing:
            raise PipelineError(
                f"the MACE model knows the elements {table}, not {missing}",
                "model.net.atomic_numbers",
            )
        n = len(atomic_numbers)
        species = torch.tensor([table.index(z) for z in atomic_numbers])
        attrs = torch.nn.functional.one_hot(species, len(table)).to(torch.get_default_dtype())
        self.register_buffer("node_attrs", attrs)  # (n, elements)
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        pairs = i != j
        self.register_buffer("edge_index", torch.stack([i[pairs], j[pairs]]))  # (2, n (n-1))
        self.atomic_numbers = list(atomic_numbers)

    def graph(self, positions: Tensor) -> dict[str, Tensor]:
        """MACE's input dict for positions (B, n, 3): the B molecules as one graph."""
        b, n, _ = positions.shape
        if n != len(self.atomic_numbers):
            raise PipelineError(
                f"the positions have {n} atoms per geometry, the molecule "
                f"{len(self.atomic_numbers)} (model.net.atomic_numbers)",
                "model.net.atomic_numbers",
            )
        device, dtype = positions.device, positions.dtype
        offsets = n * torch.arange(b, device=device)
        edges = (self.edge_index[:, None, :] + offsets[None, :, None]).reshape(2, -1)
        zeros = torch.zeros(edges.shape[1], 3, dtype=dtype, device=device)
        return {
            "positions": positions.reshape(b * n, 3),
            "node_attrs": self.node_attrs.to(dtype).repeat(b, 1),
            "edge_index": edges,
            "shifts": zeros,
            "unit_shifts": zeros,
            "batch": torch.arange(b, device=device).repeat_interleave(n),
            "ptr": n * torch.arange(b + 1, device=device),
            "cell": torch.zeros(3 * b, 3, dtype=dtype, device=device),
        }

    def forward(self, positions: Tensor) -> Tensor:
        """Energies (B, 1) in eV of positions (B, n, 3) in Angstrom."""
        out = self.model(self.graph(positions), training=False, compute_force=False)
        return out["energy"].reshape(-1, 1)


def mace_energy(
    atomic_numbers: Sequence[int],
    model_path: str | None = None,
    trust: bool = False,
    r_max: float = 5.0,
    seed: int = 0,
    num_interactions: int = 2,
    hidden_irreps: str = "32x0e + 32x1o",
    max_ell: int = 2,
    correlation: int = 3,
) -> MACEEnergy:
    """A MACE potential for one molecule: positions (B, n, 3) -> energy (B, 1), eV and Angstrom.

    Without ``model_path``: a ``ScaleShiftMACE`` with random weights (seeded), built as MACE's
    own tests build it (residual interaction blocks, 8 Bessel functions, polynomial cutoff of
    order 5, a ``16x0e`` readout MLP, SiLU gates), over the elements of ``atomic_numbers``.

    Args:
        atomic_numbers: the molecule's atomic numbers (n,).
        model_path: a MACE model file saved with ``torch.save(model)`` (what ``mace_run_train``
            writes, e.g. ``MACE.model``). Loading it unpickles code: needs ``trust``.
        trust: the user trusts ``model_path`` (``model.net.trust=true``).
        r_max: cutoff radius (Angstrom) of a random model.
        seed: seed of a random model's weights.
        num_interactions, hidden_irreps, max_ell, correlation: a random model's architecture.

    Returns:
        The module; the pipeline converts it to the run's dtype with ``.to(dtype)``.

    Raises:
        PipelineError: bad atomic numbers, an element the saved model does not know, a missing
            or untrusted model file, or mace-torch not installed.
    """
    numbers = _numbers(atomic_numbers)
    if model_path is not None:
        _check_model_file(str(model_path), trust)  # before the slow import
    modules = _import("mace.modules", "mace-torch")
    if model_path is not None:
        model = _load_mace(str(model_path))
    else:
        import numpy as np
        from e3nn import o3
        from mace.tools import AtomicNumberTable

        table = AtomicNumberTable(sorted(set(numbers)))
        block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = modules.ScaleShiftMACE(
                r_max=float(r_max),
                num_bessel=8,
                num_polynomial_cutoff=5,
                max_ell=int(max_ell),
                interaction_cls=block,
                interaction_cls_first=block,
                num_interactions=int(num_interactions),
                num_elements=len(table.zs),
                hidden_irreps=o3.Irreps(str(hidden_irreps)),
                MLP_irreps=o3.Irreps("16x0e"),
                gate=torch.nn.functional.silu,
                atomic_energies=np.zeros(len(table.zs)),
                avg_num_neighbors=8.0,
                atomic_numbers=table.zs,
                correlation=int(correlation),
                radial_type="bessel",
                atomic_inter_scale=1.0,
                atomic_inter_shift=0.0,
            )
    return MACEEnergy(model, numbers).eval()


def _check_model_file(path: str, trust: bool) -> None:
    if not Path(path).is_file():
        raise PipelineError(f"MACE model file {path!r} not found", "model.net.model_path")
    if not trust:
        raise PipelineError(
            f"loading the MACE model {path!r} unpickles it, which can run any code the file "
            "contains: set model.net.trust=true if you trust this file",
            "model.net.trust",
        )


def _load_mace(path: str) -> nn.Module:
    """The module saved in ``path`` (checked and trusted by ``_check_model_file``)."""
    key = "model.net.model_path"
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise PipelineError(
            f"cannot load the MACE model {path!r}: {type(err).__name__}: {err}", key
        ) from err
    if not isinstance(model, nn.Module) or not hasattr(model, "atomic_numbers"):
        raise PipelineError(
            f"{path!r} holds a {type(model).__name__}, not a MACE model (a module saved with "
            "torch.save(model), as mace_run_train writes it)",
            key,
        )
    return model


class ANIEnergy(nn.Module):
    """A TorchANI model as positions (B, n, 3) -> energy (B, 1) in eV for one molecule.

    The species are expanded over the batch; TorchANI builds its own neighbour list; its energy
    (Hartree) is converted with ASE's ``units.Hartree``.

    Args:
        model: a ``torchani`` ANI model taking ``(species, coordinates)`` with atomic numbers as
            species (``periodic_table_index=True``).
        atomic_numbers: the molecule's atomic numbers (n,).
        hartree: eV per Hartree.
    """

    def __init__(self, model: nn.Module, atomic_numbers: Sequence[int], hartree: float):
        super().__init__()
        self.model = model
        self.register_buffer("species", torch.tensor(list(atomic_numbers)))
        self.hartree = float(hartree)

    def forward(self, positions: Tensor) -> Tensor:
        """Energies (B, 1) in eV of positions (B, n, 3) in Angstrom."""
        b, n, _ = positions.shape
        if n != self.species.numel():
            raise PipelineError(
                f"the positions have {n} atoms per geometry, the molecule "
                f"{self.species.numel()} (model.net.atomic_numbers)",
                "model.net.atomic_numbers",
            )
        species = self.species.expand(b, n)
        energies = self.model((species, positions)).energies  # (B,) Hartree
        return (energies * self.hartree).reshape(-1, 1)


def ani_energy(atomic_numbers: Sequence[int], seed: int = 0) -> ANIEnergy:
    """A TorchANI potential for one molecule with random weights (seeded):
    ``torchani.models.simple_ani(symbols=("H", "C", "O"), lot="wb97x-631gd")`` (its own
    neighbour list, with its xTB repulsion), positions (B, n, 3) -> energy (B, 1) in eV.

    Args:
        atomic_numbers: the molecule's atomic numbers (n,): H, C and O only.
        seed: seed of the weights.

    Raises:
        PipelineError: atomic numbers other than 1, 6 and 8, or torchani/ase not installed.
    """
    numbers = _numbers(atomic_numbers)
    other = sorted({z for z in numbers if z not in ANI_NUMBERS})
    if other:
        raise PipelineError(
            f"the TorchANI model covers H, C and O (1, 6, 8), not the atomic numbers {other}",
            "model.net.atomic_numbers",
        )
    import os

    os.environ.setdefault("TORCHANI_NO_WARN_EXTENSIONS", "1")  # the CUDA extensions are optional
    torchani = _import("torchani", "torchani")
    units = _import("ase.units", "ase")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchani.models.simple_ani(symbols=ANI_SYMBOLS, lot="wb97x-631gd")
    return ANIEnergy(model, numbers, units.Hartree).eval()


def mace_own_hessian(module: MACEEnergy, positions: Tensor) -> Tensor:
    """MACE's own Hessian (``compute_hessian=True``: a ``vmap`` over ``autograd.grad`` of its
    forces) of the energy of one geometry.

    Args:
        module: the wrapper ``mace_energy`` returns.
        positions: (n, 3).

    Returns:
        (3n, 3n), d^2 E / dx dx in eV/Angstrom^2, rows and columns ordered as
        ``positions.reshape(-1)``.
    """
    data = module.graph(positions.detach().clone()[None])
    out = module.model(data, training=False, compute_force=True, compute_hessian=True)
    n = positions.shape[0]
    return out["hessian"].detach().reshape(3 * n, 3 * n)


def ani_reference_hessian(module: nn.Module, positions: Tensor, vectorize: bool = True) -> Tensor:
    """``torch.autograd.functional.hessian`` of a (B, n, 3) -> (B, 1) potential at one geometry.

    Args:
        module: e.g. the wrapper ``ani_energy`` returns.
        positions: (n, 3).
        vectorize: passed to ``torch.autograd.functional.hessian``.

    Returns:
        (3n, 3n).
    """
    n = positions.shape[0]

    def energy(flat: Tensor) -> Tensor:
        return module(flat.reshape(1, n, 3)).sum()

    hess = torch.autograd.functional.hessian(
        energy, positions.detach().reshape(-1), vectorize=vectorize
    )
    return hess.reshape(3 * n, 3 * n)
