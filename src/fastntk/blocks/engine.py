"""The block engine: every kernel (``ntk``, ``ntk_fn``, ``gram``; in memory or on disk; one rank
or many) is computed here, block by block.

A kernel K(x1, x2) is cut into blocks of ``block`` x ``block`` samples (:mod:`.schedule`; a Gram
matrix K(x1, x1) computes only the blocks on and above its diagonal and mirrors them). For each
block the method computes per-sample factors of its rows and of its columns, then contracts them
(:class:`~fastntk.methods.base.KernelMethod`); factors are reused by every block they meet as far
as the memory budget keeps them (:class:`~.schedule.FactorCache`). A kernel K(x1, x2) of one
block pair takes one call of ``method.left_and_right`` instead (a method may compute both sides
in one pass). The result's reduction (a mean over outputs), its NaN/inf
check and the placing of mirrored blocks happen here, once for every entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from .._errors import NonFiniteError
from .._inputs import Batch, all_finite, batch_size, concat
from .._process import quiet_fallbacks
from ..reduction import Mode, mean_over_outputs, transpose_block
from ..methods.base import KernelMethod, Kept
from .schedule import Block, FactorCache, ranges

log = logging.getLogger("fastntk.blocks")

Load = Callable[[int, int, int], Batch]
"""``load(side, start, stop)``: samples start:stop of x1 (side 1) or x2 (side 2) as the model takes them."""


@dataclass(frozen=True)
class Kernel:
    """What the engine computes: K(x1, x2) of ``method``, or the Gram matrix when ``symmetric``."""

    method: KernelMethod
    load: Load
    n1: int
    n2: int
    symmetric: bool
    mean: bool = False
    """Divide by O: "trace_mean", neural-tangents' convention."""
    check: bool = True
    """Refuse a block holding NaN or inf (:class:`NonFiniteError`)."""

    def unchecked(self) -> "Kernel":
        """The same kernel without the check of each block (the caller checks the result)."""
        return dataclasses.replace(self, check=False)

    def rows(self, b: Block) -> Batch:
        return self.load(1, *b.rows)

    def cols(self, b: Block) -> Batch:
        return self.load(1 if self.symmetric else 2, *b.cols)


def calibrate_on_first_block(
    method: KernelMethod, load: Load, n1: int, n2: int | None, block: int | None, size_blocks: Callable[[KernelMethod], int], *, keep: bool
) -> tuple[KernelMethod, Kept | None, int]:
    """The one entry point of calibration: ``method`` calibrated on the first block of x1 that
    the engine computes, what it kept of that block (``keep``), and the block size.

    Without a given ``block``, blocks are sized (``size_blocks``) from the method's bytes per
    sample before calibrating (for the structured method an estimate from one forward pass),
    and again after it: should calibration find more (a group sent to the Jacobian fallback),
    the smaller block wins and what calibration kept of the larger block is dropped. A block of
    one sample is too few to calibrate on (the structured check compares samples): then the
    first two samples are used, x2 topping up.
    """
    given = block is not None
    if block is None:
        method = method.estimated(load(1, 0, 1))
        block = size_blocks(method)
    first = min(block, n1)
    if first < 2:
        return method.calibrated(two_samples(load, n1, n2))[0], None, block
    calibrated, kept = method.calibrated(load(1, 0, first), keep=keep)
    if given:
        return calibrated, kept, block
    resized = min(block, size_blocks(calibrated))
    return calibrated, kept if resized == block else None, resized


def two_samples(load: Load, n1: int, n2: int | None) -> Batch:
    """The first two samples: of x1, topped up from x2 when x1 has one."""
    x = load(1, 0, min(2, n1))
    if batch_size(x) < 2 and n2 is not None:
        x = concat([x, load(2, 0, 1)])
    return x


def progress_bar(enabled: bool, total: int, initial: int = 0, desc: str = "kernel blocks") -> tqdm:
    """A bar over blocks, shown after two seconds (a disabled bar starts no thread)."""
    return tqdm(total=total, initial=initial, desc=desc, unit="block", delay=2.0, disable=not enabled, dynamic_ncols=True)


def run(
    kernel: Kernel,
    mine: list[Block],
    block: int,
    capacity: int,
    sink: Callable[[Block, torch.Tensor], None],
    *,
    kept: Kept | None = None,
    bar: tqdm | None = None,
    on_block: Callable[[Block], None] | None = None,
) -> FactorCache:
    """Compute the blocks ``mine`` in order and hand each, reduced and checked, to ``sink``.

    Args:
        kernel: the method and the inputs.
        mine: the blocks to compute (all, or one rank's share; :mod:`.schedule`).
        block: samples per block.
        capacity: bytes of factors the cache may keep for reuse.
        sink: takes each block's value (for a Gram matrix, the block above the diagonal only).
        kept: what calibration computed on block row 0 (:func:`calibrate_on_first_block`).
        bar: updated after each block.
        on_block: called with each finished block after ``sink``.

    Returns:
        The factor cache (its ``computed`` counts the factor computations).

    Raises:
        NonFiniteError: a block holds NaN or inf (``kernel.check``), raised before its ``sink``.
    """
    method = kernel.method
    shared = kernel.symmetric and method.symmetric_factors  # a block's left factors serve as its right ones
    rows_of, cols_of = ranges(kernel.n1, block), ranges(kernel.n2, block)
    per_sample = method.bytes_per_sample()

    def finish(b: Block, value: torch.Tensor) -> None:
        if kernel.mean:
            value = mean_over_outputs(value, method.num_outputs)
        if kernel.check and not all_finite(value):
            raise_non_finite(b, value, kernel.symmetric)
        sink(b, value)
        if on_block is not None:
            on_block(b)
        if bar is not None:
            bar.update()

    started = time.perf_counter()
    cache = FactorCache(0, [])
    if not kernel.symmetric and len(mine) == 1 and mine[0].rows == (0, kernel.n1) and mine[0].cols == (0, kernel.n2):
        with kernel_context():
            finish(mine[0], one_pair(kernel, mine[0], kept))
        cache.computed = 2
        log_done(mine, cache, started)
        return cache

    def left_key(b: Block) -> tuple[str, int]:
        return ("right", b.i) if shared else ("left", b.i)

    def right_key(b: Block) -> tuple[str, int]:
        return ("right", b.j)

    # A block fetches its row (column) factors when they differ from those the previous block held.
    fetch_left = [k == 0 or left_key(b) != left_key(mine[k - 1]) for k, b in enumerate(mine)]
    fetch_right = []
    held = None
    for b in mine:
        diagonal = shared and b.i == b.j
        fetch_right.append(not diagonal and right_key(b) != held)
        held = held if diagonal else right_key(b)
    uses: list[tuple[str, int]] = []
    for k, b in enumerate(mine):
        uses += [left_key(b)] if fetch_left[k] else []
        uses += [right_key(b)] if fetch_right[k] else []
    cache = FactorCache(capacity, uses)
    first = ("right" if shared else "left", 0)
    unused = {first: kept.factors} if kept is not None else {}

    def factors(key: tuple[str, int]) -> Callable[[], Any]:
        side, index = key
        if key in unused:
            return lambda: unused.pop(key)
        if side == "left":
            return lambda: method.left(kernel.load(1, *rows_of[index]))
        return lambda: method.right(kernel.load(1 if kernel.symmetric else 2, *cols_of[index]))

    def size(key: tuple[str, int]) -> int:
        side, index = key
        span = (rows_of if side == "left" else cols_of)[index]
        return (span[1] - span[0]) * per_sample

    t = -1
    left: Any = None
    right: Any = None
    for k, b in enumerate(mine):
        with kernel_context():
            if fetch_left[k]:
                t += 1
                left = cache.get(left_key(b), t, size(left_key(b)), factors(left_key(b)))
            if fetch_right[k]:
                t += 1
                right = cache.get(right_key(b), t, size(right_key(b)), factors(right_key(b)))
            value = method.contracted(left, left if shared and b.i == b.j else right)
        unused.clear()  # calibration's factors serve the first block only
        finish(b, value)
    log_done(mine, cache, started)
    return cache


def log_done(mine: list[Block], cache: FactorCache, started: float) -> None:
    elapsed = time.perf_counter() - started
    pairs = sum(b.cost for b in mine)
    log.info(
        "%d blocks, %.3g sample pairs in %.1f s (%.3g pairs/s); factors of %d blocks computed",
        len(mine), pairs, elapsed, pairs / elapsed if elapsed else float("nan"), cache.computed,
    )


def one_pair(kernel: Kernel, b: Block, kept: Kept | None) -> torch.Tensor:
    """K(x1, x2) of one block pair: one call of ``left_and_right``, or calibration's factors of x1."""
    method = kernel.method
    if kept is not None:
        return method.contracted(kept.factors, method.right(kernel.cols(b)))
    return method.contracted(*method.left_and_right(kernel.rows(b), kernel.cols(b)))


@contextlib.contextmanager
def kernel_context() -> Iterator[None]:
    """What every block is computed in: no autograd graph kept, and torch.func's "performance
    drop" warnings for ops without a batching rule silenced in this thread (they repeat on every
    call and format source lines each time; the cost model and the methods already account for
    such ops; :func:`fastntk._process.quiet_fallbacks`). Nothing outlives the block."""
    with torch.no_grad(), quiet_fallbacks():
        yield


def raise_non_finite(b: Block, value: torch.Tensor, symmetric: bool) -> None:
    """Raise NonFiniteError naming the first pair of ``value`` (block ``b``) that is NaN or inf."""
    bad = (~torch.isfinite(value)).nonzero()[0]
    raise NonFiniteError(
        f"the kernel contains NaN or inf (first at pair x1[{b.rows[0] + int(bad[0])}], "
        f"{'x1' if symmetric else 'x2'}[{b.cols[0] + int(bad[1])}]) although inputs and parameters are "
        "finite: the model's derivatives overflow or are undefined there (e.g. sqrt or log at 0); "
        "try dtype=torch.float64, or fix the model"
    )


def place(result: torch.Tensor, b: Block, value: torch.Tensor, symmetric: bool, mode: Mode) -> None:
    """Put a block (and its mirror, for a Gram matrix) into an in-memory result."""
    result[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = value
    if symmetric and b.i != b.j:
        result[b.cols[0]:b.cols[1], b.rows[0]:b.rows[1]] = transpose_block(value, mode)
