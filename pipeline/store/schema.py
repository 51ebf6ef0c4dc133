"""The one schema of a result file: every dataset's name, dimensions and dtype, per output kind.

A dimension name stands for its size in a run: ``sample`` N, ``output`` K, ``row`` R (the chosen
rows), ``column`` D (the flat input), ``eigenpair`` k, ``feature`` C (the features at the cut of a
factored Hessian), ``atom`` n (the atoms of ``data=ase``, D = 3n). A dtype of None is the
result's dtype. The writer creates the datasets from these declarations, the reader checks a
file against them and gives them their natural names (``r.diagonal``, ``r.eigenvalues``), and
inspect and verify read the same table.

``dense`` files also hold the statistics taken while blocks are written (``/diagonal``,
``/row_norm``, ``/trace``, ``/frobenius``, ``/symmetry``, ``/nonfinite``, ``/block_sums``:
``pipeline.store.layout``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("dense", "diagonal", "rows", "eigen", "factored")


@dataclass(frozen=True)
class Field:
    """One dataset: its name, its dimensions (first always ``sample``) and its dtype."""

    name: str
    dims: tuple[str, ...]
    dtype: str | None = None  # None: the result's dtype

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] for d in self.dims)


GRADIENT = Field("gradient", ("sample", "output", "column"))

# kind -> the datasets its blocks produce (each block: samples [s0, s1), all of the rest)
FIELDS: dict[str, tuple[Field, ...]] = {
    "dense": (Field("hessian", ("sample", "output", "row", "column")), GRADIENT),
    "diagonal": (Field("diagonal", ("sample", "output", "column")), GRADIENT),
    "rows": (Field("hessian", ("sample", "output", "row", "column")), GRADIENT),
    "eigen": (
        Field("eigenvalues", ("sample", "output", "eigenpair")),
        Field("eigenvectors", ("sample", "output", "eigenpair", "column")),
        Field("residuals", ("sample", "output", "eigenpair")),
        GRADIENT,
    ),
    "factored": (
        Field("jacobian", ("sample", "feature", "column")),
        Field("curvature", ("sample", "output", "feature", "feature")),
        GRADIENT,
    ),
}

# kind -> datasets derived from the blocks' when the file is finished
DERIVED: dict[str, tuple[Field, ...]] = {
    "diagonal": (Field("trace", ("sample", "output"), "f8"),),
}

# kind -> datasets of the run's description (not per sample)
DESCRIPTION: dict[str, tuple[Field, ...]] = {
    "rows": (Field("rows", ("row",), "i8"),),
}


# kind -> what its blocks also compute when ``output.mass_weighted`` (eigen): the vibrational
# frequencies of the mass-weighted eigenvalues, in cm^-1 (imaginary ones negative)
MASS_WEIGHTED: dict[str, tuple[Field, ...]] = {
    "eigen": (Field("frequencies", ("sample", "output", "eigenpair"), "f8"),),
}

# the atoms of the inputs (``data=ase``), in every kind of result whose data has them
ATOMS = (Field("atomic_numbers", ("atom",), "i8"), Field("masses", ("atom",), "f8"))


def block_fields(kind: str, mass_weighted: bool = False) -> tuple[Field, ...]:
    """The datasets each block of ``kind`` produces."""
    return FIELDS[kind] + (MASS_WEIGHTED.get(kind, ()) if mass_weighted else ())


def fields(kind: str, mass_weighted: bool = False) -> tuple[Field, ...]:
    """Every dataset that ``kind`` computes or derives (with ``mass_weighted``: its
    frequencies too)."""
    return block_fields(kind, mass_weighted) + DERIVED.get(kind, ()) + DESCRIPTION.get(kind, ())


def numbers(kind: str, sizes: dict[str, int]) -> int:
    """How many numbers the datasets of ``kind``'s blocks hold for ``sizes`` (estimates use
    ``FEATURE_GUESS`` for C, known only once a factored block is computed)."""
    known = {"feature": FEATURE_GUESS, **sizes}
    return sum(math.prod(f.shape(known)) for f in FIELDS[kind])


FEATURE_GUESS = 16  # C of ``factored`` before computing: a classifier's logits, roughly


def main_field(kind: str) -> Field:
    """The dataset a run of ``kind`` is about (the one its summary line names)."""
    return FIELDS[kind][0]
