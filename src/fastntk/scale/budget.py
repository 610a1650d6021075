"""Memory budgets: parse "4GB"-style sizes and size blocks so a block's working set fits.

The working set of one block of b x b' samples is

    2·b·F            factors of the row block and of the column block (F: the method's bytes per sample)
  + 4·b·I            the row and column inputs, each read and then cast (I: input bytes per sample)
  + C·b·b'·R         the output block: the contraction's result, its partial sums, the mirrored
                     copy of a Gram block and the host copy written to disk (R: bytes per pair)

with C = OUTPUT_COPIES. What the budget leaves beside it caches factors for reuse.
"""

from __future__ import annotations

import math
import numbers
import re

from .._errors import OptionError

UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}
"""Size suffixes, case-insensitive: decimal (KB, MB, GB, TB; K, M, G, T) and binary (KiB, MiB, GiB, TiB; Ki...)."""

OUTPUT_COPIES = 4
"""Copies of an output block alive at once (see the module docstring)."""

INPUT_COPIES = 4
"""Row and column input blocks, each as read and as cast to the compute dtype."""

ROWS = 8
"""Without a tighter budget a kernel is cut into at least this many block rows (of at least
MIN_BLOCK samples): a Gram matrix then skips almost half its blocks, and ranks get several
blocks each. It does not depend on the number of ranks, so any number of ranks gives the same bits."""

MIN_BLOCK = 64


def parse_memory(value: object, name: str = "max_memory") -> int:
    """Bytes from an int or a string such as "4GB", "512MiB", "1.5 GiB", "2e9".

    GB/MB/KB/TB (and G, M, K, T) are decimal (10**9...); GiB/MiB/KiB/TiB (and Gi...) binary (2**30...).

    Raises:
        OptionError: not a positive size.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value >= 1:
            return int(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).lower() in UNITS:
            size = float(match.group(1)) * UNITS[match.group(2).lower()]
            if math.isfinite(size) and size >= 1:
                return int(size)
    raise OptionError(
        f"{name}={value!r}: give a positive number of bytes or a size such as '4GB', '512MiB', '1.5GiB'"
    )


def working_bytes(rows: int, cols: int, factor_bytes: int, input_bytes: int, pair_bytes: int) -> int:
    """Bytes one block of rows x cols samples needs while it is computed (see the module docstring)."""
    return (rows + cols) * factor_bytes + INPUT_COPIES * max(rows, cols) * input_bytes + OUTPUT_COPIES * rows * cols * pair_bytes


def block_for_budget(n1: int, n2: int, factor_bytes: int, input_bytes: int, pair_bytes: int, budget: int) -> int:
    """The largest square block whose working set fits ``budget``, at most max(MIN_BLOCK, ⌈N/ROWS⌉).

    Raises:
        OptionError: not even one sample fits the budget.
    """
    q = OUTPUT_COPIES * pair_bytes
    a = 2 * factor_bytes + INPUT_COPIES * input_bytes
    block = int((-a + math.sqrt(a * a + 4.0 * q * budget)) / (2.0 * q)) if q else budget // max(1, a)
    while block > 1 and working_bytes(block, block, factor_bytes, input_bytes, pair_bytes) > budget:
        block -= 1  # rounding in the square root
    if block < 1 or working_bytes(1, 1, factor_bytes, input_bytes, pair_bytes) > budget:
        need = working_bytes(1, 1, factor_bytes, input_bytes, pair_bytes)
        raise OptionError(
            f"max_memory={format_bytes(budget)} is too small: one sample's factors, inputs and output need "
            f"{format_bytes(need)}; raise max_memory (blocks of 64+ samples need about "
            f"{format_bytes(working_bytes(64, 64, factor_bytes, input_bytes, pair_bytes))})"
        )
    return max(1, min(block, max(MIN_BLOCK, -(-max(n1, n2) // ROWS)), max(n1, n2)))


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def limit_heap_retention(threshold: int = 128 * 1024) -> bool:
    """Make glibc's malloc return memory freed after each block to the system (``fastntk gram`` does).

    glibc raises its mmap threshold whenever a large block is freed (up to 32 MiB), after which
    freed blocks stay in a fragmented heap: a process's peak RSS can then reach two or three
    times ``max_memory``. Fixing the threshold at glibc's initial 128 KiB (what the environment
    variable ``MALLOC_MMAP_THRESHOLD_=131072`` does) keeps it near the budget. This setting is
    process-wide, so the library leaves it to the caller.

    Returns:
        Whether it took effect (False where the C library is not glibc).
    """
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD = -3
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
