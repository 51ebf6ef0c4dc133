"""Steadier CPU timings: glibc keeps the memory a call frees for the next call.

By default glibc hands large freed blocks back to the kernel (``munmap``, or a trim of the heap's
top), so a call that allocates the same buffers each time page-faults them in again, 4 KiB at a
time. On the 2-core VM that was a third to half of a PINN call (4096 points: 7-12 ms a call
with the default allocator, 5.2-5.5 ms with this one; torch.func alike), and the share varied from
call to call. ``keep_freed_memory`` raises the mmap threshold to 1 GiB and the trim threshold to
2 GiB (the engine's own thresholds): blocks up to 1 GiB come from the heap and stay there. It
applies to the whole process, so every method timed in it gets the same allocator.
"""

from __future__ import annotations


def keep_freed_memory() -> str:
    """Set glibc's thresholds for the whole process, the ones the engine's calls use (NOTE
    [large buffers] in ``pipeline/hessian/allocator.py``: blocks below 1 GiB from the heap and
    kept), and keep them: the engine's calls then leave them as they are, so every method timed
    in the process runs with the same allocator. Returns what was done, for the table's header."""
    from pipeline.hessian.allocator import keep_for_good

    ok = keep_for_good()
    return "freed memory kept (glibc mallopt)" if ok else "default allocator (no glibc mallopt)"
