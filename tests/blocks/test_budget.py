"""Sizes and block sizes: one memory model for every kernel."""

from __future__ import annotations

import numpy as np
import pytest

from fastntk import OptionError
from fastntk.blocks.budget import MIN_BLOCK, Footprint, block_size, min_block_rows, parse_memory


@pytest.mark.parametrize("text, value", [
    ("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("1.5 GiB", 3 * 2**29), ("2e9", 2 * 10**9), (1234, 1234),
    ("10k", 10**4), ("3gi", 3 * 2**30), (np.int64(7), 7),
])
def test_parse_memory(text, value) -> None:
    assert parse_memory(text) == value


@pytest.mark.parametrize("bad", ["", "four GB", "-1GB", "4 XB", 0, -5, 1.5, True, None, "0.1"])
def test_parse_memory_refuses(bad) -> None:
    with pytest.raises(OptionError, match="max_memory"):
        parse_memory(bad)


@pytest.mark.parametrize("n1, n2, factor, inp, pair, memory", [
    (50_000, 50_000, 176_000, 3136, 4, 2 * 10**9),
    (1000, 30, 9_000_000, 12_288, 400, 4 * 10**9),
    (777, 777, 10, 10, 4, 10**5),
])
@pytest.mark.parametrize("sides", [1, 2])
@pytest.mark.parametrize("rows", [1, 4, 8])
def test_block_size_fits_and_is_the_largest(n1, n2, factor, inp, pair, memory, sides, rows) -> None:
    footprint = Footprint(factor, sides, inp, pair)
    block = block_size(n1, n2, footprint, memory, min_rows=rows)

    def working(b: int) -> int:  # a block holds min(b, N1) x min(b, N2) samples
        return footprint.working(min(b, n1), min(b, n2))

    assert working(block) <= memory
    cap = max(MIN_BLOCK, -(-max(n1, n2) // rows))
    assert block == min(cap, max(n1, n2)) or working(block + 1) > memory


def test_block_size_cuts_a_kernel_into_rows() -> None:
    footprint = Footprint(10, 2, 10, 4)
    assert block_size(600, 600, footprint, 10**9, min_rows=min_block_rows(partitioned=True)) == 75  # 8 block rows
    assert block_size(600, 500, footprint, 10**9, min_rows=min_block_rows(partitioned=False)) == 600  # one block
    assert block_size(100, 100, footprint, 10**9, min_rows=8) == 64  # not below 64 samples


def test_block_size_refuses_a_budget_below_one_sample() -> None:
    with pytest.raises(OptionError, match="too small.*max_memory=2000056 or more"):
        block_size(100, 100, Footprint(10**6, 2, 10, 4), 10**5)
