"""Input digests: the same values hash alike however they are given and read; other values do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastntk import sources as data
from gram_helpers import inputs, save


def pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two leaves of different sizes per sample: chunks cut them at different places."""
    return inputs(n, 1), torch.arange(3 * n, dtype=torch.int64).reshape(n, 3)


@pytest.mark.parametrize("chunk", [1, 40, 7 * 64, 2**20])
def test_digest_does_not_depend_on_the_chunk_size(chunk: int) -> None:
    source = data.as_source(pairs(23), "data1")
    assert source.digest(chunk) == source.digest(64 * 2**20)


def test_digest_does_not_depend_on_the_container(tmp_path) -> None:
    x = inputs(23, 1)
    path = save(tmp_path / "x.npy", x)
    given = [(x, None), (x.numpy(), None), (np.load(path, mmap_mode="r"), None), (str(path), None), (x.double(), None),
             (torch.utils.data.TensorDataset(x), 0)]
    digests = {data.as_source(source, "data1", select).digest(chunk, torch.float32) for source, select in given for chunk in (100, 300)}
    assert len(digests) == 1  # float64 values that are the float32 ones: what the model receives is the same


@pytest.mark.parametrize("change", [
    lambda x, y: (x.clone().index_put_((torch.tensor(22), torch.tensor(4)), torch.tensor(9.0)), y),  # one value of the last sample
    lambda x, y: (x[:-1], y[:-1]),  # a sample fewer
    lambda x, y: (y, x),  # the leaves swapped
    lambda x, y: (x, y.int()),  # another dtype
    lambda x, y: (x.reshape(23, 5, 1), y),  # another shape per sample
])
def test_digest_sees_other_inputs(change) -> None:
    x, y = pairs(23)
    assert data.as_source(change(x, y), "data1").digest(100) != data.as_source((x, y), "data1").digest(100)
