"""fastntk.gram against fastntk.ntk: ragged blocks, Gram or not, every mode and method, every kind of input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import fastntk
from conftest import assert_kernel_close
from fastntk.blocks.budget import Footprint
from gram_helpers import TwoInputs, inputs, mlp, save

MODES = ["full", "trace", "diagonal", "trace_mean"]
METHODS = ["jacobian", "vp", "structured", "auto"]


# trace_mean is trace / O whatever the method: two methods suffice for it
MODE_METHODS = [(mode, method) for mode in MODES for method in METHODS if mode != "trace_mean" or method in ("auto", "vp")]


@pytest.mark.parametrize("symmetric", [True, False], ids=["gram", "x1-x2"])
@pytest.mark.parametrize(("mode", "method"), MODE_METHODS)
def test_blocks_equal_in_memory_kernel(mode: str, method: str, symmetric: bool) -> None:
    model = mlp(dtype=torch.float64)
    x1, x2 = inputs(13, 1, dtype=torch.float64), None if symmetric else inputs(9, 2, dtype=torch.float64)
    expected = fastntk.ntk(model, x1, x2, mode=mode, method="structured")
    kernel = fastntk.gram(model, x1, x2, mode=mode, method=method, block_size=5, progress=False)  # rows 5, 5, 3; columns 5, 4
    assert kernel.dtype == torch.float64
    assert_kernel_close(kernel, expected, torch.float64)
    if symmetric:  # blocks below the diagonal are exact mirrors (diagonal blocks are computed whole)
        mirrored = fastntk.reduction.transpose_block(kernel, "trace" if mode == "trace_mean" else mode)
        other_block = (torch.arange(13)[:, None] // 5) != (torch.arange(13)[None, :] // 5)
        assert torch.equal(kernel[other_block], mirrored[other_block])


@pytest.mark.parametrize("symmetric", [True, False], ids=["gram", "x1-x2"])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_disk_equals_memory_bit_for_bit(tmp_path, mode: str, symmetric: bool) -> None:
    model = mlp()
    x1, x2 = inputs(23, 1), None if symmetric else inputs(17, 2)
    memory = fastntk.gram(model, x1, x2, mode=mode, block_size=4, progress=False)
    disk = fastntk.gram(model, x1, x2, mode=mode, block_size=4, out=tmp_path / "k.npy", progress=False)
    assert isinstance(disk, np.memmap) and not disk.flags.writeable
    assert np.array_equal(np.load(tmp_path / "k.npy"), memory.numpy())
    assert_kernel_close(memory, fastntk.ntk(model, x1, x2, mode=mode), torch.float32)


def test_gram_computes_only_blocks_on_and_above_the_diagonal() -> None:
    seen = []
    fastntk.gram(mlp(), inputs(23, 1), block_size=5, progress=False, on_block=seen.append, mode="trace")
    assert sorted((b.i, b.j) for b in seen) == [(i, j) for i in range(5) for j in range(i, 5)]
    assert max(b.rows for b in seen) == (20, 23)  # ragged last block, no divisibility rule


def test_factors_computed_once_per_block_when_the_budget_holds_them(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="fastntk"):
        fastntk.gram(mlp(), inputs(23, 1), block_size=5, method="structured", progress=False, mode="trace")
    assert "factors of 5 blocks computed" in caplog.text  # 15 blocks, 5 blocks of samples
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastntk"):
        fastntk.gram(mlp(), inputs(23, 1), inputs(17, 2), block_size=5, method="jacobian", progress=False, mode="trace")
    assert "factors of 9 blocks computed" in caplog.text  # 5 row blocks + 4 column blocks


def test_block_size_follows_the_budget() -> None:
    seen = []
    budget = 60_000  # bytes: the in-memory result (14.9 kB) and blocks of a few samples
    fastntk.gram(mlp(), inputs(61, 1), max_memory=budget, method="jacobian", progress=False, on_block=seen.append, mode="trace")
    size = seen[0].rows[1] - seen[0].rows[0]
    assert 1 < size < 30 and {b.rows[1] - b.rows[0] for b in seen} == {size, 61 % size}
    footprint = Footprint(2 * 3 * 131 * 4, 2, 5 * 4, 4)
    assert footprint.working(size, size) <= budget - 61 * 61 * 4 < footprint.working(size + 1, size + 1)


class Pairs(torch.utils.data.Dataset):
    """(inputs, label) items, as image datasets give."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i].numpy(), 0


@pytest.mark.parametrize("kind", ["numpy", "memmap", "npy-path", "dataset", "dataloader", "tensordataset"])
def test_every_kind_of_input(tmp_path, kind: str) -> None:
    model, x = mlp(), inputs(19, 1)
    path = save(tmp_path / "x.npy", x)
    data, select = {
        "numpy": (x.numpy(), None),
        "memmap": (np.load(path, mmap_mode="r"), None),
        "npy-path": (str(path), None),
        "dataset": (Pairs(x), 0),
        "dataloader": (torch.utils.data.DataLoader(Pairs(x), batch_size=7), 0),
        "tensordataset": (torch.utils.data.TensorDataset(x, torch.zeros(19)), lambda batch: batch[0]),
    }[kind]
    kernel = fastntk.gram(model, data, block_size=6, select=select, progress=False, mode="trace")
    assert torch.equal(kernel, fastntk.gram(model, x, block_size=6, progress=False, mode="trace"))


def test_tuple_and_dict_inputs() -> None:
    model = TwoInputs()
    x, y = inputs(13, 1), inputs(13, 2, dim=2)
    expected = fastntk.ntk(model, (x, y), mode="trace")
    assert_kernel_close(fastntk.gram(model, (x, y), block_size=4, progress=False, mode="trace"), expected, torch.float32)
    assert_kernel_close(fastntk.gram(model, (x.numpy(), y.numpy()), block_size=4, progress=False, mode="trace"), expected, torch.float32)
    assert_kernel_close(fastntk.gram(model, {"x": x, "y": y}, block_size=4, progress=False, mode="trace"), expected, torch.float32)


def test_floating_inputs_are_cast_per_block() -> None:
    x = inputs(11, 1, dtype=torch.float64)
    kernel = fastntk.gram(mlp(), x.numpy(), block_size=4, progress=False, mode="trace")
    assert kernel.dtype == torch.float32
    assert torch.equal(kernel, fastntk.gram(mlp(), x.float(), block_size=4, progress=False, mode="trace"))


