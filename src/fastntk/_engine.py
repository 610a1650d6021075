"""Blocked evaluation of a kernel: per-sample factors per block, reused across blocks."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

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
        progress: show a progress bar over blocks (after two seconds).

    Returns:
        The kernel, shaped (N1, N2, O, O), (N1, N2) or (N1, N2, O) per the method's mode.
    """
    symmetric = x2 is None
    other = x1 if symmetric else x2
    n1, n2 = batch_size(x1), batch_size(other)
    f = method.f
    out = torch.empty(block_shape(method.mode, n1, n2, method.num_outputs), device=f.device, dtype=f.dtype)
    method.calibrate(first_samples(x1, x2, 2))
    block = block or block_size_for(method, budget)
    pairs = list(block_pairs(n1, n2, block, symmetric))
    right_cache: dict[int, Any] = {}
    keep_right = (block + n2) * method.bytes_per_sample() <= budget
    left_factors: tuple[int, Any] | None = None
    with tqdm(total=len(pairs), desc="kernel blocks", unit="block", disable=not progress or len(pairs) < 2, delay=2.0) as bar:
        for i, j, (r0, r1), (c0, c1) in pairs:
            if left_factors is None or left_factors[0] != i:
                left_factors = (i, method.left(take(x1, r0, r1)))
                if symmetric and method.symmetric_factors and keep_right:
                    right_cache[i] = left_factors[1]
            if symmetric and method.symmetric_factors and i == j:
                right = left_factors[1]
            elif j in right_cache:
                right = right_cache[j]
            else:
                right = method.right(take(other, c0, c1))
                if keep_right:
                    right_cache[j] = right
            value = method.contract(left_factors[1], right)
            out[r0:r1, c0:c1] = value
            if symmetric and i != j:
                out[c0:c1, r0:r1] = transpose_block(value, method.mode)
            bar.update()
    return out
