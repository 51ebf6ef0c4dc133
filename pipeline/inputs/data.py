"""The dataset slice a config describes: inputs (N, *S), optional labels, source indices.

The inputs stay in their source (an npy memory map, an HDF5 dataset, or an array in memory for
the bundled, synthetic and ASE data) and are read a block at a time (:class:`Samples`): a slice
of 10^6 samples is never loaded whole. Checks (finite values) and hashes read it in chunks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config.schema import DataConf
from ..errors import PipelineError

CHUNK_BYTES = 64 << 20  # what one read of the source holds, at most (or one sample)


@dataclass(frozen=True)
class Scan:
    """What one pass over the samples found: positions of non-finite samples, and the hash."""

    nonfinite: np.ndarray
    digest: Any  # hashlib's SHA-256 object, to be copied before it is updated


class Samples:
    """The inputs (N, *S) of a slice, read from their source when a range of them is asked for.

    ``samples[a:b]`` (or ``samples[n]``) reads those samples as a new ``dtype`` tensor; ``len``,
    ``shape``, ``dtype`` and ``element_size()`` answer as a tensor's would, and ``samples[:]``
    reads them all. ``index`` holds each sample's source index; ``rows`` (default: ``index``)
    where the source holds it. A run of consecutive rows is read as one slice of the source;
    other rows in increasing order (h5py needs it), put back in the asked order.
    """

    def __init__(
        self,
        source,
        index: np.ndarray,
        dtype: torch.dtype,
        rows: np.ndarray | None = None,
        chunk_bytes: int | None = None,
    ):
        self.source, self.index, self.dtype = source, index, dtype
        self.rows = index if rows is None else rows
        self.shape = torch.Size((len(index), *source.shape[1:]))
        self.numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self._start = int(self.rows[0]) if _is_range(self.rows) else None
        per_sample = max(1, self.shape[1:].numel() * self.element_size())
        self.chunk = max(1, (chunk_bytes or CHUNK_BYTES) // per_sample)
        self._scan: Scan | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def element_size(self) -> int:
        return self.numpy_dtype.itemsize

    def __getitem__(self, key: int | slice) -> Tensor:
        if not isinstance(key, slice):
            n = int(key) + len(self) if int(key) < 0 else int(key)
            if not 0 <= n < len(self):
                raise IndexError(f"sample {key} of {len(self)}")
            return self[n : n + 1][0]
        a, b, step = key.indices(len(self))
        if step != 1:
            raise IndexError("Samples reads ranges of samples (step 1)")
        b = max(a, b)
        if self._start is not None:
            raw = self.source[self._start + a : self._start + b]
        else:
            raw = _take(self.source, self.rows[a:b], _is_hdf5(self.source))
        return torch.from_numpy(np.array(raw, dtype=self.numpy_dtype, copy=True))

    def scan(self) -> Scan:
        """One pass over the samples (made once): the positions of those holding NaN or inf, and
        SHA-256 of the shape, dtype and bytes (``pipeline.store.fingerprint`` goes on from it)."""
        if self._scan is None:
            digest = hashlib.sha256(f"{tuple(self.shape)} {self.dtype}\n".encode())
            bad = []
            for a, chunk in self.chunks():
                digest.update(chunk.numpy().tobytes())
                finite = torch.isfinite(chunk.reshape(len(chunk), -1)).all(dim=1).numpy()
                bad.append(a + np.flatnonzero(~finite))
            self._scan = Scan(np.concatenate(bad) if bad else np.zeros(0, np.int64), digest)
        return self._scan

    def chunks(self) -> Iterator[tuple[int, Tensor]]:
        """(first sample, samples) over the slice, ``self.chunk`` samples (<= 64 MiB) at a time."""
        for a in range(0, len(self), self.chunk):
            yield a, self[a : a + self.chunk]


def _is_range(index: np.ndarray) -> bool:
    return len(index) > 0 and bool(np.all(np.diff(index) == 1))


def _is_hdf5(source) -> bool:
    return type(source).__module__.startswith("h5py")


@dataclass
class Dataset:
    """Inputs (N, *S) read from their source as float tensors (:class:`Samples`), labels (N,)
    or None, and each sample's source index (N,); for atoms (``data=ase``: S = (n, 3)
    positions) their atomic numbers (n,) and masses (n,)."""

    x: Samples
    labels: Tensor | None
    sample_index: np.ndarray
    atomic_numbers: np.ndarray | None = None
    masses: np.ndarray | None = None


def provides_atoms(cfg: DataConf) -> bool:
    """Whether the data has atoms (atomic numbers and masses): ``data=ase``."""
    return cfg.name == "ase"


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: x (1797, 1, 8, 8) float32 in [0, 1], y (1797,) int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), d.target.astype(np.int64)


def select(length: int, cfg: DataConf) -> np.ndarray:
    """Source indices from ``data.indices``, or ``data.start``/``data.stop``."""
    if cfg.indices is not None:
        idx = np.asarray(list(cfg.indices), dtype=np.int64)
        bad = idx[(idx < 0) | (idx >= length)]
        if bad.size:
            raise PipelineError(
                f"sample index {bad[0]} is out of range: the dataset has {length} samples",
                "data.indices",
            )
    else:
        start, stop = cfg.start, cfg.stop
        stop = length if stop is None else stop
        if not 0 <= start < length:
            raise PipelineError(
                f"data.start={start} is out of range: the dataset has {length} samples",
                "data.start",
            )
        if stop > length:
            raise PipelineError(
                f"data.stop={stop} is past the end: the dataset has {length} samples", "data.stop"
            )
        idx = np.arange(start, stop, dtype=np.int64)
    if idx.size == 0:
        raise PipelineError(
            "the data slice is empty: data.stop must exceed data.start", "data.stop"
        )
    return idx


def _array(path: str | None, cfg_key: str, name: str | None, name_key: str):
    """A lazily readable array from .npy/.npz (memory-mapped) or an HDF5 dataset.

    ``name`` is the array inside an .npz (default: its first) or the HDF5 dataset; ``cfg_key`` and
    ``name_key`` are the config keys of the path and of the name, for error messages.
    """
    if not path:
        raise PipelineError(f"no file given: set {cfg_key}", cfg_key)
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"file {path!r} not found", cfg_key)
    try:
        if p.suffix in (".h5", ".hdf5", ".hdf"):
            import h5py

            f = h5py.File(p, "r")
            if name not in f:
                raise PipelineError(
                    f"{path!r} has no dataset {name!r} (it has {list(f)})", name_key
                )
            if not isinstance(f[name], h5py.Dataset):
                raise PipelineError(
                    f"{name!r} in {path!r} is an HDF5 group, not a dataset (it holds "
                    f"{list(f[name])[:5]})",
                    name_key,
                )
            return f[name]
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
        if isinstance(arr, np.lib.npyio.NpzFile):
            names = list(arr.keys())
            name = name or names[0]
            if name not in names:
                raise PipelineError(f"{path!r} has no array {name!r} (it has {names})", name_key)
            return arr[name]
        return arr
    except PipelineError:
        raise
    except Exception as err:
        raise PipelineError(f"cannot read {path!r}: {type(err).__name__}: {err}", cfg_key) from err


def _take(src, idx: np.ndarray, hdf5: bool) -> np.ndarray:
    """src[idx] as an array; h5py reads only increasing, unique indices, so map through those."""
    if not hdf5:
        return np.asarray(src[idx])
    unique, inverse = np.unique(idx, return_inverse=True)
    return np.asarray(src[unique])[inverse]


def load_data(cfg: DataConf, dtype: torch.dtype) -> Dataset:
    """Load the slice described by the typed ``data`` config, as ``dtype`` inputs."""
    kind = cfg.name
    if provides_atoms(cfg):
        return _atoms(cfg, dtype)
    labels_src = None
    labels_key = "data.labels_dataset" if kind == "hdf5" else "data.labels_path"
    if kind == "digits":
        x_src, labels_src = load_digits_arrays()
    elif kind == "synthetic":
        shape = tuple(cfg.shape)
        gen = torch.Generator().manual_seed(cfg.seed)
        n = cfg.n_samples
        x_src = torch.randn((n, *shape), generator=gen).numpy()
        if cfg.n_classes:
            labels_src = torch.randint(cfg.n_classes, (n,), generator=gen).numpy()
    elif kind == "npy":
        x_src = _array(cfg.path, "data.path", cfg.key, "data.key")
        if cfg.labels_path:
            labels_src = _array(
                cfg.labels_path, "data.labels_path", cfg.labels_key, "data.labels_key"
            )
    elif kind == "hdf5":
        x_src = _array(cfg.path, "data.path", cfg.dataset, "data.dataset")
        if cfg.labels_dataset:
            labels_src = _array(cfg.path, "data.path", cfg.labels_dataset, "data.labels_dataset")
    else:
        raise PipelineError(f"unknown data option {kind!r}", "data")
    shape_key = "data.shape" if kind == "synthetic" else "data.path"
    if x_src.ndim < 2:
        raise PipelineError(
            f"inputs must have shape (N, *S) with a sample axis first; got {x_src.shape}",
            shape_key,
        )
    if 0 in x_src.shape[1:]:
        raise PipelineError(
            f"the inputs have no entries: shape {tuple(x_src.shape[1:])} per sample (D = 0)",
            shape_key,
        )
    idx = select(len(x_src), cfg)
    if not np.issubdtype(x_src.dtype, np.floating):
        raise PipelineError(
            f"inputs have dtype {x_src.dtype}: a Hessian with respect to the input needs "
            "real-valued (float) inputs; models of integer ids (embeddings) are not "
            "differentiable in them",
            "data.path",
        )
    x = Samples(x_src, idx, dtype)
    _check_finite(x)
    labels = None
    if labels_src is not None:
        labels = torch.as_tensor(_labels(labels_src, len(x_src), idx, kind == "hdf5", labels_key))
    return Dataset(x, labels, idx)


def _check_finite(x: Samples) -> None:
    """Refuse samples holding NaN or inf (read in chunks), naming their source indices."""
    bad = x.scan().nonfinite
    if bad.size:
        names = ", ".join(str(i) for i in x.index[bad[:5]])
        raise PipelineError(
            f"{bad.size} sample(s) contain NaN or inf (source indices {names}"
            f"{', ...' if bad.size > 5 else ''}); drop them with data.indices",
            "data.indices",
        )


def _atoms(cfg: DataConf, dtype: torch.dtype) -> Dataset:
    """The positions (N, n, 3) of the frames ASE reads (see ``pipeline.inputs.atoms``)."""
    from .atoms import frames, read_slice

    read, length = read_slice(cfg)  # type: ignore[arg-type]
    found = frames(cfg.path, read, select(length, cfg))  # type: ignore[attr-defined]
    rows = np.arange(len(found.positions))  # the frames read, in the slice's order
    x = Samples(found.positions, found.sample_index, dtype, rows)
    _check_finite(x)
    return Dataset(x, None, found.sample_index, found.atomic_numbers, found.masses)


def _labels(src, n: int, idx: np.ndarray, hdf5: bool, key: str) -> np.ndarray:
    """The labels of the slice: (N,) class indices or (N, C) float targets, all finite."""
    if src.ndim == 0:
        raise PipelineError(
            "the labels are a single value (a 0-d array): give one label per sample, shape (N,) "
            "or (N, C)",
            key,
        )
    if len(src) != n:
        raise PipelineError(f"{len(src)} labels for {n} samples", key)
    labels = _take(src, idx, hdf5)
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
        raise PipelineError(f"the labels have dtype {labels.dtype}, not numbers", key)
    if np.issubdtype(labels.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(labels.reshape(len(labels), -1)).all(axis=1))
        if bad.size:
            names = ", ".join(str(i) for i in idx[bad[:5]])
            raise PipelineError(
                f"the labels (targets) of {bad.size} sample(s) contain NaN or inf (source "
                f"indices {names}{', ...' if bad.size > 5 else ''}); drop them with data.indices",
                key,
            )
    return labels
