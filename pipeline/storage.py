"""How finished blocks are committed, and the one writer of the final HDF5 file.

NOTE: [atomic commits] Processes never share an HDF5 file, and ``storage.path`` either does not
exist or holds a finished result: the final file is written under another name and renamed
into place only when complete. A block is committed in one of two ways, so that a crash loses at
most the blocks in flight and resume computes only the missing ones:

* ``DirectFile`` (``backend=local``, copy layout, no compression): written in place into a
  final file created whole beforehand, then marked done; see NOTE [direct writes].
* ``ShardStore`` + ``FinalFile`` (Dask workers, the virtual layout, compression): each block is
  its own shard file (temporary name, fsync, rename); one process copies the shards into the
  final file as they arrive.

With fsync, the flushes run on a background thread (``Syncer``) while the next block computes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
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

    def __init__(self, directory: Path, fsync: bool = True, syncer: Syncer | None = None):
        self.directory = Path(directory)
        self.fsync = fsync
        self.syncer = syncer  # commits in the background (fsync only)

    def shard_path(self, index: int) -> Path:
        return self.directory / f"block-{index:06d}.h5"

    @property
    def direct_path(self) -> Path:
        """The final file while ``backend=local`` writes it in place (see ``DirectFile``)."""
        return self.directory / "direct.h5"

    def marker_path(self, index: int) -> Path:
        return self.directory / f"block-{index:06d}.done"

    def committed(self) -> set[int]:
        """Indices of blocks whose shard file is complete."""
        return self._indices("block-*.h5")

    def marked(self) -> set[int]:
        """Indices of blocks written into ``direct.h5`` (see ``DirectFile``)."""
        return self._indices("block-*.done")

    def _indices(self, pattern: str) -> set[int]:
        if not self.directory.is_dir():
            return set()
        return {int(p.stem.split("-")[1]) for p in self.directory.glob(pattern)}

    def mark(self, block: Block, fsync: bool) -> None:
        """Commit a block of ``direct.h5``: its marker (after its values are written)."""
        self.marker_path(block.index).touch()
        if fsync:
            fsync_path(self.directory)

    def drop_direct(self) -> None:
        """Forget ``direct.h5`` and its markers (another run's, or one this run will not use)."""
        self.direct_path.unlink(missing_ok=True)
        for p in self.directory.glob("block-*.done"):
            p.unlink()

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
        if self.fsync and self.syncer is not None:
            self.syncer.commit(tmp, final)
        else:
            commit(tmp, final, self.fsync)

    def read(
        self, block: Block, hessian: bool = True
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """A committed block's hessian (unless ``hessian=False``) and gradient (blocks at row 0)."""
        with h5py.File(self.shard_path(block.index), "r") as s:
            h = s["hessian"][()] if hessian else None
            return h, (s["gradient"][()] if block.r0 == 0 else None)

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


class Syncer:
    """Commits (fsync, then rename) on one background thread, so disk flushes overlap compute.

    ``os.fsync`` releases the GIL: while it waits for the disk the next block is computed. Commits
    run in submission order; a commit still queued when the process dies is a block in flight
    (its shard keeps its temporary name and is recomputed on resume). Errors (a full disk) are
    raised by the next ``commit`` or by ``wait``.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pipeline-fsync")
        self._futures: list[Future] = []
        self._flushing: dict[Path, Future] = {}

    def commit(self, tmp: Path, path: Path) -> None:
        """``commit(tmp, path, fsync=True)``, in the background."""
        self.submit(commit, tmp, path, True)

    def submit(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the background thread, after what is queued."""
        self._raise_errors()
        self._futures.append(self._pool.submit(fn, *args))

    def flush(self, path: Path) -> None:
        """fsync a file that is still being written, unless a flush of it is waiting to start."""
        self._raise_errors()
        queued = self._flushing.get(path)
        if queued is None or queued.running() or queued.done():
            self._flushing[path] = self._pool.submit(fsync_path, path)
            self._futures.append(self._flushing[path])

    def wait(self) -> None:
        """Block until every queued commit is done; raise the first error."""
        for fut in self._futures:
            fut.result()
        self._futures.clear()

    def drain(self) -> None:
        """Block until the queue is empty, ignoring errors (the caller is handling one)."""
        for fut in self._futures:
            fut.exception()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _raise_errors(self) -> None:
        for fut in [f for f in self._futures if f.done()]:
            fut.result()
            self._futures.remove(fut)


class FinalFile:
    """The final HDF5 file, written under a temporary name as blocks arrive, renamed when complete.

    ``layout="copy"`` writes every block into one self-contained file; ``layout="virtual"`` maps
    ``/hessian`` onto the shard files at ``finish`` (they must then be kept). Use as a context
    manager: leaving it without ``finish`` (an error, an interrupt) removes the temporary file.
    """

    def __init__(
        self,
        path: Path,
        plan: Plan,
        shards: ShardStore,
        dtype: np.dtype,
        layout: str = "copy",
        compression: str | None = None,
        syncer: Syncer | None = None,
    ):
        self.path, self.plan, self.shards, self.layout = path, plan, shards, layout
        self.syncer, self.dtype = syncer, dtype
        self.comp = compression_options(compression)
        shards.drop_direct()  # an earlier local run's file: its blocks are recomputed
        self.tmp = temporary_name(path)
        n, k, d = plan.n_samples, plan.n_outputs, plan.dim
        self.file = h5py.File(self.tmp, "w")
        if layout != "virtual":
            self.file.create_dataset(
                "hessian", (n, k, d, d), dtype=dtype, chunks=plan.chunks, **self.comp
            )
        self.file.create_dataset("gradient", (n, k, d), dtype=dtype, **self.comp)

    def __enter__(self) -> FinalFile:
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:  # not finished: nothing half-written survives
            self.file.close()
            self.file = None
        self.tmp.unlink(missing_ok=True)

    def committed(self) -> set[int]:
        """Blocks committed by an earlier run (their shards)."""
        return self.shards.committed()

    def add(
        self, b: Block, hessian: np.ndarray | None = None, gradient: np.ndarray | None = None
    ) -> None:
        """Commit block ``b`` from the arrays (its shard, then the final file), or copy its
        committed shard (a Dask worker's, or an earlier run's) into the final file."""
        if hessian is not None:
            self.shards.write(b, hessian, gradient)
        else:
            hessian, gradient = self.shards.read(b, hessian=self.layout != "virtual")
        if self.layout != "virtual":
            self.file["hessian"][b.s0 : b.s1, :, b.r0 : b.r1, :] = hessian
        if b.r0 == 0:
            self.file["gradient"][b.s0 : b.s1] = gradient
        if self.syncer is not None:  # start writing it to disk while the next block computes
            self.syncer.flush(self.tmp)

    def finish(self, meta: Metadata) -> None:
        """Write the metadata, close, make durable and rename to ``path``."""
        f = self.file
        if self.layout == "virtual":
            self._map_shards()
        write_metadata(f, meta, self.layout, self.comp)
        f.close()
        self.file = None
        if self.syncer is not None:
            self.syncer.wait()  # the shards (which a virtual layout reads) and earlier flushes
        commit(self.tmp, self.path, self.syncer is not None)

    def _map_shards(self) -> None:
        n, k, d = self.plan.n_samples, self.plan.n_outputs, self.plan.dim
        vl = h5py.VirtualLayout(shape=(n, k, d, d), dtype=self.dtype)
        for b in self.plan.blocks:
            src = h5py.VirtualSource(
                os.path.relpath(self.shards.shard_path(b.index), self.path.parent),
                "hessian",
                shape=(b.s1 - b.s0, k, b.r1 - b.r0, d),
            )
            vl[b.s0 : b.s1, :, b.r0 : b.r1, :] = src
        self.file.create_virtual_dataset("hessian", vl, fillvalue=np.nan)


def write_metadata(f: h5py.File, meta: Metadata, layout: str, comp: dict[str, Any]) -> None:
    """Everything but the Hessian and gradient values; ``status`` says complete because the file
    only ever carries its final name when it is."""
    f.create_dataset("inputs", data=meta.inputs, **comp)
    f.create_dataset("outputs", data=meta.outputs)
    f.create_dataset("sample_index", data=meta.sample_index)
    f.create_dataset("output_index", data=meta.output_index)
    _label(f, meta.inputs.ndim - 1, meta.output_index.ndim)
    for key, value in meta.attrs.items():
        f.attrs[key] = value
    f.attrs["layout"] = layout
    f.attrs["status"] = "complete"


class DirectFile:
    """The final file written in place: one write of each block instead of a shard and a copy.

    For a single process (``backend=local``) with the copy layout and no compression. NOTE:
    [direct writes] The HDF5 file is created whole before any Hessian value is written: every
    dataset and attribute, every chunk allocated (early allocation, no fill). Blocks then go to
    their chunks' byte offsets with ``os.pwrite``, which never touches HDF5 metadata, so the
    file's structure is valid at every moment, whenever the process dies. A block is committed
    by an empty marker file, created after its bytes are written (and, with fsync, flushed). The
    file lives in the shard directory as ``direct.h5`` until it is renamed to ``storage.path``;
    resume reuses it when its fingerprint matches and writes only the blocks without a marker.
    """

    def __init__(
        self,
        path: Path,
        plan: Plan,
        shards: ShardStore,
        dtype: np.dtype,
        meta: Metadata,
        syncer: Syncer | None = None,
    ):
        self.path, self.plan, self.shards, self.syncer = path, plan, shards, syncer
        self.dtype = np.dtype(dtype)
        self.file_path = shards.direct_path
        if not self._reusable(meta.attrs["fingerprint"]):
            shards.drop_direct()
            self._create(meta)
        self.marked = shards.marked()  # blocks an interrupted run wrote here
        self.offsets, self.gradient_offset = self._layout()
        self.fd: int | None = os.open(self.file_path, os.O_WRONLY)

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:  # interrupted: the file and its markers stay, for resume
            if self.syncer is not None:
                self.syncer.drain()  # a block being written keeps its fd until it is done
            os.close(self.fd)
            self.fd = None

    def committed(self) -> set[int]:
        """Blocks in the file already (marked), or committed as shards by an earlier Dask run."""
        return self.marked | self.shards.committed()

    def add(
        self, b: Block, hessian: np.ndarray | None = None, gradient: np.ndarray | None = None
    ) -> None:
        """Write block ``b`` from the arrays, or from its shard (a block of an earlier Dask run);
        nothing when the file holds it already."""
        if hessian is None:
            if b.index in self.marked:
                return
            hessian, gradient = self.shards.read(b)
        if self.syncer is None:
            self._write(b, hessian, gradient, fsync=False)
        else:  # write and flush on the background thread; at most one block waits there
            self.syncer.wait()
            self.syncer.submit(self._write, b, hessian, gradient, True)

    def finish(self, meta: Metadata | None = None) -> None:
        """Make the file durable and rename it to ``path`` (the metadata is there already)."""
        del meta
        if self.syncer is not None:
            self.syncer.wait()
        os.close(self.fd)
        self.fd = None
        commit(self.file_path, self.path, self.syncer is not None)

    def _write(self, b: Block, hessian: np.ndarray, gradient: np.ndarray | None, fsync: bool):
        cs, _, cr, d = self.plan.chunks
        chunk = np.zeros((cs, 1, cr, d), self.dtype)
        for s in range(b.s0, b.s1, cs):
            for k in range(self.plan.n_outputs):
                for r in range(b.r0, b.r1, cr):
                    part = hessian[s - b.s0 : s - b.s0 + cs, k : k + 1, r - b.r0 : r - b.r0 + cr]
                    if part.shape == chunk.shape:
                        data = np.ascontiguousarray(part, self.dtype)
                    else:  # an edge chunk: HDF5 stores it whole
                        chunk[:] = 0
                        chunk[: part.shape[0], :, : part.shape[2]] = part
                        data = chunk
                    os.pwrite(self.fd, memoryview(data).cast("B"), self.offsets[s, k, r])
        if b.r0 == 0:
            row = self.plan.n_outputs * self.plan.dim * self.dtype.itemsize
            g = np.ascontiguousarray(gradient, self.dtype)
            os.pwrite(self.fd, memoryview(g).cast("B"), self.gradient_offset + b.s0 * row)
        if fsync:
            os.fsync(self.fd)
        self.shards.mark(b, fsync)

    def _reusable(self, fingerprint: str) -> bool:
        if not self.file_path.is_file():
            return False
        try:
            with h5py.File(self.file_path, "r") as f:
                return f.attrs.get("fingerprint") == fingerprint
        except OSError:
            return False

    def _create(self, meta: Metadata) -> None:
        """Create the whole file under a temporary name, then give it its name in the shards."""
        n, k, d = self.plan.n_samples, self.plan.n_outputs, self.plan.dim
        tmp = temporary_name(self.file_path)
        try:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("hessian", (n, k, d, d), self.dtype, chunks=self.plan.chunks,
                                 dcpl=_early_allocation(), fill_time="never")  # fmt: skip
                f.create_dataset("gradient", (n, k, d), self.dtype, dcpl=_early_allocation(),
                                 fill_time="never")  # fmt: skip
                write_metadata(f, meta, "copy", {})
            commit(tmp, self.file_path, self.syncer is not None)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _layout(self) -> tuple[dict[tuple[int, int, int], int], int]:
        """Byte offsets of every Hessian chunk (by its first sample, output, row) and of the
        contiguous gradient."""
        with h5py.File(self.file_path, "r") as f:
            hess = f["hessian"].id
            offsets = {}
            for i in range(hess.get_num_chunks()):
                info = hess.get_chunk_info(i)
                offsets[info.chunk_offset[:3]] = info.byte_offset
            return offsets, f["gradient"].id.get_offset()


def _early_allocation() -> h5py.h5p.PropDCID:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


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
