"""Freed memory kept for reuse: glibc's adaptive allocation thresholds, raised on request.

A kernel computation allocates and frees many tensors of a few megabytes (cotangents,
Gram blocks). glibc's malloc serves blocks above its mmap threshold (128 KiB at start)
with fresh mappings and gives them back on free, so the next tensor of that size touches
fresh pages: a page fault per 4 KiB. glibc raises that threshold itself, up to 32 MiB (and
keeps up to twice as much free heap before trimming), when a program frees a mapped block
of that size. :func:`keep_freed_memory` lets that happen at once, by allocating and freeing
one such block without touching it: glibc's own rule, applied early, not a new setting.

It is for the whole process and for good (glibc has no way back to its adaptive start), so
the library never does it by itself: a program calls :func:`fastntk.keep_freed_memory`, or
sets ``FASTNTK_KEEP_HEAP=1`` to have fastntk's kernels do it on their first call;
``fastntk compute`` does it in its own process. Other C libraries (macOS, Windows, musl)
and preloaded allocators are left alone.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

MMAP_THRESHOLD_MAX = 32 * 2**20
"""glibc's ceiling for its adaptive mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)."""


def keep_heap_requested() -> bool:
    """Whether ``FASTNTK_KEEP_HEAP=1`` asks fastntk's kernels to call :func:`keep_freed_memory`."""
    return os.environ.get("FASTNTK_KEEP_HEAP", "0") == "1"


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse: raise its adaptive mmap threshold to its ceiling
    (32 MiB; trimming then waits for 64 MiB of free heap), for the rest of the process.

    Repeated kernel calls then reuse their memory instead of faulting in fresh pages; the
    process keeps up to that much freed memory (``fastntk.gram``'s ``max_memory`` does not
    count it). Calls after the first do nothing.

    Returns:
        Whether it was done (False where the C library is not glibc).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):
        return False
    block = libc.malloc(MMAP_THRESHOLD_MAX - 2 * 4096)  # a mapped chunk just under the ceiling
    if not block:
        return False
    libc.free(block)
    return True
