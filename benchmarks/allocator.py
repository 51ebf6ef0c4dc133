"""Steadier CPU timings: glibc keeps the memory a call frees for the next call.

By default glibc hands large freed blocks back to the kernel (``munmap``, or a trim of the heap's
top), so a call that allocates the same buffers each time page-faults them in again, 4 KiB at a
time. On the 2-core VM that was a third to half of a PINN call (4096 points: 7-12 ms a call
with the default allocator, 5.2-5.5 ms with this one; torch.func alike), and the share varied from
call to call. ``keep_freed_memory`` raises the mmap threshold to its largest value (32 MiB) and
the trim threshold to 1 GiB: blocks up to 32 MiB come from the heap and stay there. It applies to
the whole process, so every method timed in it gets the same allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> str:
    """Set glibc's thresholds (see module doc); returns what was done, for the table's header."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        ok = False
    return "freed memory kept (glibc mallopt)" if ok else "default allocator (no glibc mallopt)"
