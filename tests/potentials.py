"""A message-passing interatomic potential written as users write SchNet-style models, and
molecules to run it on.

``MessagePassingPotential`` maps the positions (B, n, 3) of B geometries of one molecule to their
energies (B, 1), the way such models are written for a batch of graphs: the B samples are
concatenated into one node axis of B * n atoms with a batch index, the edges join atoms of the
same sample (every ordered pair, or the pairs closer than the cutoff found in the forward), atom
features are gathered onto the edges, multiplied by a filter of the distances (SchNet's
continuous-filter convolution) and summed back onto the atoms, and the per-atom energies are
summed per molecule. Nothing in it is written for the Hessian engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

SPECIES = (1, 6, 7, 8)  # H, C, N, O


class GaussianRBF(nn.Module):
    """exp(-gamma (d - mu_k)^2) for k centres mu_k evenly spread over [0, cutoff]."""

    def __init__(self, n_rbf: int, cutoff: float):
        super().__init__()
        self.register_buffer("centers", torch.linspace(0.0, cutoff, n_rbf))
        self.gamma = 0.5 / (cutoff / max(n_rbf - 1, 1)) ** 2

    def forward(self, dist: Tensor) -> Tensor:
        return torch.exp(-self.gamma * (dist.unsqueeze(-1) - self.centers) ** 2)


def cosine_cutoff(dist: Tensor, cutoff: float) -> Tensor:
    """0.5 (cos(pi d / cutoff) + 1) below the cutoff, 0 beyond."""
    return 0.5 * (torch.cos(dist * math.pi / cutoff) + 1.0) * (dist < cutoff).to(dist.dtype)


class Interaction(nn.Module):
    """One SchNet interaction: a continuous-filter convolution and an atom-wise MLP."""

    def __init__(self, width: int, n_rbf: int):
        super().__init__()
        self.filter = nn.Sequential(nn.Linear(n_rbf, width), nn.Softplus(), nn.Linear(width, width))
        self.in2f = nn.Linear(width, width, bias=False)
        self.f2out = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, h: Tensor, rbf: Tensor, fcut: Tensor, src: Tensor, dst: Tensor) -> Tensor:
        w = self.filter(rbf) * fcut.unsqueeze(-1)  # (E, F)
        x = self.in2f(h)  # (atoms, F)
        messages = x[src] * w  # (E, F)
        index = dst.unsqueeze(-1).expand_as(messages)
        aggregated = torch.zeros_like(x).scatter_add(0, index, messages)  # onto the atoms
        return self.f2out(aggregated)


class MessagePassingPotential(nn.Module):
    """E(positions) of a fixed molecule: positions (B, n, 3) in Angstrom -> energies (B, 1).

    Args:
        numbers: the atomic numbers (n,) of the molecule's atoms.
        cutoff: the radius (Angstrom) of the neighbour list and of the smooth cutoff.
        width: features per atom; n_rbf: radial basis functions; interactions: blocks.
        neighbours: ``"all"``: every ordered pair of distinct atoms is an edge (a buffer);
            ``"radius"``: the pairs closer than ``cutoff``, found in the forward.
    """

    def __init__(
        self,
        numbers: Sequence[int],
        cutoff: float = 5.0,
        width: int = 32,
        n_rbf: int = 16,
        interactions: int = 2,
        neighbours: str = "all",
    ):
        super().__init__()
        if neighbours not in ("all", "radius"):
            raise ValueError(f"neighbours must be 'all' or 'radius', not {neighbours!r}")
        self.cutoff, self.neighbours = float(cutoff), neighbours
        self.register_buffer("numbers", torch.as_tensor(list(numbers), dtype=torch.long))
        n = len(self.numbers)
        src, dst = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        off_diagonal = src != dst
        self.register_buffer("pairs", torch.stack([src[off_diagonal], dst[off_diagonal]]))
        self.embedding = nn.Embedding(10, width)
        self.rbf = GaussianRBF(n_rbf, cutoff)
        self.interactions = nn.ModuleList(Interaction(width, n_rbf) for _ in range(interactions))
        self.readout = nn.Sequential(nn.Linear(width, width // 2), nn.SiLU(),
                                     nn.Linear(width // 2, 1))  # fmt: skip

    def edges(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Source and target atoms (E,) of the edges, numbered in the concatenated node axis."""
        batch_size, n_atoms, _ = positions.shape
        if self.neighbours == "all":
            offsets = torch.arange(batch_size, device=positions.device) * n_atoms
            edges = (self.pairs.unsqueeze(1) + offsets.unsqueeze(-1)).reshape(2, -1)
            return edges[0], edges[1]
        dist = torch.cdist(positions, positions)  # (B, n, n)
        eye = torch.eye(n_atoms, dtype=torch.bool, device=positions.device)
        sample, i, j = torch.nonzero((dist < self.cutoff) & ~eye, as_tuple=True)
        return i + sample * n_atoms, j + sample * n_atoms

    def forward(self, positions: Tensor) -> Tensor:
        batch_size, n_atoms, _ = positions.shape
        pos = positions.reshape(-1, 3)  # (B n, 3)
        numbers = self.numbers.repeat(batch_size)
        batch = torch.arange(batch_size, device=positions.device).repeat_interleave(n_atoms)
        src, dst = self.edges(positions)
        vec = pos[dst] - pos.index_select(0, src)  # (E, 3)
        dist = vec.norm(dim=-1)
        rbf = self.rbf(dist)
        fcut = cosine_cutoff(dist, self.cutoff)
        h = self.embedding(numbers)
        for interaction in self.interactions:
            h = h + interaction(h, rbf, fcut, src, dst)
        atom_energy = self.readout(h).squeeze(-1)  # (B n,)
        energy = torch.zeros(batch_size, dtype=positions.dtype, device=positions.device)
        energy = energy.index_add(0, batch, atom_energy)
        return energy.unsqueeze(-1)


def random_molecule(n_atoms: int, seed: int = 0) -> tuple[list[int], Tensor]:
    """Atomic numbers (H, C, N, O) and positions (n, 3) in Angstrom of a made-up molecule.

    Atoms are placed one by one, each 1.0-1.5 A from an atom placed before and at least 1.0 A
    from all of them, within a sphere holding about 0.08 atoms per cubic Angstrom (organic
    matter: 0.08-0.12), so that each atom has its nearest neighbours at 1-1.5 A and a 5 A radius
    holds some 40 atoms in a large molecule.
    """
    gen = torch.Generator().manual_seed(seed)
    weights = torch.tensor([0.5, 0.3, 0.1, 0.1])
    numbers = [SPECIES[int(i)] for i in torch.multinomial(weights, n_atoms, True, generator=gen)]
    radius = (3 * n_atoms / (4 * math.pi * 0.08)) ** (1 / 3) + 1.0
    pos = torch.zeros(n_atoms, 3, dtype=torch.float64)
    placed = 1
    tries = 0
    while placed < n_atoms:
        tries += 1
        if tries % (50 * n_atoms) == 0:
            radius *= 1.05  # crowded: give the molecule a little more room
        anchor = pos[int(torch.randint(placed, (1,), generator=gen))]
        direction = torch.randn(3, generator=gen, dtype=torch.float64)
        length = 1.0 + 0.5 * torch.rand((), generator=gen, dtype=torch.float64)
        candidate = anchor + length * direction / direction.norm()
        if candidate.norm() > radius:
            continue
        near = (pos[:placed] - candidate).norm(dim=-1)
        if near.min() < 1.0 or int((near < 2.0).sum()) > 2:  # bonded to at most two so far
            continue
        pos[placed] = candidate
        placed += 1
    return numbers, (pos - pos.mean(0)).to(torch.get_default_dtype())


def trajectory(positions: Tensor, frames: int, noise: float = 0.05, seed: int = 0) -> Tensor:
    """``frames`` geometries (frames, n, 3) around ``positions`` (n, 3): each atom displaced by
    Gaussian noise of ``noise`` Angstrom per coordinate, independently per frame."""
    gen = torch.Generator().manual_seed(seed)
    shake = torch.randn(frames, *positions.shape, generator=gen, dtype=torch.float64)
    return positions.unsqueeze(0) + (noise * shake).to(positions.dtype)


class GatherScatterPotential(MessagePassingPotential):
    """The same potential written with other forms users write (PyG / torch_scatter style):
    ``torch.gather`` with an index expanded over the features, ``scatter_add_`` onto the atoms,
    the edges beyond the cutoff dropped with a boolean mask (a neighbour list found in the
    forward), and ``scatter_add`` of the atoms' energies over the batch index."""

    def forward(self, positions: Tensor) -> Tensor:
        batch_size, n_atoms, _ = positions.shape
        pos = positions.reshape(-1, 3)
        numbers = self.numbers.repeat(batch_size)
        batch = torch.arange(batch_size, device=positions.device).repeat_interleave(n_atoms)
        offsets = torch.arange(batch_size, device=positions.device) * n_atoms
        src, dst = (self.pairs.unsqueeze(1) + offsets.unsqueeze(-1)).reshape(2, -1)
        vec = torch.gather(pos, 0, dst.unsqueeze(-1).expand(-1, 3)) - torch.gather(
            pos, 0, src.unsqueeze(-1).expand(-1, 3)
        )
        if self.neighbours == "radius":
            keep = (vec * vec).sum(-1) < self.cutoff**2
            vec, src, dst = vec[keep], src[keep], dst[keep]
        dist = torch.sqrt((vec * vec).sum(-1))
        rbf = self.rbf(dist)
        fcut = cosine_cutoff(dist, self.cutoff)
        h = self.embedding(numbers)
        for block in self.interactions:
            w = block.filter(rbf) * fcut[:, None]
            x = block.in2f(h)
            messages = x.index_select(0, src) * w
            index = dst.unsqueeze(-1).expand_as(messages)
            h = h + block.f2out(torch.zeros_like(x).scatter_add_(0, index, messages))
        atom_energy = self.readout(h)  # (B n, 1)
        energy = torch.zeros(batch_size, 1, dtype=positions.dtype, device=positions.device)
        return energy.scatter_add(0, batch.unsqueeze(-1), atom_energy)


class IndexPutPotential(MessagePassingPotential):
    """The same potential with ``index_put_(..., accumulate=True)`` onto the atoms, the
    molecule's energy as a view and a sum over its atoms, and a radius list made as
    ``radius_graph`` makes it: the distances between all atoms of the batch (``torch.cdist`` of
    the concatenated positions), kept within the cutoff and within a molecule."""

    def forward(self, positions: Tensor) -> Tensor:
        batch_size, n_atoms, _ = positions.shape
        pos = positions.flatten(0, 1)
        if self.neighbours == "radius":
            batch = torch.arange(batch_size, device=pos.device).repeat_interleave(n_atoms)
            same = batch.unsqueeze(0) == batch.unsqueeze(1)
            close = torch.cdist(pos, pos) < self.cutoff
            src, dst = torch.nonzero(close & same & ~torch.eye(pos.shape[0], dtype=torch.bool,
                                                               device=pos.device)).T  # fmt: skip
        else:
            src, dst = self.edges(positions)
        vec = pos[dst] - pos[src]
        dist = torch.linalg.vector_norm(vec, dim=-1)
        rbf = self.rbf(dist)
        fcut = cosine_cutoff(dist, self.cutoff)
        h = self.embedding(self.numbers.repeat(batch_size))
        for block in self.interactions:
            messages = block.in2f(h)[src] * (block.filter(rbf) * fcut.unsqueeze(-1))
            total = h.new_zeros(h.shape).index_put_((dst,), messages, accumulate=True)
            h = h + block.f2out(total)
        return self.readout(h).view(batch_size, n_atoms).sum(dim=1, keepdim=True)
