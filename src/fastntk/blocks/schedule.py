"""Which blocks each rank computes, in which order, and which factors it keeps.

Blocks are listed row by row (:func:`all_blocks`: for a Gram matrix only j >= i). The
blocks still to compute are cut into one contiguous run per rank with equal total cost
(cost = sample pairs of the block), so a rank meets few block rows and reuses their
factors. The cut depends only on (N1, N2, block size, world size, finished blocks):
every rank derives the same schedule.

Within a rank, blocks are taken in bands of block rows, column by column (:func:`in_bands`),
and per-sample factors are kept in a :class:`FactorCache` of a fixed size in bytes; when it
is full, the entry whose next use is farthest away goes first (Belady's rule, exact here
since the rank's schedule is known in advance).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable


def ranges(n: int, size: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of at most ``size`` covering 0..n (the last may be ragged)."""
    return [(start, min(start + size, n)) for start in range(0, n, size)]


@dataclass(frozen=True)
class Block:
    """Block (i, j): kernel rows rows[0]:rows[1], columns cols[0]:cols[1]."""

    i: int
    j: int
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def cost(self) -> int:
        """Sample pairs contracted (a diagonal Gram block is computed whole)."""
        return (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0])


def all_blocks(n1: int, n2: int, size: int, symmetric: bool) -> list[Block]:
    """Every block to compute, row by row; for a Gram matrix only those on or above the diagonal."""
    rows, cols = ranges(n1, size), ranges(n2, size)
    return [Block(i, j, r, c) for i, r in enumerate(rows) for j, c in enumerate(cols) if not symmetric or j >= i]


def split(blocks: list[Block], world: int) -> list[list[Block]]:
    """One contiguous run of ``blocks`` per rank, of about equal cost (within one block's cost)."""
    total = sum(b.cost for b in blocks)
    parts: list[list[Block]] = [[] for _ in range(world)]
    before = 0
    for b in blocks:
        middle = before + b.cost / 2  # a block goes to the rank whose share holds its middle
        parts[min(world - 1, int(middle * world / total)) if total else 0].append(b)
        before += b.cost
    return parts


def in_bands(blocks: list[Block], rows: int) -> list[Block]:
    """A rank's blocks in bands of ``rows`` block rows, each band column by column.

    A band's row factors stay cached while every column's factors are computed once for
    the whole band: a Gram matrix of R block rows then computes about R + R²/(2·rows)
    blocks' factors instead of R²/2 (row by row without a cache).
    """
    if not blocks:
        return []
    first = min(b.i for b in blocks)
    return sorted(blocks, key=lambda b: ((b.i - first) // rows, b.j, b.i))


class FactorCache:
    """Factors kept for reuse within ``capacity`` bytes; evicts the farthest next use first.

    Args:
        capacity: bytes the cached factors may take.
        uses: the keys in the order the schedule will ask for them.
    """

    def __init__(self, capacity: int, uses: Iterable[Hashable]) -> None:
        self.capacity, self.used = capacity, 0
        self.positions: dict[Hashable, list[int]] = {}
        for t, key in enumerate(uses):
            self.positions.setdefault(key, []).append(t)
        self.entries: dict[Hashable, tuple[Any, int]] = {}
        self.computed = 0
        """How many times factors were computed (for logging and tests)."""

    def next_use(self, key: Hashable, t: int) -> float:
        """The first position after t at which ``key`` is used (inf: never)."""
        where = self.positions.get(key, [])
        k = bisect.bisect_right(where, t)
        return where[k] if k < len(where) else float("inf")

    def get(self, key: Hashable, t: int, size: int, compute: Callable[[], Any]) -> Any:
        """The factors of ``key`` for use number t: cached, or computed (and kept if worth it)."""
        if key in self.entries:
            value = self.entries[key][0]
        else:
            value = compute()
            self.computed += 1
        self.offer(key, value, size, t)
        return value

    def offer(self, key: Hashable, value: Any, size: int, t: int) -> None:
        """Keep ``value`` if it is used again and room can be made for it by Belady's rule."""
        upcoming = self.next_use(key, t)
        if key in self.entries:
            if upcoming == float("inf"):
                self.drop(key)
            return
        if upcoming == float("inf") or size > self.capacity:
            return
        while self.used + size > self.capacity:
            victim = max(self.entries, key=lambda k: self.next_use(k, t))
            if self.next_use(victim, t) <= upcoming:
                return  # everything cached is needed sooner than this
            self.drop(victim)
        self.entries[key] = (value, size)
        self.used += size

    def drop(self, key: Hashable) -> None:
        _, size = self.entries.pop(key)
        self.used -= size
