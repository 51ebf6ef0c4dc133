"""Writing one computed block where the result is stored, from whichever process computed it.

A sink is a small picklable object: the driver makes it, Dask ships it with each task, and the
process that holds a block's values (a worker, or this process's writer thread) calls
``sink.write``. It writes the values (the Hessian rows, the gradient, the block's statistics)
and returns the block's index; the driver then commits the block (see NOTE: [commit guarantee] in
``durable``).

- ``InPlaceSink``: the block's bytes go to their offsets in the laid-out final file (see NOTE:
  [direct writes] in ``layout``): one ``pwritev`` per run of adjacent chunks, straight from the
  block's memory, no copy. One write per byte.
- ``ShardSink``: the block becomes its own HDF5 file (temporary name, fsync, rename), for the
  virtual layout and for compression, which an in-place write cannot do.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from .durable import commit
from .layout import BLOCK_SUMS, FileMap
from .names import temporary_name
from .plan import Block, Plan
from .statistics import BlockStats, block_stats

IOV_MAX = 1024  # buffers per pwritev call (Linux's limit)


def host_array(
    t: Tensor | np.ndarray, dtype: np.dtype | None = None, staged: bool = False
) -> np.ndarray:
    """A C-contiguous host array of ``t`` in ``dtype`` (default: its own; no copy when it is one
    already). With ``staged``, a GPU tensor is copied into this process's page-locked buffer,
    which the next staged copy overwrites."""
    if isinstance(t, Tensor):
        t = t.detach()
        if t.device.type != "cpu":
            t = _pinned_copy(t) if staged else t.cpu()
        t = t.numpy()
    return np.ascontiguousarray(t, dtype)


_PINNED: dict[str, Tensor] = {}


def _pinned_copy(t: Tensor) -> Tensor:
    """``t`` copied into a page-locked host buffer reused across calls (fast DMA, no new pages)."""
    key = str(t.dtype)
    buf = _PINNED.get(key)
    if buf is None or buf.numel() < t.numel():
        buf = _PINNED[key] = torch.empty(t.numel(), dtype=t.dtype, pin_memory=True)
    out = buf[: t.numel()].view(t.shape)
    out.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return out


@dataclass(frozen=True)
class InPlaceSink:
    """Writes blocks into the laid-out file ``path`` at their offsets.

    Attributes:
        path: the file (``<storage.path>.shards/direct.h5``).
        identity: (st_dev, st_ino) of that file: a write into another file of the same name
            (a later run's) is refused.
        layout_id: the file's ``layout_id`` attribute (which byte offsets belong to it).
        plan: the blocks and chunks.
        dtype: the Hessian's dtype.
        flush: fdatasync each block here (workers that may sit on other machines); otherwise
            the driver flushes the file once per batch of blocks.
    """

    path: str
    identity: tuple[int, int]
    layout_id: str
    plan: Plan
    dtype: str
    flush: bool = False

    @property
    def directory(self) -> str:
        """Where the sink writes (whoever writes must see it)."""
        return os.path.dirname(self.path)

    def write(
        self, b: Block, h: Tensor | np.ndarray, g: Tensor | np.ndarray | None,
        stats: BlockStats | None = None,
    ) -> int:  # fmt: skip
        """Write block ``b``: hessian (S, K, R, D), gradient (S, K, D) for blocks at row 0."""
        dtype = np.dtype(self.dtype)
        h = host_array(h, dtype, staged=True)
        # the statistics are taken while the Hessian's bytes are written (the writes wait for
        # the disk, the statistics for the CPU)
        pending = _stats_pool().submit(block_stats, h, b.r0) if stats is None else None
        fd = os.open(self.path, os.O_WRONLY)
        direct = _open_direct(self.path)
        try:
            for f in [fd] if direct is None else [fd, direct]:
                st = os.fstat(f)
                if (st.st_dev, st.st_ino) != tuple(self.identity):
                    raise RuntimeError(
                        f"{self.path} was replaced by another run; block not written"
                    )
            fmap = FileMap.of(Path(self.path), self.layout_id)
            _write_runs(fd, self._hessian_pieces(b, h, fmap), direct)
            if pending is not None:
                stats = pending.result()
            _write_runs(fd, self._row_pieces(b, stats, g, dtype, fmap))
            if self.flush:
                os.fdatasync(fd)
        finally:
            if pending is not None:
                pending.cancel() or pending.exception()  # never leave it running on h
            os.close(fd)
            if direct is not None:
                os.close(direct)
        return b.index

    def _hessian_pieces(
        self, b: Block, h: np.ndarray, fmap: FileMap
    ) -> list[tuple[int, memoryview]]:
        cs, _, cr, d = fmap.chunks
        row = d * h.itemsize
        pieces = []
        if h.shape[1] == 1 and b.r1 - b.r0 == cr:  # a chunk's samples lie one after another in h
            for c in range(b.s0 // cs, -(-b.s1 // cs)):
                lo, hi = max(b.s0, c * cs), min(b.s1, (c + 1) * cs)
                base = int(fmap.hessian[c, 0, b.r0 // cr]) + (lo - c * cs) * cr * row
                pieces.append((base, memoryview(h[lo - b.s0 : hi - b.s0]).cast("B")))
            return pieces
        for s in range(b.s0, b.s1):
            c, within = divmod(s, cs)
            for k in range(self.plan.n_outputs):
                for r in range(b.r0, b.r1, cr):
                    base = int(fmap.hessian[c, k, r // cr]) + within * cr * row
                    part = h[s - b.s0, k, r - b.r0 : min(r + cr, b.r1) - b.r0]
                    pieces.append((base, memoryview(part).cast("B")))
        return pieces

    def _row_pieces(self, b, stats, g, dtype, fmap) -> list[tuple[int, memoryview]]:
        """The gradient rows (blocks at row 0), the block's sums, the diagonal and row norms."""
        k, d = self.plan.n_outputs, self.plan.dim
        item = dtype.itemsize
        pieces = []
        if b.r0 == 0:
            grad = host_array(g, dtype)
            pieces.append((fmap.contiguous["gradient"] + b.s0 * k * d * item, _bytes(grad)))
        rb, n = b.r0 // self.plan.block_rows, self.plan.n_samples
        sums = np.ascontiguousarray(stats.sums, np.float64)
        pieces.append(
            (fmap.contiguous[BLOCK_SUMS] + (rb * n + b.s0) * sums[0].nbytes, _bytes(sums))
        )
        for name, values in (("diagonal", stats.diagonal), ("row_norm", stats.row_norm)):
            values = np.ascontiguousarray(values, dtype)
            if b.r1 - b.r0 == d:  # whole rows: the block's values are one run of the dataset
                pieces.append((fmap.contiguous[name] + b.s0 * k * d * item, _bytes(values)))
                continue
            for s in range(b.s0, b.s1):
                for o in range(k):
                    at = fmap.contiguous[name] + ((s * k + o) * d + b.r0) * item
                    pieces.append((at, _bytes(values[s - b.s0, o])))
        return pieces


_POOL: list[ThreadPoolExecutor] = []


def _stats_pool() -> ThreadPoolExecutor:
    """One thread per process for block statistics."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(1, thread_name_prefix="pipeline-stats"))
    return _POOL[0]


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a)).cast("B")


def _write_runs(fd: int, pieces: list[tuple[int, memoryview]], direct: int | None = None) -> None:
    """Write (offset, bytes) pieces by runs of adjacent pieces (``pwritev``, ``IOV_MAX``
    buffers a call); with a ``direct`` descriptor (``O_DIRECT``), the whole pages of long runs
    bypass the page cache (NOTE [direct I/O])."""
    pieces.sort(key=lambda p: p[0])
    i = 0
    while i < len(pieces):
        start, bufs, end = pieces[i][0], [pieces[i][1]], pieces[i][0] + pieces[i][1].nbytes
        i += 1
        while i < len(pieces) and pieces[i][0] == end:
            bufs.append(pieces[i][1])
            end += pieces[i][1].nbytes
            i += 1
        if (
            direct is not None
            and end - start >= DIRECT_AT_LEAST
            and _write_direct(fd, direct, bufs, start)
        ):
            continue
        _pwritev(fd, bufs, start)


def _pwritev(fd: int, bufs: list[memoryview], at: int) -> None:
    for j in range(0, len(bufs), IOV_MAX):
        part = bufs[j : j + IOV_MAX]
        size = sum(b.nbytes for b in part)
        if os.pwritev(fd, part, at) != size:  # a short write (rare): redo it plainly
            _pwrite_all(fd, part, at)
        at += size


# NOTE [direct I/O] A block's Hessian is written with O_DIRECT where the file system takes it:
# its whole pages go from a page-aligned staging buffer straight to the disk, and only the
# partial pages at a run's two ends through the page cache. Written through the page cache, a
# 64 MiB block cost the kernel 115-240 ms of CPU (copying, allocating pages, writing back) and
# slowed the compute beside it 5x on 2 cores (a tanh MLP at D = 64: 68,000-72,000 samples/s
# alone, 12,000-14,000 beside a thread writing 64 MiB blocks, each flushed); written directly,
# 33 ms a block and 60,000 samples/s beside it. Durability is unchanged: commits still flush the
# file (NOTE: [commit guarantee]). Where O_DIRECT is refused (tmpfs, some network file systems),
# the page cache is used as before.
DIRECT_ALIGN = 4096  # offsets, lengths and buffer addresses of direct writes: whole pages
DIRECT_SEGMENT = 8 << 20  # bytes staged and written per call
DIRECT_AT_LEAST = 1 << 20  # shorter runs go through the page cache
_STAGING = threading.local()  # a staging buffer per writing thread


def _open_direct(path: str) -> int | None:
    """A second descriptor of ``path`` with O_DIRECT, or None where it cannot be had."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def _write_direct(fd: int, direct: int, bufs: list[memoryview], start: int) -> bool:
    """Write the bytes of ``bufs`` at ``start``: whole pages through ``direct``, the partial
    pages at both ends through ``fd``. False (nothing written) where the file system refuses
    the direct write at once."""
    end = start + sum(b.nbytes for b in bufs)
    a0 = -(-start // DIRECT_ALIGN) * DIRECT_ALIGN
    a1 = end // DIRECT_ALIGN * DIRECT_ALIGN
    if a1 - a0 < DIRECT_ALIGN:
        return False
    stream = _Stream(bufs, start)
    stage = _staging()
    for at in range(a0, a1, DIRECT_SEGMENT):
        n = min(DIRECT_SEGMENT, a1 - at)
        stream.copy(at, at + n, stage)
        try:
            written = os.pwrite(direct, stage[:n], at)
        except OSError as err:
            if at == a0 and err.errno == errno.EINVAL:  # O_DIRECT taken at open, not at write
                return False
            raise
        if written != n:  # a short direct write (rare): the rest through the page cache
            _pwrite_all(fd, [stage[written:n]], at + written)
    for p, q in ((start, a0), (a1, end)):
        if q > p:
            part = bytearray(q - p)
            stream.copy(p, q, memoryview(part))
            _pwrite_all(fd, [memoryview(part)], p)
    return True


class _Stream:
    """The bytes of consecutive buffers, read by file offset."""

    def __init__(self, bufs: list[memoryview], start: int):
        self.bufs = bufs
        self.offsets = [start]
        for b in bufs:
            self.offsets.append(self.offsets[-1] + b.nbytes)

    def copy(self, p: int, q: int, out: memoryview) -> None:
        """Bytes [p, q) (file offsets) into ``out[: q - p]``."""
        i = bisect.bisect_right(self.offsets, p) - 1
        o = 0
        while p < q:
            b, base = self.bufs[i], self.offsets[i]
            n = min(q, base + b.nbytes) - p
            out[o : o + n] = b[p - base : p - base + n]
            p, o, i = p + n, o + n, i + 1


def _staging() -> memoryview:
    """This thread's page-aligned staging buffer of ``DIRECT_SEGMENT`` bytes."""
    buf = getattr(_STAGING, "buf", None)
    if buf is None:
        buf = _STAGING.buf = mmap.mmap(-1, DIRECT_SEGMENT)  # anonymous maps are page-aligned
    return memoryview(buf)


def _pwrite_all(fd: int, bufs: list[memoryview], at: int) -> None:
    for buf in bufs:
        while buf.nbytes:
            n = os.pwrite(fd, buf, at)
            buf, at = buf[n:], at + n


@dataclass(frozen=True)
class ShardSink:
    """Writes each block as its own shard file in ``directory``; the shard's rename commits it."""

    directory: str
    fsync: bool = True

    def write(
        self, b: Block, h: Tensor | np.ndarray, g: Tensor | np.ndarray | None,
        stats: BlockStats | None = None,
    ) -> int:  # fmt: skip
        """Commit block ``b``. Idempotent: a block written twice leaves one identical shard."""
        h = host_array(h, staged=True)
        if stats is None:
            stats = block_stats(h, b.r0)
        final = Path(self.directory) / f"block-{b.index:06d}.h5"
        tmp = temporary_name(final)
        try:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("hessian", data=h)
                if g is not None:
                    f.create_dataset("gradient", data=host_array(g, h.dtype))
                f.create_dataset("diagonal", data=stats.diagonal)
                f.create_dataset("row_norm", data=stats.row_norm)
                f.create_dataset("sums", data=stats.sums)
                f.attrs.update(s0=b.s0, s1=b.s1, r0=b.r0, r1=b.r1)
            commit(tmp, final, self.fsync)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return b.index


def read_shard(
    path: Path, hessian: bool = True
) -> tuple[np.ndarray | None, np.ndarray | None, BlockStats]:
    """A shard's hessian (unless ``hessian=False``), gradient (blocks at row 0) and statistics."""
    with h5py.File(path, "r") as s:
        h = s["hessian"][()] if hessian else None
        g = s["gradient"][()] if "gradient" in s else None
        stats = BlockStats(s["diagonal"][()], s["row_norm"][()], s["sums"][()])
    return h, g, stats


def shard_is_readable(path: Path, plan: Plan, b: Block) -> bool:
    """Whether ``path`` is a complete shard of block ``b``."""
    try:
        with h5py.File(path, "r") as s:
            shape = (b.s1 - b.s0, plan.n_outputs, b.r1 - b.r0, plan.dim)
            return s["hessian"].shape == shape and "sums" in s
    except (OSError, KeyError):
        return False
