"""One memory model for every kernel: parse sizes ("4GB"), and size blocks so that a block's
working set fits ``max_memory``.

The working set of one block of r x c samples is

    F·(r + c)         factors of the row block and of the column block (F: the method's bytes
                      per sample; vp's row blocks are their inputs: F·c only)
  + 4·max(r, c)·I     the row and column inputs, each read and then cast (I: input bytes per sample)
  + 4·r·c·R           the output block: the contraction's result, its partial sums, the mirrored
                      copy of a Gram block and the host copy written to disk (R: bytes per pair)

What the budget leaves beside it caches factors for reuse (:class:`~fastntk.blocks.schedule.FactorCache`);
a result held in memory is counted before (it must fit the budget too).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Protocol

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

DEFAULT_MAX_MEMORY = "4GB"

MIN_BLOCK = 64
"""Blocks of a kernel on disk or over ranks are not cut below this many samples to make more
block rows (only the budget cuts them further): shorter GEMMs and more passes gain nothing."""

GRAM_HALVES_MIN = 128
"""A Gram matrix in memory is cut into two block rows (3 of its 4 blocks computed, the fourth
mirrored) when each half keeps at least this many samples; smaller halves run GEMMs too short
to gain (``docs/special-paths.md``)."""


@dataclass(frozen=True)
class Footprint:
    """Bytes per sample and per sample pair that a kernel's blocks hold (see the module docstring)."""

    factor_bytes: int
    """Per-sample factors of the method, on each side that holds them."""
    factor_sides: int
    """Sides of a block pair whose samples hold factors: 2, or 1 for vp (its rows are inputs)."""
    input_bytes: int
    pair_bytes: int
    owner: str = "the method"
    """Who needs it, for messages (e.g. "method 'jacobian' (O=10, P=1,234)")."""

    def working(self, rows: int, cols: int) -> int:
        """Bytes one block of rows x cols samples needs while it is computed."""
        factors = (rows if self.factor_sides == 2 else 0) + cols
        return factors * self.factor_bytes + INPUT_COPIES * max(rows, cols) * self.input_bytes + OUTPUT_COPIES * rows * cols * self.pair_bytes


def block_cut(symmetric: bool, partitioned: bool) -> tuple[int, int]:
    """How many block rows a kernel is cut into at least, and the fewest samples a block keeps
    when it is cut for that (fewer rows when N is small; the budget alone may cut blocks further).

    8 rows of at least MIN_BLOCK samples when blocks are units of work that must be shared or
    survive a crash (a kernel written to disk, or computed by several ranks): a Gram matrix then
    skips almost half its blocks, and ranks get several each; it does not depend on the number
    of ranks, so any number gives the same bits. In memory on one rank, a Gram matrix in two
    halves of at least GRAM_HALVES_MIN samples (its mirrored block skipped), anything else in
    the largest blocks the budget allows.
    """
    if partitioned:
        return 8, MIN_BLOCK
    return (2, GRAM_HALVES_MIN) if symmetric else (1, 1)


def block_size(n1: int, n2: int, footprint: Footprint, budget: int, *, min_rows: int = 1, min_block: int = MIN_BLOCK) -> int:
    """The largest block size b whose blocks (min(b, N1) x min(b, N2) samples) fit ``budget``
    bytes, and cut evenly into ``min_rows`` block rows, or as many as keep ``min_block`` samples each.

    Raises:
        OptionError: not even one sample fits the budget.
    """
    check_fits(footprint, 1, 1, budget)
    n = max(n1, n2)
    low, high = 1, n  # the working set grows with b: the largest that fits, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        if footprint.working(min(middle, n1), min(middle, n2)) <= budget:
            low = middle
        else:
            high = middle - 1
    rows = max(1, min(min_rows, n // max(1, min_block)))
    return max(1, min(low, -(-n // rows)))


@dataclass(frozen=True)
class Sizing:
    """How one kernel's blocks are sized: its problem's bytes and the budget left for blocks."""

    n1: int
    n2: int
    symmetric: bool
    input_bytes: int
    pair_bytes: int
    budget: int
    """Bytes for blocks: ``max_memory``, less the result when it is held in memory."""
    min_rows: int = 1
    min_block: int = 1
    reserved: int = 0
    """Bytes of ``max_memory`` taken before blocks (the result held in memory), for messages."""

    def footprint(self, method: "SizedMethod") -> Footprint:
        owner = f"method {method.name!r} (O={method.num_outputs}, P={method.f.num_params:,})"
        return Footprint(method.bytes_per_sample(), method.sides_with_factors, self.input_bytes, self.pair_bytes, owner)

    def block(self, method: "SizedMethod") -> int:
        """The block size for ``method`` (OptionError when one sample does not fit)."""
        self.check(method, 1)
        return block_size(self.n1, self.n2, self.footprint(method), self.budget, min_rows=self.min_rows, min_block=self.min_block)

    def check(self, method: "SizedMethod", block: int) -> None:
        """Raise OptionError, naming what is needed, if ``method``'s blocks of ``block`` samples
        do not fit the budget."""
        check_fits(self.footprint(method), min(block, self.n1), min(block, self.n2), self.budget, self.reserved, block)

    def over(self, method: "SizedMethod") -> str | None:
        """Why ``method`` cannot keep within the budget (None: it can)."""
        try:
            self.check(method, 1)
        except OptionError as exc:
            return str(exc)
        return None

    def working(self, method: "SizedMethod", block: int) -> int:
        """Bytes ``method``'s blocks of ``block`` samples need."""
        return self.footprint(method).working(min(block, self.n1), min(block, self.n2))

    def cache_capacity(self, method: "SizedMethod", block: int) -> int:
        """Bytes left beside blocks of ``block`` samples to cache factors for reuse."""
        return max(0, self.budget - self.working(method, block))


class SizedMethod(Protocol):
    """What sizing reads of a method (:class:`~fastntk.methods.base.KernelMethod`)."""

    name: str
    num_outputs: int
    sides_with_factors: int
    f: Any

    def bytes_per_sample(self) -> int: ...


def check_fits(footprint: Footprint, rows: int, cols: int, budget: int, reserved: int = 0, block: int | None = None) -> None:
    """Raise OptionError, naming what is needed, if a block of rows x cols samples exceeds
    ``budget`` (what ``max_memory`` leaves once ``reserved`` bytes are taken; ``block``: the
    block size asked for, for the message)."""
    need = footprint.working(rows, cols)
    if need <= budget:
        return
    total, limit = need + reserved, format_bytes(budget + reserved)
    held = f" beside the {format_bytes(reserved)} result" if reserved else ""
    if rows == cols == 1:
        raise OptionError(
            f"max_memory={limit} is too small: {footprint.owner} needs {format_bytes(need)} for one sample of each side "
            f"(factors {format_bytes(footprint.factor_sides * footprint.factor_bytes)}){held}; pass max_memory={total} "
            "or more, differentiate fewer parameters (params=), or choose a method that needs less (fastntk.plan lists MiB/sample)"
        )
    raise OptionError(
        f"blocks of {block or max(rows, cols)} samples need {format_bytes(need)}{held}, more than max_memory={limit}: "
        "raise max_memory, or pass a smaller block_size"
    )


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
