"""Blocked evaluation of a kernel: per-sample factors per block, reused across blocks."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from ._errors import OptionError
from ._inputs import Batch, batch_size, first_samples, take
from ._modes import block_shape, transpose_block
from .methods.base import KernelMethod

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
"""Bytes the per-sample factors of live blocks may take when no block size is given."""


def ranges(n: int, size: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of at most ``size`` covering 0..n (the last may be ragged)."""
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def block_size_for(method: KernelMethod, budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Samples per block so that a left and a right block of factors fit ``budget`` bytes."""
    return max(1, budget // (2 * max(1, method.bytes_per_sample())))


def over_budget(method: KernelMethod, budget: int) -> str | None:
    """Why ``method`` cannot keep within ``budget`` bytes (None: it can). Blocks shrink to one
    sample, no further: the factors of one sample of each side that holds them must fit."""
    need = method.sides_with_factors * method.bytes_per_sample()
    if need <= budget:
        return None
    return (
        f"method {method.name!r} keeps {need / 2**20:,.1f} MiB of factors for one sample of each side "
        f"(O={method.num_outputs} outputs, P={method.f.num_params:,} parameters), more than memory_budget="
        f"{budget / 2**20:,.1f} MiB; pass memory_budget={need} or more, differentiate fewer parameters (params=), "
        "choose a method that needs less (fastntk.plan lists MiB/sample), or give chunk_size (blocks set by hand, "
        "the budget then does not bound them)"
    )


MIN_SYMMETRIC_BLOCK = 64
"""A Gram matrix is split into at least four block rows down to blocks of this many samples."""


def default_block(method: KernelMethod, budget: int, n: int, symmetric: bool) -> int:
    """Samples per block: what the budget allows; for a Gram matrix also small enough that
    computing only the blocks on and above the diagonal saves work."""
    block = block_size_for(method, budget)
    if symmetric:
        block = min(block, max(MIN_SYMMETRIC_BLOCK, -(-n // 4)))
    return block


def calibrate_on_first_block(
    method: KernelMethod, x1: Batch, x2: Batch | None, block: int | None, budget: int, keep: bool = True
) -> int:
    """Calibrate ``method`` on the block of x1 the engine computes first, and return the block size.

    The one entry point of calibration. The method may keep that block's factors (the
    structured method does, unless ``keep`` is False), so calibrating costs little beyond
    them. Without a given ``block``, blocks are sized from the method's bytes per sample
    before calibrating (for the structured method an estimate from one forward pass), and
    again after it: should calibration find more (a group sent to the Jacobian fallback),
    the smaller block wins and the kept factors are dropped. A first block of one sample is
    too few to calibrate on (the structured check compares samples): then the first two
    samples are used, x2 topping up.
    """
    n1, symmetric = batch_size(x1), x2 is None
    given = block is not None
    if block is None:
        method.estimate_size(first_samples(x1, x2, 1))
        block = default_block(method, budget, n1, symmetric)
    first = min(block, n1)
    if first < 2:
        method.calibrate(first_samples(x1, x2, 2))
        return block
    method.calibrate(take(x1, 0, first), keep=keep, gram=keep and symmetric and first == n1)
    calibrated = block if given else default_block(method, budget, n1, symmetric)
    if calibrated < block:
        method.kept = None
    return min(calibrated, block)


def block_pairs(n1: int, n2: int, size: int, symmetric: bool) -> Iterator[tuple[int, int, tuple[int, int], tuple[int, int]]]:
    """(i, j, rows, cols) for every block to compute; only j >= i when symmetric."""
    rows, cols = ranges(n1, size), ranges(n2, size)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            if not symmetric or j >= i:
                yield i, j, r, c


def compute_kernel(
    method: KernelMethod,
    x1: Batch,
    x2: Batch | None,
    *,
    block: int | None = None,
    budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> torch.Tensor:
    """K(x1, x2), or the Gram K(x1, x1) computing each unordered block pair once when x2 is None.

    Args:
        method: the exact method, bound to a model, a mode and O.
        x1, x2: batches of N1 and N2 samples (x2=None: the Gram matrix of x1).
        block: samples per block; None derives it from ``budget``.
        budget: bytes the live factors may take; the factors of every x2 block are
            cached when they fit beside one x1 block, else recomputed per block row.
            Without ``block``, a method whose factors of one sample per side exceed it is
            refused (OptionError) before any block is computed.
        progress: show a progress bar over blocks (after two seconds).

    Returns:
        The kernel, shaped (N1, N2, O, O), (N1, N2) or (N1, N2, O) per the method's mode.
    """
    symmetric = x2 is None
    other = x1 if symmetric else x2
    n1, n2 = batch_size(x1), batch_size(other)
    f = method.f
    given = block is not None
    if method.calibration is None:  # the structured method learns its factor sizes on one or two samples
        block = calibrate_on_first_block(method, x1, x2, block, budget)
    reason = None if given else over_budget(method, budget)
    if reason is not None:
        method.kept = None
        raise OptionError(reason)
    out = torch.empty(block_shape(method.mode, n1, n2, method.num_outputs), device=f.device, dtype=f.dtype)
    block = block or default_block(method, budget, n1, symmetric)
    pairs = list(block_pairs(n1, n2, block, symmetric))
    shared = symmetric and method.symmetric_factors  # a block's left factors serve as its right ones
    keep = (block + n2) * method.bytes_per_sample() <= budget
    cache: dict[int, Any] = {}

    def right_factors(j: int, cols: tuple[int, int]) -> Any:
        if j not in cache:
            factors = method.right(take(other, *cols))
            if not keep:
                return factors
            cache[j] = factors
        return cache[j]

    if symmetric and len(pairs) == 1:  # one block: the method may contract factors as they come
        out.copy_(method.gram(x1))
        return out
    left: tuple[int, Any] | None = None
    if not symmetric and len(pairs) == 1:  # one block pair: the method may compute both sides at once
        left_factors, cache[0] = method.left_and_right(x1, other)
        left = (0, left_factors)
    # a bar only when asked for (tqdm's first bar starts a monitor thread: milliseconds)
    shown = progress and len(pairs) > 1
    with (tqdm(total=len(pairs), desc="kernel blocks", unit="block", delay=2.0) if shown else contextlib.nullcontext()) as bar:
        for i, j, rows, cols in pairs:
            if left is None or left[0] != i:
                left = (i, right_factors(i, rows) if shared else method.left(take(x1, *rows)))
            right = left[1] if shared and i == j else right_factors(j, cols)
            value = method.contracted(left[1], right)
            out[rows[0]:rows[1], cols[0]:cols[1]] = value
            if symmetric and i != j:
                out[cols[0]:cols[1], rows[0]:rows[1]] = transpose_block(value, method.mode)
            if bar is not None:
                bar.update()
    return out
