"""fastntk.self_ntk: K(x_i, x_i) for each sample, the diagonal of the Gram matrix over samples."""

from __future__ import annotations

import pytest
import torch

import fastntk
from conftest import CASES_BY_NAME, DTYPES, assert_kernel_close


def gram_diagonal(k: torch.Tensor) -> torch.Tensor:
    """K[i, i] of a Gram matrix (N, N, ...)."""
    return torch.stack([k[i, i] for i in range(k.shape[0])])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [None, 1, 2])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal", "trace_mean"])
@pytest.mark.parametrize("case", ["mlp", "tutorial_cnn", "token_dict", "tuple_output"])
def test_equals_the_diagonal_of_the_gram_matrix(case: str, mode: str, block_size: int | None, dtype: torch.dtype) -> None:
    c = CASES_BY_NAME[case]
    model, x = c.build(dtype), c.draw(5, dtype)
    expected = gram_diagonal(fastntk.reference_ntk(model, x, mode=mode))
    assert_kernel_close(fastntk.self_ntk(model, x, mode=mode, block_size=block_size), expected, dtype)


def test_takes_what_ntk_takes() -> None:
    c = CASES_BY_NAME["mlp"]
    model, x = c.build(), c.draw(4)
    numpy = fastntk.self_ntk(model, x.double().numpy(), mode="trace")
    assert torch.equal(numpy, fastntk.self_ntk(model, x, mode="trace"))
    some = fastntk.self_ntk(model, x, mode="trace", params=lambda name, p: name.endswith("bias"))
    assert_kernel_close(some, gram_diagonal(fastntk.reference_ntk(model, x, mode="trace", params=lambda name, p: name.endswith("bias"))), torch.float32)


def test_a_budget_below_one_sample_is_refused() -> None:
    c = CASES_BY_NAME["mlp"]
    with pytest.raises(fastntk.OptionError, match=r"max_memory=.* is too small: one sample's Jacobian .*pass max_memory=\d+ or more"):
        fastntk.self_ntk(c.build(), c.draw(4), max_memory=1000)
