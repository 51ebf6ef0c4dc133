"""Making files durable: fsync, atomic renames, and the background thread that does both.

NOTE: [commit guarantee] A block counts as committed when its commit record exists: a marker file
(blocks written in place) or a shard file under its final name. The record is created only after
the block's bytes are written, and, with ``storage.fsync=true``, after they are flushed to the disk.
So a killed process, and with fsync also a crash of the machine, loses at most the blocks whose
records were not yet created; resume recomputes them. One ``fsync`` of the in-place file flushes
every block written into it before the call, whichever process wrote them (on one machine), so
blocks are committed in groups: a background thread flushes once for all the blocks that arrived
while it flushed the previous group, then creates their markers. The same guarantee as a flush
per block; a block waits for at most one flush; and the flushes adapt to the disk: one per block
while the disk keeps up, fewer and larger groups when it does not. Workers on other machines
flush their own writes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file (or a directory entry) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path, fsync: bool = True) -> None:
    """Atomically give ``tmp`` its final name; with ``fsync``, make it durable first.

    The rename alone survives a killed process; fsync also survives a crash of the machine.
    """
    if fsync:
        fsync_path(tmp)
    os.replace(tmp, path)
    if fsync:
        fsync_path(path.parent)


def write_atomic(path: Path, data: bytes, tmp: Path, fsync: bool = False) -> None:
    """Write ``data`` to ``tmp`` and rename it to ``path``."""
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        commit(tmp, path, fsync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def preallocate(path: Path) -> bool:
    """Reserve the disk blocks of ``path`` up to its size (Linux ``fallocate``: the sparse
    holes become allocated, unwritten extents), so that the blocks written into it later skip
    the file system's allocation. Measured on ext4 (64 MiB writes, each flushed): 41-43 ms a
    write instead of 55-182. Nothing happens where the call is missing or unsupported (it is
    never emulated by writing zeros, as ``posix_fallocate`` may be). Returns whether it was done.
    """
    fallocate = _fallocate()
    if fallocate is None:
        return False
    fd = os.open(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        return size == 0 or fallocate(fd, 0, ctypes.c_int64(0), ctypes.c_int64(size)) == 0
    finally:
        os.close(fd)


def _fallocate():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.fallocate
    except (OSError, AttributeError):  # not Linux, or no glibc
        return None


class Background:
    """One background thread that runs submitted calls in order, so flushes overlap compute.

    ``os.fsync`` and ``os.pwrite`` release the GIL. Errors (a full disk) are raised by the next
    ``submit`` or by ``wait``; ``drain`` waits without raising (for a caller handling an error).
    """

    def __init__(self, name: str = "pipeline-store"):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._futures: list[Future] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on the background thread, after what is queued."""
        self.raise_errors()
        with self._lock:
            self._futures.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        """Block until everything queued is done; raise the first error."""
        while True:
            with self._lock:
                if not self._futures:
                    return
                fut = self._futures.pop(0)
            fut.result()

    def drain(self) -> None:
        """Block until the queue is empty, ignoring errors."""
        with self._lock:
            futures, self._futures = self._futures, []
        for fut in futures:
            fut.exception()

    def raise_errors(self) -> None:
        with self._lock:
            done = [f for f in self._futures if f.done()]
            self._futures = [f for f in self._futures if not f.done()]
        for fut in done:
            fut.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
