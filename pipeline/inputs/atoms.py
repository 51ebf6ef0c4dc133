"""Atoms read with ASE (``data=ase``): the frames of a slice, their atomic numbers and masses,
the atomic numbers handed to a model's factory, and vibrational frequencies from ASE.

Only the slice's frames are parsed: ``ase.io.iread`` with a slice stops scanning an extxyz file
after the slice's last frame and reads a trajectory's frames by index; ``data.indices`` are read
as a few slices with steps (``[0, 500, 1000]`` as ``0:1001:500``). The atomic numbers and masses
are those of the slice's first frame, and every other frame must have the same ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config.schema import AseData, ModelConf
from ..errors import PipelineError

log = logging.getLogger(__name__)
FREQUENCY_CHUNK = 96  # eigenvalues converted per VibrationsData (a diagonal 96 x 96 Hessian)


@dataclass
class Frames:
    """The frames of a slice.

    Attributes:
        positions: (N, n, 3) float64, Angstrom.
        atomic_numbers: (n,) int64.
        masses: (n,) float64, atomic mass units (``atoms.get_masses()``: the file's, else ASE's).
        sample_index: (N,) each frame's index in the file.
    """

    positions: np.ndarray
    atomic_numbers: np.ndarray
    masses: np.ndarray
    sample_index: np.ndarray


def read_slice(cfg: AseData) -> tuple[dict[int, Any], int]:
    """The frames of the slice that ``data.start``/``data.stop`` or ``data.indices`` select
    from ``data.path``, by source index, and the file's length as far as reading them tells
    (``pipeline.inputs.data.select`` checks the slice against it).

    Raises:
        PipelineError: a missing or unreadable file (``data.path``), an unknown
            ``data.format``, an empty slice or a negative index.
    """
    path = cfg.path
    if not path or not Path(path).is_file():
        raise PipelineError(f"file {path!r} not found", "data.path")
    if cfg.indices is not None:
        wanted = np.asarray(list(cfg.indices), dtype=np.int64)
        if wanted.size == 0:
            raise PipelineError("the data slice is empty: data.indices is []", "data.indices")
        if (wanted < 0).any():
            raise PipelineError(
                f"sample index {int(wanted[wanted < 0][0])} is out of range: frames are "
                "counted from 0",
                "data.indices",
            )
        lo, hi = int(wanted.min()), int(wanted.max()) + 1
    else:
        lo, hi = cfg.start, cfg.stop
        if hi is not None and hi <= lo:
            raise PipelineError(
                "the data slice is empty: data.stop must exceed data.start", "data.stop"
            )
    read = {}  # source index -> atoms
    if cfg.indices is not None:
        for run in _runs(np.unique(wanted)):
            read.update(zip(range(run.start, run.stop, run.step), _iread(cfg, run), strict=False))
        length = hi if len(read) == len(np.unique(wanted)) else _count(cfg)
        return read, length
    read = dict(enumerate(_iread(cfg, slice(lo, hi)), start=lo))
    if hi is None or len(read) < hi - lo:  # the file ends inside the slice: its length is known
        length = lo + len(read) if read else _count(cfg)
    else:
        length = hi  # (at least)
    return read, length


def _runs(indices: np.ndarray, most: int = 16) -> list[slice]:
    """Sorted unique indices as slices with steps (``[0, 500, 1000, 1001]``: ``0:1001:500``,
    ``1001:1002``), so that only the frames asked for are parsed; more than ``most`` slices: one
    slice over their range (each slice scans an extxyz file from its start)."""
    runs, i = [], 0
    while i < len(indices):
        start = int(indices[i])
        step = int(indices[i + 1]) - start if i + 1 < len(indices) else 1
        j = i + 1
        while j < len(indices) and int(indices[j]) - int(indices[j - 1]) == step:
            j += 1
        runs.append(slice(start, int(indices[j - 1]) + 1, step))
        i = j
    if len(runs) > most:
        return [slice(int(indices[0]), int(indices[-1]) + 1, 1)]
    return runs


def frames(path: str, read: dict[int, Any], idx: np.ndarray) -> Frames:
    """The frames ``idx`` (source indices, in order, repeats allowed) of those ``read``, checked
    to have the atoms of the first.

    Raises:
        PipelineError: a frame whose atoms (numbers, order, masses) differ from the first
            frame's, or frames without atoms (``data.path``).
    """
    first = read[int(idx[0])]
    numbers = np.asarray(first.get_atomic_numbers(), dtype=np.int64)
    masses = np.asarray(first.get_masses(), dtype=np.float64)
    if numbers.size == 0:
        raise PipelineError(f"frame {int(idx[0])} of {path} has no atoms", "data.path")
    for i in sorted(read):
        _check_same_atoms(path, int(idx[0]), numbers, masses, i, read[i])
    positions = np.stack([np.asarray(read[int(i)].get_positions(), np.float64) for i in idx])
    return Frames(positions, numbers, masses, idx)


def _iread(cfg: AseData, index: slice) -> Iterator[Any]:
    """``ase.io.iread`` of the slice, its failures as one line naming the key to fix."""
    from ase.io import iread
    from ase.io.formats import UnknownFileTypeError

    try:
        yield from iread(cfg.path, index=index, format=cfg.format)
    except UnknownFileTypeError as err:
        if cfg.format:
            raise PipelineError(
                f"ASE knows no format {cfg.format!r}: {err}", "data.format"
            ) from err
        raise PipelineError(
            f"ASE cannot tell the format of {cfg.path!r} ({err}): name it with data.format",
            "data.path",
        ) from err
    except PipelineError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:240]
        how = f" as {cfg.format}" if cfg.format else ""
        raise PipelineError(
            f"ASE cannot read {cfg.path!r}{how}: {type(err).__name__}: {first}", "data.path"
        ) from err


def _count(cfg: AseData) -> int:
    """How many frames the file holds (read only when a slice starts past its end)."""
    return sum(1 for _ in _iread(cfg, slice(None)))


def _check_same_atoms(
    path: str, ref: int, numbers: np.ndarray, masses: np.ndarray, i: int, atoms: Any
) -> None:
    """Refuse frame ``i`` unless it has the atoms (numbers, in order, and masses) of frame
    ``ref``."""
    from ase.data import chemical_symbols

    other = np.asarray(atoms.get_atomic_numbers(), dtype=np.int64)
    if len(other) != len(numbers):
        raise PipelineError(
            f"frame {i} of {path} has {len(other)} atoms ({atoms.get_chemical_formula()}), "
            f"frame {ref} {len(numbers)} ({_formula(numbers)}): every frame must have the same "
            "atoms in the same order",
            "data.path",
        )
    differ = np.flatnonzero(other != numbers)
    if differ.size:
        a = int(differ[0])
        raise PipelineError(
            f"frame {i} of {path} has {chemical_symbols[other[a]]} as atom {a} where frame {ref} "
            f"has {chemical_symbols[numbers[a]]} ({differ.size} atom(s) differ): every frame "
            "must have the same atoms in the same order",
            "data.path",
        )
    m = np.asarray(atoms.get_masses(), dtype=np.float64)
    differ = np.flatnonzero(m != masses)
    if differ.size:
        a = int(differ[0])
        raise PipelineError(
            f"frame {i} of {path} gives atom {a} ({chemical_symbols[numbers[a]]}) the mass "
            f"{m[a]:g} where frame {ref} gives {masses[a]:g}: every frame must have the same "
            "masses",
            "data.path",
        )


def _formula(numbers: np.ndarray) -> str:
    from ase import Atoms

    return Atoms(numbers=numbers).get_chemical_formula()


# ---- the model's factory ----------------------------------------------------------------------


def with_atomic_numbers(model: ModelConf, numbers: np.ndarray | None) -> ModelConf:
    """``model`` with ``net.atomic_numbers`` filled in where the factory (``net._target_``)
    takes a parameter of that name and the config does not set it. The numbers live in the
    config, so every process that builds the model from it (Dask workers) gets them, and the
    run's fingerprint covers them."""
    net = getattr(model, "net", None)
    if numbers is None or not isinstance(net, dict) or not isinstance(net.get("_target_"), str):
        return model
    given = [int(z) for z in numbers]
    if "atomic_numbers" in net:
        if list(net["atomic_numbers"] or []) != given:
            log.warning(
                "model.net.atomic_numbers is set and differs from the atoms of the data "
                "(%s); the factory gets the configured ones",
                _formula(np.asarray(given)),
            )
        return model
    if "atomic_numbers" not in _parameters(net["_target_"]):
        return model
    return dataclasses.replace(model, net={**net, "atomic_numbers": given})


def _parameters(target: str) -> set[str]:
    """The parameter names of the callable ``target`` names (none where it cannot be found:
    building the model then says why)."""
    from hydra.utils import get_object

    try:
        return set(inspect.signature(get_object(target)).parameters)
    except Exception:
        return set()


# ---- frequencies ------------------------------------------------------------------------------


def frequencies(eigenvalues: np.ndarray) -> np.ndarray:
    """Vibrational frequencies in cm^-1 of eigenvalues of mass-weighted Hessians (eV per
    Angstrom^2 per amu: a model of eV and Angstrom, masses in amu), of any shape.

    ASE does the conversion: each chunk of eigenvalues becomes the diagonal Hessian of unit-mass
    atoms whose ``VibrationsData.get_frequencies()`` are the frequencies. ASE returns an
    imaginary frequency (a negative eigenvalue) as a complex number; it is returned here as
    minus its magnitude.
    """
    from ase import Atoms
    from ase.vibrations import VibrationsData

    lam = np.asarray(eigenvalues, dtype=np.float64)
    flat = lam.reshape(-1)
    finite = np.flatnonzero(np.isfinite(flat))  # (a NaN eigenvalue stays NaN)
    out = np.full_like(flat, np.nan)
    for s in range(0, finite.size, FREQUENCY_CHUNK):
        where = finite[s : s + FREQUENCY_CHUNK]
        n_atoms = -(-where.size // 3)
        diag = np.zeros(3 * n_atoms)
        diag[: where.size] = flat[where]
        atoms = Atoms(numbers=[1] * n_atoms, masses=[1.0] * n_atoms)
        freq = VibrationsData.from_2d(atoms, np.diag(diag)).get_frequencies()  # ascending
        value = np.empty(diag.size, dtype=np.complex128)
        value[np.argsort(diag, kind="stable")] = freq  # eigh's order of the diagonal entries
        value = value[: where.size]
        out[where] = np.where(value.imag != 0, -np.abs(value.imag), value.real)
    return out.reshape(lam.shape)
