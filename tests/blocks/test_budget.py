"""Sizes and block sizes: one memory model for every kernel."""

from __future__ import annotations

import numpy as np
import pytest

from fastntk import OptionError
from fastntk.blocks.budget import GRAM_HALVES_MIN, MIN_BLOCK, Footprint, block_cut, block_size, parse_memory


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
    n = max(n1, n2)
    cap = -(-n // max(1, min(rows, n // MIN_BLOCK)))  # rows of at least MIN_BLOCK samples, evenly
    assert block == cap or working(block + 1) > memory


def test_block_size_cuts_a_kernel_into_rows() -> None:
    footprint = Footprint(10, 2, 10, 4)
    def cut(n1: int, n2: int, symmetric: bool, partitioned: bool) -> int:
        rows, smallest = block_cut(symmetric, partitioned)
        return block_size(n1, n2, footprint, 10**9, min_rows=rows, min_block=smallest)

    assert cut(600, 600, True, partitioned=True) == 75  # 8 block rows
    assert cut(600, 500, False, partitioned=True) == 75
    assert cut(600, 600, True, partitioned=False) == 300  # a Gram matrix in memory: two halves
    assert cut(2 * GRAM_HALVES_MIN - 1, 2 * GRAM_HALVES_MIN - 1, True, partitioned=False) == 2 * GRAM_HALVES_MIN - 1  # halves too small
    assert cut(100, 100, True, partitioned=True) == 100  # not one row of 64 and one of 36
    assert cut(600, 500, False, partitioned=False) == 600  # K(x1, x2) in memory: one block
    assert block_size(600, 600, footprint, 10**9, min_rows=8, min_block=100) == 100  # not below 100 samples: 6 rows


def test_block_size_refuses_a_budget_below_one_sample() -> None:
    with pytest.raises(OptionError, match="too small.*max_memory=2000056 or more"):
        block_size(100, 100, Footprint(10**6, 2, 10, 4), 10**5)
