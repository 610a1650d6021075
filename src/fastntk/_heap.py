"""Freed memory kept for reuse: glibc's adaptive allocation thresholds, raised once.

A kernel computation allocates and frees many tensors of a few megabytes (cotangents,
Gram blocks). glibc's malloc serves blocks above its mmap threshold (128 KiB at start)
with fresh mappings and gives them back on free, so the next tensor of that size touches
fresh pages: a page fault per 4 KiB, about 2 µs each on the benchmark machine, which was
10-25 % of a call's time. glibc raises that threshold itself, up to 32 MiB (and keeps up
to twice as much free heap before trimming), when a program frees a mapped block of that
size. :func:`keep_freed_memory` lets that happen once, by allocating and freeing one such
block without touching it: glibc's own rule, applied early, not a new setting.

Other C libraries (macOS, Windows, musl) and preloaded allocators are left alone; set
``FASTNTK_KEEP_HEAP=0`` to leave glibc alone too.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

MMAP_THRESHOLD_MAX = 32 * 2**20
"""glibc's ceiling for its adaptive mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)."""


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's adaptive mmap threshold to its ceiling, once; whether it was done."""
    if os.environ.get("FASTNTK_KEEP_HEAP", "1") == "0" or platform.libc_ver()[0] != "glibc":
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
