"""A pure-torch interatomic potential for the tests of ``data=ase``: harmonic springs between
every pair of atoms, built by a factory that takes the atoms' numbers (as the MACE and TorchANI
factories do). Energies in eV, positions in Angstrom."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


class Springs(nn.Module):
    """E = sum over pairs i < j of k / 2 (r_ij - r0_ij)^2: positions (B, n, 3) -> (B, 1).

    r0_ij is the sum of the two atoms' covalent radii (ASE's table) times ``stretch``.
    """

    def __init__(self, atomic_numbers: list[int], k: float = 5.0, stretch: float = 1.0):
        super().__init__()
        from ase.data import covalent_radii

        z = torch.as_tensor(list(atomic_numbers))
        i, j = torch.triu_indices(len(z), len(z), 1)
        radii = torch.as_tensor(covalent_radii, dtype=torch.float64)[z]
        self.register_buffer("i", i)
        self.register_buffer("j", j)
        self.register_buffer("r0", stretch * (radii[i] + radii[j]))
        self.k = float(k)

    def forward(self, pos: Tensor) -> Tensor:
        diff = pos[:, self.i] - pos[:, self.j]  # (B, pairs, 3)
        r = torch.sqrt((diff * diff).sum(-1))
        return (0.5 * self.k * (r - self.r0) ** 2).sum(-1, keepdim=True)


def spring_energy(atomic_numbers: list[int], k: float = 5.0, stretch: float = 1.0) -> Springs:
    """The factory a config names: ``model.net._target_=tests.springs.spring_energy``."""
    return Springs(atomic_numbers, k, stretch)


def dimer_hessian(pos: np.ndarray, k: float, r0: float) -> np.ndarray:
    """Closed form: the (6, 6) Hessian of k / 2 (|x2 - x1| - r0)^2 at positions (2, 3):
    [[A, -A], [-A, A]] with A = k (u u^T + (1 - r0 / r) (I - u u^T)), u the unit bond vector."""
    d = pos[1] - pos[0]
    r = float(np.linalg.norm(d))
    u = d / r
    uu = np.outer(u, u)
    a = k * (uu + (1 - r0 / r) * (np.eye(3) - uu))
    return np.block([[a, -a], [-a, a]])


def dimer_eigenvalues(pos: np.ndarray, masses: np.ndarray, k: float, r0: float) -> np.ndarray:
    """Closed form: the eigenvalues of the dimer's mass-weighted Hessian, ascending or not:
    k / mu along the bond, k (1 - r0 / r) / mu twice across it (mu the reduced mass), and 0
    three times (translations)."""
    r = float(np.linalg.norm(pos[1] - pos[0]))
    mu = masses[0] * masses[1] / (masses[0] + masses[1])
    across = k * (1 - r0 / r) / mu
    return np.array([k / mu, across, across, 0.0, 0.0, 0.0])
