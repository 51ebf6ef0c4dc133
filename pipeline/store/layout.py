"""The HDF5 layout of a result file: its datasets, attributes and labels, and where their bytes lie.

NOTE: [direct writes] A file written in place is created whole before any value is written:
every dataset and attribute, every chunk allocated (early allocation, never filled: the file is
sparse, so laying it out writes only the metadata). Values then go to their byte offsets with
``os.pwrite``, from any process that can open the file, and that never touches HDF5 metadata, so
the file's structure is valid at every moment, whenever a writer dies. ``FileMap`` holds the
offsets. Only ``finish`` changes metadata: the fixed-size attribute ``nonfinite_entries``,
rewritten in place (one small write) after every block is committed.

``status`` says ``complete`` from the start: the file carries its final name only when it is (see
NOTE: [atomic commits] in ``writer``), and gets it only after a check that every planned block was
committed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .plan import Plan
from .schema import ATOMS, Field
from .statistics import SUMS

HESSIAN_DIMS = ("sample", "output", "row", "column")
ROW_DATASETS = ("diagonal", "row_norm")  # (N, K, D), the result's dtype
SUMMARY_DATASETS = {"trace": "f8", "frobenius": "f8", "symmetry": "f8", "nonfinite": "i8"}
BLOCK_SUMS = "block_sums"  # (row blocks, N, K, len(SUMS)) float64: written with each block


@dataclass
class Metadata:
    """Everything in the final file besides the values computed block by block."""

    inputs: Any  # (N, *S): an array, or samples read in chunks (pipeline.inputs.data.Samples)
    outputs: np.ndarray  # (N, C)
    sample_index: np.ndarray  # (N,)
    output_index: np.ndarray  # (K,) or (N, K)
    attrs: dict[str, Any] = field(default_factory=dict)
    atomic_numbers: np.ndarray | None = None  # (n,) of data=ase (schema.ATOMS)
    masses: np.ndarray | None = None  # (n,)


def compression_options(name: str | None) -> dict[str, Any]:
    """h5py's dataset options for ``storage.compression`` (checked by ``pipeline.config``)."""
    return {} if name in (None, "none", "null") else {"compression": name}


def create_datasets(
    f: h5py.File,
    plan: Plan,
    dtype: np.dtype,
    meta: Metadata,
    layout: str = "copy",
    comp: dict[str, Any] | None = None,
    in_place: bool = False,
) -> None:
    """Create every dataset and attribute of a result.

    Args:
        f: a new, empty file.
        plan: the blocks and chunks.
        dtype: the Hessian's dtype.
        meta: inputs, outputs, indices, attributes.
        layout: ``virtual`` leaves ``/hessian`` to ``add_virtual_hessian``.
        comp: compression options of the large datasets.
        in_place: allocate everything now, never fill (see NOTE: [direct writes]).
    """
    comp = comp or {}
    n, k, d = plan.n_samples, plan.n_outputs, plan.dim

    def alloc() -> dict[str, Any]:  # a property list per dataset: h5py adds the chunk shape
        return {"dcpl": _early_allocation(), "fill_time": "never"} if in_place else {}

    if layout != "virtual":
        f.create_dataset("hessian", (n, k, d, d), dtype, chunks=plan.chunks, **comp, **alloc())
    for name in ("gradient", *ROW_DATASETS):
        f.create_dataset(name, (n, k, d), dtype, **comp, **alloc())
    for name, kind in SUMMARY_DATASETS.items():
        f.create_dataset(name, (n, k), kind, **alloc())
    row_blocks = -(-d // plan.block_rows)
    f.create_dataset(BLOCK_SUMS, (row_blocks, n, k, len(SUMS)), "f8", **alloc())
    write_common(f, meta, comp)
    _label(f, meta.output_index.ndim)
    f.attrs["layout"] = layout
    f.attrs["output"] = "dense"
    f.attrs["status"] = "complete"  # true once the file has its final name (see above)
    f.attrs["layout_id"] = uuid.uuid4().hex  # tells this file's byte offsets from another's
    f.attrs.create("nonfinite_entries", 0, dtype="i8")


def set_nonfinite(f: h5py.File, count: int) -> None:
    """Rewrite the fixed-size ``nonfinite_entries`` attribute in place."""
    f.attrs.modify("nonfinite_entries", np.int64(count))


def add_virtual_hessian(f: h5py.File, plan: Plan, dtype: np.dtype, sources: list[str]) -> None:
    """``/hessian`` as a virtual dataset over the shard files (``sources[i]``: block i's file,
    relative to the result's directory)."""
    n, k, d = plan.n_samples, plan.n_outputs, plan.dim
    vl = h5py.VirtualLayout(shape=(n, k, d, d), dtype=dtype)
    for b, name in zip(plan.blocks, sources, strict=True):
        src = h5py.VirtualSource(name, "hessian", shape=(b.s1 - b.s0, k, b.r1 - b.r0, d))
        vl[b.s0 : b.s1, :, b.r0 : b.r1, :] = src
    f.create_virtual_dataset("hessian", vl, fillvalue=np.nan)
    _label_hessian(f, f["output_index"].ndim)


@dataclass(frozen=True)
class FileMap:
    """Byte offsets of a file laid out for direct writes.

    Attributes:
        chunks: the chunk shape (cs, 1, cr, D) of ``/hessian``.
        hessian: (ceil(N/cs), K, ceil(D/cr)) offsets of the Hessian chunks.
        contiguous: offsets of the contiguous datasets (gradient, diagonal, row_norm, trace, ...).
    """

    chunks: tuple[int, int, int, int]
    hessian: np.ndarray
    contiguous: dict[str, int]

    @staticmethod
    def of(path: Path, layout_id: str) -> FileMap:
        """The map of the file at ``path`` whose ``layout_id`` attribute is ``layout_id`` (read
        once per process and file: the id, random per laid-out file, keys the cache)."""
        return _file_map(str(path), layout_id)


@lru_cache(maxsize=4)
def _file_map(path: str, layout_id: str) -> FileMap:
    with h5py.File(path, "r") as f:
        if f.attrs.get("layout_id") != layout_id:
            raise RuntimeError(f"{path} is not the file this block belongs to (another run's)")
        dset = f["hessian"]
        cs, _, cr, _ = dset.chunks
        n, k, d, _ = dset.shape
        table = np.full((-(-n // cs), k, -(-d // cr)), -1, np.int64)

        def visit(info) -> None:
            s, o, r, _ = info.chunk_offset
            table[s // cs, o, r // cr] = info.byte_offset

        if hasattr(dset.id, "chunk_iter"):  # HDF5 >= 1.12.3: one call for all chunks
            dset.id.chunk_iter(visit)
        else:
            for i in range(dset.id.get_num_chunks()):
                visit(dset.id.get_chunk_info(i))
        if (table < 0).any():
            raise RuntimeError(f"{path}: not every chunk of /hessian is allocated")
        names = ("gradient", *ROW_DATASETS, *SUMMARY_DATASETS, BLOCK_SUMS)
        contiguous = {name: int(f[name].id.get_offset()) for name in names}
        return FileMap(tuple(dset.chunks), table, contiguous)


def _early_allocation() -> h5py.h5p.PropDCID:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def write_common(f: h5py.File, meta: Metadata, comp: dict[str, Any]) -> None:
    """What every kind of result holds besides its computed values: inputs, outputs, indices
    and the root attributes."""
    _write_inputs(f, meta.inputs, comp)
    f.create_dataset("outputs", data=meta.outputs)
    f.create_dataset("sample_index", data=meta.sample_index)
    f.create_dataset("output_index", data=meta.output_index)
    for fd in ATOMS:
        value = getattr(meta, fd.name)
        if value is not None:
            f.create_dataset(fd.name, data=np.asarray(value, fd.dtype))
    for key, value in meta.attrs.items():
        f.attrs[key] = value


def inputs_dtype(inputs: Any) -> np.dtype:
    """The numpy dtype of ``Metadata.inputs``."""
    return np.dtype(getattr(inputs, "numpy_dtype", None) or inputs.dtype)


def _write_inputs(f: h5py.File, inputs: Any, comp: dict[str, Any]) -> None:
    """``/inputs``, from an array or a chunk of samples at a time (never all of them in memory)."""
    if not hasattr(inputs, "chunks"):
        f.create_dataset("inputs", data=inputs, **comp)
        return
    ds = f.create_dataset("inputs", shape=tuple(inputs.shape), dtype=inputs_dtype(inputs), **comp)
    for a, chunk in inputs.chunks():
        ds[a : a + len(chunk)] = chunk.numpy()


def label_common(f: h5py.File, per_sample: tuple[Field, ...] = ()) -> None:
    """HDF5 dimension labels and scales of the common datasets, and the sample (and output)
    scales of the ``per_sample`` datasets (whose own labels come from the schema)."""
    f["sample_index"].make_scale("sample_index")  # dimension scales: tools show source indices
    by_output = f["output_index"].ndim == 1
    if by_output:
        f["output_index"].make_scale("output_index")
    f["inputs"].dims[0].label = "sample"
    atoms = "atomic_numbers" in f and f["inputs"].ndim == 3  # positions (N, n, 3)
    for i in range(f["inputs"].ndim - 1):
        f["inputs"].dims[i + 1].label = ("atom", "xyz")[i] if atoms else f"input_{i}"
    f["outputs"].dims[0].label = "sample"
    f["outputs"].dims[1].label = "model_output"
    f["sample_index"].dims[0].label = "sample"
    for i, name in enumerate(("output",) if by_output else ("sample", "output")):
        f["output_index"].dims[i].label = name
    for fd in ATOMS:
        if fd.name in f:
            f[fd.name].dims[0].label = fd.dims[0]
    for name in ("inputs", "outputs"):
        f[name].dims[0].attach_scale(f["sample_index"])
    for fd in per_sample:
        f[fd.name].dims[0].attach_scale(f["sample_index"])
        if by_output and fd.dims[1:2] == ("output",):
            f[fd.name].dims[1].attach_scale(f["output_index"])


def _label(f: h5py.File, output_index_dims: int) -> None:
    """HDF5 dimension labels of a dense result, so tools show what each axis is."""
    rows = tuple(Field(n, ("sample", "output", "column")) for n in ("gradient", *ROW_DATASETS))
    summaries = tuple(Field(name, ("sample", "output")) for name in SUMMARY_DATASETS)
    for fd in rows + summaries:
        for i, label in enumerate(fd.dims):
            f[fd.name].dims[i].label = label
    for i, label in enumerate(("row_block", "sample", "output", "sum")):
        f[BLOCK_SUMS].dims[i].label = label
    label_common(f, rows + summaries)
    if "hessian" in f:
        _label_hessian(f, output_index_dims)


def _label_hessian(f: h5py.File, output_index_dims: int) -> None:
    for i, name in enumerate(HESSIAN_DIMS):
        f["hessian"].dims[i].label = name
    f["hessian"].dims[0].attach_scale(f["sample_index"])
    if output_index_dims == 1:
        f["hessian"].dims[1].attach_scale(f["output_index"])
