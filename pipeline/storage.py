"""Committed blocks as shard files, and the one writer that assembles the final HDF5 file.

NOTE: [atomic commits] Processes never share an HDF5 file. Each block is written to its own shard
file under a temporary name, fsync-ed and renamed: a shard with its final name is complete, so a
crash loses at most the blocks in flight and resume submits only the missing ones. The final file
is written under a temporary name by one process, streaming shard by shard, and renamed into place
only when complete: ``storage.path`` either does not exist or holds a finished result.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import PipelineError
from .plan import Block, Plan

HESSIAN_DIMS = ("sample", "output", "row", "column")


def fsync_path(path: Path) -> None:
    """Flush a file (or a directory entry) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A hidden sibling name for writing ``path`` before an atomic rename."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")


def commit(tmp: Path, path: Path, fsync: bool = True) -> None:
    """Atomically give ``tmp`` its final name; with ``fsync``, make it durable first.

    The rename alone survives a killed process; fsync also survives a crash of the machine.
    """
    if fsync:
        fsync_path(tmp)
    os.replace(tmp, path)
    if fsync:
        fsync_path(path.parent)


class ShardStore:
    """Committed blocks of one job, one HDF5 file each, in a directory beside the output.

    The directory also holds ``manifest.json``: the job's fingerprint, checked on resume.
    """

    def __init__(self, directory: Path, fsync: bool = True):
        self.directory = Path(directory)
        self.fsync = fsync

    def shard_path(self, index: int) -> Path:
        return self.directory / f"block-{index:06d}.h5"

    def committed(self) -> set[int]:
        """Indices of blocks whose shard file is complete."""
        if not self.directory.is_dir():
            return set()
        return {int(p.stem.split("-")[1]) for p in self.directory.glob("block-*.h5")}

    def manifest(self) -> dict[str, Any] | None:
        p = self.directory / "manifest.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def start(self, fingerprint: str, resume: bool, info: dict[str, Any]) -> int:
        """Prepare the directory for a run; return how many committed blocks are kept.

        Raises PipelineError when resuming a job with another fingerprint.
        """
        old = self.manifest()
        if old is not None and resume and old["fingerprint"] != fingerprint:
            raise PipelineError(
                f"cannot resume: the blocks in {self.directory} were computed with a different "
                "config or model; use storage.mode=overwrite to start afresh",
                "storage.mode",
            )
        if old is None or not resume:  # blocks without a manifest have no provenance
            self.remove()
        self.directory.mkdir(parents=True, exist_ok=True)
        if old is None or not resume:
            tmp = temporary_name(self.directory / "manifest.json")
            tmp.write_text(json.dumps({"fingerprint": fingerprint, **info}, indent=1))
            commit(tmp, self.directory / "manifest.json")
        for stale in self.directory.glob(".*.partial"):  # writes that never committed
            stale.unlink(missing_ok=True)
        return len(self.committed())

    def write(self, block: Block, hessian: np.ndarray, gradient: np.ndarray | None) -> None:
        """Commit one block: hessian (S, K, R, D), gradient (S, K, D) for the blocks at row 0.

        Idempotent: a block written twice (a retried task) leaves one identical shard.
        """
        final = self.shard_path(block.index)
        tmp = temporary_name(final)
        with h5py.File(tmp, "w") as f:
            f.create_dataset("hessian", data=hessian)
            if gradient is not None:
                f.create_dataset("gradient", data=gradient)
            f.attrs.update(s0=block.s0, s1=block.s1, r0=block.r0, r1=block.r1)
        commit(tmp, final, self.fsync)

    def remove(self) -> None:
        """Delete the shards, the manifest last (so a half-removed directory is never resumed)."""
        if not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            if p.name != "manifest.json":
                p.unlink(missing_ok=True)
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Metadata:
    """Everything in the final file besides the Hessian and gradient blocks."""

    inputs: np.ndarray  # (N, *S)
    outputs: np.ndarray  # (N, C)
    sample_index: np.ndarray  # (N,)
    output_index: np.ndarray  # (K,) or (N, K)
    attrs: dict[str, Any] = field(default_factory=dict)


def compression_options(name: str | None) -> dict[str, Any]:
    if name in (None, "none", "null"):
        return {}
    if name in ("lzf", "gzip"):
        return {"compression": name}
    raise PipelineError(
        f"unknown compression {name!r}: choose none, lzf or gzip", "storage.compression"
    )


def assemble(
    path: Path,
    plan: Plan,
    meta: Metadata,
    shards: ShardStore,
    dtype: np.dtype,
    layout: str = "copy",
    compression: str | None = None,
    on_block=None,
    fsync: bool = True,
) -> None:
    """Write the final file from the committed shards, then rename it to ``path``.

    ``layout="copy"`` streams every shard into one self-contained file (one block in memory at a
    time); ``layout="virtual"`` maps ``/hessian`` onto the shard files (which must then be kept).
    """
    n, k, d = plan.n_samples, plan.n_outputs, plan.dim
    comp = compression_options(compression)
    tmp = temporary_name(path)
    try:
        with h5py.File(tmp, "w") as f:
            blocks = plan.blocks
            if layout == "virtual":
                vl = h5py.VirtualLayout(shape=(n, k, d, d), dtype=dtype)
                for b in blocks:
                    src = h5py.VirtualSource(
                        os.path.relpath(shards.shard_path(b.index), path.parent),
                        "hessian",
                        shape=(b.s1 - b.s0, k, b.r1 - b.r0, d),
                    )
                    vl[b.s0 : b.s1, :, b.r0 : b.r1, :] = src
                hess = f.create_virtual_dataset("hessian", vl, fillvalue=np.nan)
            else:
                hess = f.create_dataset(
                    "hessian", (n, k, d, d), dtype=dtype, chunks=plan.chunks, **comp
                )
            grad = f.create_dataset("gradient", (n, k, d), dtype=dtype, **comp)
            for b in blocks:
                with h5py.File(shards.shard_path(b.index), "r") as s:
                    if layout != "virtual":
                        hess[b.s0 : b.s1, :, b.r0 : b.r1, :] = s["hessian"][()]
                    if b.r0 == 0:
                        grad[b.s0 : b.s1] = s["gradient"][()]
                if on_block is not None:
                    on_block(b)
            f.create_dataset("inputs", data=meta.inputs, **comp)
            f.create_dataset("outputs", data=meta.outputs)
            f.create_dataset("sample_index", data=meta.sample_index)
            f.create_dataset("output_index", data=meta.output_index)
            _label(f, meta.inputs.ndim - 1, meta.output_index.ndim)
            for key, value in meta.attrs.items():
                f.attrs[key] = value
            f.attrs["layout"] = layout
            f.attrs["status"] = "complete"
        commit(tmp, path, fsync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _label(f: h5py.File, n_input_dims: int, output_index_dims: int) -> None:
    """HDF5 dimension labels, so tools show what each axis is."""
    for i, name in enumerate(HESSIAN_DIMS):
        f["hessian"].dims[i].label = name
    for i, name in enumerate(("sample", "output", "column")):
        f["gradient"].dims[i].label = name
    f["inputs"].dims[0].label = "sample"
    for i in range(n_input_dims):
        f["inputs"].dims[i + 1].label = f"input_{i}"
    f["outputs"].dims[0].label = "sample"
    f["outputs"].dims[1].label = "model_output"
    f["sample_index"].dims[0].label = "sample"
    labels = ("output",) if output_index_dims == 1 else ("sample", "output")
    for i, name in enumerate(labels):
        f["output_index"].dims[i].label = name
    f["sample_index"].make_scale("sample_index")  # dimension scales: tools show source indices
    for name in ("hessian", "gradient", "inputs", "outputs"):
        f[name].dims[0].attach_scale(f["sample_index"])
    if output_index_dims == 1:
        f["output_index"].make_scale("output_index")
        for name in ("hessian", "gradient"):
            f[name].dims[1].attach_scale(f["output_index"])
