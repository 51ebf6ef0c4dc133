"""glibc's malloc settings for large blocks (see NOTE: [malloc in Dask workers])."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# NOTE: [malloc in Dask workers] Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536.
# Setting it disables glibc's dynamic mmap threshold, so every large tensor is mmap-ed and
# page-faulted afresh: a measured 1.5x slowdown of the Hessian kernels (24 -> 38 ms a block), and
# more when two workers fault pages at once. The clusters we start keep glibc's defaults.
# Even glibc's dynamic threshold stops at 32 MiB, so 64 MiB blocks are mmap-ed and faulted afresh
# every time (16,384 faults a block; a narrow MLP's 64 blocks of D = 4096 took 4.6-6.7 s instead
# of 2.7 s). So blocks are computed with ``large_buffers_reused``: allocations below 1 GiB come
# from the heap and are reused, which bounds the memory kept to the run's peak.
#
# Dask workers compute in threads of their own, and glibc gives each thread its own arena: its
# heaps hold at most 64 MiB each and are trimmed apart from the main heap, so large tensors were
# mapped and faulted afresh there whatever the thresholds (the diagonals of a D = 784 MLP: 5.2 s
# in a thread against 3.5 s in the main thread, 4.3 s with MALLOC_ARENA_MAX=1; single-threaded
# torch 8.3 against 6.4 s, and 6.4 s with one arena). So the workers of our clusters start with
# one arena.
_DASK_TRIM = "MALLOC_TRIM_THRESHOLD_"
_ARENAS = "MALLOC_ARENA_MAX"
# The local backend computes its blocks inside one span of ``large_buffers_reused``
# (``pipeline.hessian.allocator``, NOTE [large buffers]).


@contextlib.contextmanager
def keep_malloc_defaults() -> Iterator[None]:
    """Start Dask workers without the nanny's MALLOC_TRIM_THRESHOLD_ and with one malloc arena
    (see the NOTE above)."""
    import dask

    if os.environ.get(_DASK_TRIM) == "65536":  # left behind by an earlier nanny in this process
        os.environ.pop(_DASK_TRIM)
    environ = "distributed.nanny.pre-spawn-environ"
    with dask.config.set({f"{environ}.{_DASK_TRIM}": None, f"{environ}.{_ARENAS}": 1}):
        yield
