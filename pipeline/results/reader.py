"""Opening a result file lazily: its datasets as dask arrays, its config and provenance.

``read(path)`` keeps the HDF5 file open and wraps each dataset in ``dask.array.from_array`` with
chunks aligned to the file's chunks (for a virtual layout: to the shard blocks), so slicing and
reductions read only what they need. Close the result (or use it as a context manager) when done.

Every kind of result (``output``: see ``pipeline.store.schema``) is read the same way and has
its natural view: ``r.hessian`` of a dense file, ``r.diagonal`` and ``r.trace``, ``r.hessian`` of
the chosen rows and ``r.rows``, ``r.eigenvalues``, ``r.eigenvectors`` and ``r.residuals``
(``r.frequencies`` too when mass-weighted), ``r.jacobian`` and ``r.curvature``; ``r.hessian`` of
a factored file is the lazy product J^T A_k J, equal to the dense result. A result of atoms
(``data=ase``) also has ``r.atomic_numbers`` and ``r.masses``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import h5py
import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

from ..errors import PipelineError
from ..store.layout import ROW_DATASETS, SUMMARY_DATASETS
from ..store.schema import ATOMS, FIELDS, KINDS, fields

COMMON = ("gradient", "inputs", "outputs", "sample_index", "output_index")
DATASETS = ("hessian", *COMMON)  # of a dense result
CONTIGUOUS_PANEL_BYTES = 8 << 20  # dask chunks of a contiguous /hessian
ATTRS = ("config", "status", "method", "dtype")  # root attributes every result has


@dataclass
class Result:
    """A result file opened for reading.

    Attributes:
        path: the file.
        file: the open ``h5py.File`` (read-only).
        hessian: (N, K, D, D) dask array (chosen rows: (N, K, R, D); a factored file: the lazy
            product J^T A J; None for the diagonal and eigenpairs).
        gradient: (N, K, D) dask array.
        inputs: (N, *S) dask array.
        outputs: (N, C) dask array.
        sample_index: (N,) dask array: each sample's index in the source dataset.
        output_index: (K,) or (N, K) dask array: which output each k is (-1 for a loss).
        config: the resolved config of the run.
        attrs: every root attribute (provenance), as plain Python values.
        datasets: the kind's own datasets by name (``diagonal``, ``eigenvalues``, ...), also
            readable as attributes (``r.diagonal``).
    """

    path: Path
    file: h5py.File
    hessian: da.Array | None
    gradient: da.Array
    inputs: da.Array
    outputs: da.Array
    sample_index: da.Array
    output_index: da.Array
    config: DictConfig
    attrs: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, da.Array] = field(default_factory=dict)

    def __getattr__(self, name: str) -> da.Array:
        datasets = self.__dict__.get("datasets", {})
        if name in datasets:
            return datasets[name]
        raise AttributeError(
            f"a {self.__dict__.get('attrs', {}).get('output', 'dense')} result has no {name!r}"
            f" (it has {', '.join(sorted(datasets)) or 'no other datasets'})"
        )

    @property
    def output(self) -> str:
        """The kind of result: ``dense``, ``diagonal``, ``rows``, ``eigen`` or ``factored``."""
        return str(self.attrs.get("output", "dense"))

    @property
    def method(self) -> str:
        """The Hessian method that produced the file."""
        return str(self.attrs["method"])

    @property
    def dtype(self) -> np.dtype:
        """The floating-point type of the result."""
        return self.file[FIELDS[self.output][0].name].dtype

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, K, D, D): the Hessians the file describes (``/hessian`` of a dense file)."""
        n, k, d = self.file["gradient"].shape
        return (n, k, d, d)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """S, the shape of one input; D = prod(S)."""
        return tuple(int(s) for s in self.attrs.get("input_shape", self.inputs.shape[1:]))

    @property
    def layout(self) -> str:
        """``copy`` (self-contained) or ``virtual`` (``/hessian`` maps shard files)."""
        return str(self.attrs.get("layout", "copy"))

    def output_index_of(self, n: int) -> np.ndarray:
        """(K,) output indices of sample n (``/output_index`` is (K,) or (N, K))."""
        oi = self.file["output_index"]
        return np.asarray(oi[n] if oi.ndim == 2 else oi[()])

    def close(self) -> None:
        """Close the HDF5 file; the dask arrays cannot be computed afterwards."""
        self.file.close()

    def __enter__(self) -> Result:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        n, k, d, _ = self.shape
        what = "" if self.output == "dense" else f"output={self.output!r} of "
        return (
            f"Result({str(self.path)!r}, {what}hessian=({n}, {k}, {d}, {d}) {self.dtype}, "
            f"method={self.method!r}, layout={self.layout!r})"
        )


def read(path: str | os.PathLike) -> Result:
    """Open a result file written by ``python -m pipeline`` lazily.

    Args:
        path: the ``.h5`` file (``storage.path`` of the run).

    Returns:
        A :class:`Result` whose arrays are dask arrays over the open file.

    Raises:
        PipelineError: the file is missing, is not a pipeline result, is incomplete, or (virtual
            layout) its shard files are missing.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PipelineError(f"no result file at {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise PipelineError(f"{path} is not an HDF5 file ({err})") from err
    try:
        needed = DATASETS if f.attrs.get("output", "dense") == "dense" else COMMON
        missing = [name for name in needed if not isinstance(f.get(name), h5py.Dataset)]
        missing_attrs = [a for a in ATTRS if a not in f.attrs]
        if missing or missing_attrs:
            lacks = [f"/{m}" for m in missing] + [f"the {a} attribute" for a in missing_attrs]
            raise PipelineError(f"{path} is not a pipeline result: it lacks {', '.join(lacks)}")
        attrs = {key: _plain(value) for key, value in f.attrs.items()}
        if attrs.get("status") != "complete":
            raise PipelineError(
                f"{path} is incomplete (status={attrs.get('status')!r}); rerun with "
                "storage.mode=resume",
                "storage.mode",
            )
        kind = str(attrs.get("output", "dense"))
        if kind not in KINDS:
            raise PipelineError(f"{path} holds an output {kind!r} this version does not know")
        if kind == "dense":
            config = _check_layout(path, f, attrs)
            if f["hessian"].is_virtual:
                _check_sources(path, f["hessian"])
        else:
            config = _check_kind(path, f, attrs, kind)
        _check_atoms(path, f)
        arrays = {name: _dask(f[name]) for name in COMMON}
        stats = (*ROW_DATASETS, *SUMMARY_DATASETS) if kind == "dense" else ()
        own = [fd.name for fd in fields(kind, mass_weighted(attrs))]
        own += [name for name in stats if name in f] + [fd.name for fd in ATOMS if fd.name in f]
        datasets = {name: _dask(f[name]) for name in own if name not in COMMON}
        hessian = datasets.pop("hessian", None)
        if kind == "factored":
            hessian = _factored(datasets["jacobian"], datasets["curvature"])
    except BaseException:
        f.close()
        raise
    return Result(path=path, file=f, config=config, attrs=attrs, hessian=hessian,
                  datasets=datasets, **arrays)  # type: ignore[arg-type]  # fmt: skip


def _factored(jacobian: da.Array, curvature: da.Array) -> da.Array:
    """H[n, k] = J[n]^T A[n, k] J[n], lazily, in chunks of rows of one (sample, output)."""
    n, c, d = jacobian.shape
    rows = max(1, min(d, CONTIGUOUS_PANEL_BYTES // max(1, d * jacobian.dtype.itemsize)))
    jt = jacobian.transpose(0, 2, 1).rechunk((1, rows, c))
    a = curvature.rechunk((1, 1, c, c))
    j = jacobian.rechunk((1, c, d))
    return da.einsum("ndc,nkce,nef->nkdf", jt, a, j)


def mass_weighted(attrs: dict[str, Any]) -> bool:
    """Whether the stored config says ``output.mass_weighted`` (False where it cannot be read:
    the config is checked on its own)."""
    try:
        config = yaml.safe_load(str(attrs.get("config", "")))
        return bool(config["output"].get("mass_weighted", False))
    except (yaml.YAMLError, TypeError, KeyError, AttributeError):
        return False


def _check_kind(path: Path, f: h5py.File, attrs: dict[str, Any], kind: str) -> DictConfig:
    """The stored config; PipelineError unless the file holds the kind's datasets with shapes
    that fit one another (the schema's dimensions)."""
    own = fields(kind, mass_weighted(attrs))
    missing = [fd.name for fd in own if not isinstance(f.get(fd.name), h5py.Dataset)]
    if missing:
        raise PipelineError(f"{path} is not a complete {kind} result: it lacks /{missing[0]}")
    n, k, d = f["gradient"].shape
    sizes: dict[str, int] = {"sample": n, "output": k, "column": d}
    for fd in own:
        for dim, size in zip(fd.dims, f[fd.name].shape, strict=False):
            if sizes.setdefault(dim, size) != size or f[fd.name].ndim != len(fd.dims):
                raise PipelineError(
                    f"{path} is not a pipeline result: /{fd.name} has shape {f[fd.name].shape}, "
                    f"which does not fit its dimensions {fd.dims} ({dim}={sizes[dim]})"
                )
    return _check_layout(path, f, attrs, check_hessian=False)


def _check_layout(
    path: Path, f: h5py.File, attrs: dict[str, Any], check_hessian: bool = True
) -> DictConfig:
    """The stored config; PipelineError unless the datasets have the shapes of a result."""

    def refuse(why: str) -> PipelineError:
        return PipelineError(f"{path} is not a pipeline result: {why}")

    shapes = {name: tuple(f[name].shape) for name in (DATASETS if check_hessian else COMMON)}
    if check_hessian:
        if len(shapes["hessian"]) != 4 or shapes["hessian"][2] != shapes["hessian"][3]:
            raise refuse(f"/hessian has shape {shapes['hessian']}, not (N, K, D, D)")
        n, k, d, _ = shapes["hessian"]
    else:
        n, k, d = shapes["gradient"]
    inputs = shapes["inputs"]
    expected = {
        "gradient": shapes["gradient"] == (n, k, d),
        "inputs": len(inputs) >= 2 and inputs[0] == n and int(np.prod(inputs[1:])) == d,
        "outputs": len(shapes["outputs"]) == 2 and shapes["outputs"][0] == n,
        "sample_index": shapes["sample_index"] == (n,),
        "output_index": shapes["output_index"] in ((k,), (n, k)),
    }
    for name, fits in expected.items():
        if not fits:
            raise refuse(
                f"/{name} has shape {shapes[name]}, which does not fit /hessian {(n, k, d, d)}"
            )
    try:
        config = yaml.safe_load(str(attrs["config"]))
    except yaml.YAMLError as err:
        raise refuse(f"its config attribute is not YAML ({type(err).__name__})") from err
    if not isinstance(config, dict):
        raise refuse("its config attribute is not a mapping")
    return OmegaConf.create(config)


def _check_atoms(path: Path, f: h5py.File) -> None:
    """``/atomic_numbers`` and ``/masses`` (where present): one per atom of the (N, n, 3)
    positions."""
    present = [fd for fd in ATOMS if fd.name in f]
    if not present:
        return
    inputs = f["inputs"].shape
    for fd in present:
        if len(inputs) != 3 or inputs[2] != 3 or f[fd.name].shape != (inputs[1],):
            raise PipelineError(
                f"{path} is not a pipeline result: /{fd.name} has shape {f[fd.name].shape}, "
                f"which does not fit the positions /inputs {inputs} (N, n, 3)"
            )


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (str, int, float, list)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_sources(path: Path, dset: h5py.Dataset) -> None:
    """A virtual ``/hessian`` reads missing shards as NaN without error: refuse that instead."""
    missing = []
    for src in dset.virtual_sources():
        name = Path(src.file_name)
        full = name if name.is_absolute() else path.parent / name
        if src.file_name != "." and not full.is_file():
            missing.append(str(full))
    if missing:
        raise PipelineError(
            f"{path} has a virtual layout and {len(missing)} of its shard files are missing "
            f"(first: {missing[0]}); keep the .shards directory beside the file or rerun with "
            "storage.layout=copy",
            "storage.layout",
        )


def chunk_grid(dset: h5py.Dataset) -> tuple[tuple[int, ...], ...]:
    """Dask chunks of ``dset`` aligned to its HDF5 chunks, or to the shard blocks of a VDS."""
    if dset.is_virtual:
        starts: list[set[int]] = [{0} for _ in dset.shape]
        for src in dset.virtual_sources():
            lo, _hi = src.vspace.get_select_bounds()
            for axis, s in enumerate(lo):
                starts[axis].add(int(s))
        grid = []
        for axis, size in enumerate(dset.shape):
            edges = sorted(s for s in starts[axis] if s < size) + [size]
            grid.append(tuple(b - a for a, b in zip(edges[:-1], edges[1:], strict=True)))
        return tuple(grid)
    if dset.chunks is not None:
        return da.core.normalize_chunks(dset.chunks, dset.shape)
    if dset.ndim == 4:  # a contiguous /hessian (rewritten by another tool): panels of rows
        rows = max(
            1,
            min(
                dset.shape[2], CONTIGUOUS_PANEL_BYTES // max(1, dset.shape[3] * dset.dtype.itemsize)
            ),
        )
        return da.core.normalize_chunks((1, 1, rows, dset.shape[3]), dset.shape)
    return tuple((s,) if s else (0,) for s in dset.shape)


def _dask(dset: h5py.Dataset) -> da.Array:
    name = f"pipeline-{dset.name.strip('/')}-{uuid.uuid4().hex}"
    return da.from_array(dset, chunks=chunk_grid(dset), lock=True, name=name)
