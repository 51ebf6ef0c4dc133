"""glibc's thresholds for large blocks: a call's freed buffers reused, not faulted in afresh.

NOTE [large buffers]: glibc returns freed blocks above its mmap threshold (dynamic, at most
32 MiB) to the kernel, so a call that allocates the same large tensors again maps and
page-faults them in afresh, 4 KiB at a time, and on a VM a page fault is dear. The engine's
tangents are such tensors (ViT-Tiny: (894 directions, 17 tokens, 768) = 47 MB each): its
``hessian()`` call at 3x32x32 took 2.9-3.9 s with glibc's defaults and 1.9-2.2 s with buffers
up to 1 GiB taken from the heap and kept there (interleaved calls, 2-core CPU). So
``hessian()``, ``diagonal()``, ``eigen()`` and ``factored()`` run inside
:func:`large_buffers_reused`: the heap keeps what a call frees (up to the thresholds; the memory
budget bounds a call's working set), and glibc's defaults come back when the last call in the
process leaves (calls in several threads count as one span); a process that asked for the
thresholds for good (a Dask worker: ``keep_for_good``) keeps them. Elsewhere than glibc
nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters
_GLIBC_DEFAULT = 128 * 1024
MMAP_THRESHOLD, TRIM_THRESHOLD = 1 << 30, 2 << 30

_lock = threading.Lock()
_depth = 0  # calls inside the span
_for_good = False

F = TypeVar("F", bound=Callable)
# ``warnings.warn``'s stacklevel that names the caller of a function wrapped by
# ``reusing_large_buffers`` (the wrapper is a frame between them)
CALLER = 3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds; False where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


@contextlib.contextmanager
def large_buffers_reused() -> Iterator[None]:
    """Blocks below 1 GiB from the heap and kept there while the context is open (in any
    thread); glibc's defaults back when the last one leaves, unless kept for good."""
    global _depth
    with _lock:
        if _depth == 0 and not _for_good:
            mallopt(MMAP_THRESHOLD, TRIM_THRESHOLD)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and not _for_good:
                mallopt(_GLIBC_DEFAULT, _GLIBC_DEFAULT)


def keep_for_good() -> bool:
    """The thresholds for the rest of the process (a Dask worker computes block after block);
    False where there is no glibc."""
    global _for_good
    with _lock:
        _for_good = mallopt(MMAP_THRESHOLD, TRIM_THRESHOLD)
        return _for_good


def reusing_large_buffers(fn: F) -> F:
    """``fn`` run inside :func:`large_buffers_reused`."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with large_buffers_reused():
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def one_heap() -> bool:
    """Whether this process's threads share glibc's main heap alone, made so for the threads it
    starts from now on (``mallopt(M_ARENA_MAX, 1)``): then workers forked from it compute on
    that heap as workers started with MALLOC_ARENA_MAX=1 do (NOTE [forked workers] in
    ``pipeline.execution.backends.dask``). False where there is no glibc, or where threads
    (torch's, an earlier cluster's) already have heaps of their own, which a forked worker's
    threads would take."""
    libc = _libc()
    if libc is None or not libc.mallopt(_M_ARENA_MAX, 1):
        return False
    return heaps() == 1


def heaps() -> int:
    """The arenas (heaps) of glibc's malloc in this process, read from ``malloc_info``; 0
    where there is no glibc."""
    import tempfile

    libc = _libc()
    if libc is None:
        return 0
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        stream = libc.fopen(f.name.encode(), b"w")
        if not stream:
            return 0
        try:
            libc.malloc_info(0, stream)
        finally:
            libc.fclose(stream)
        return f.read().count(b"<heap nr=")
