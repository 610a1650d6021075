"""Contracting per-sample Jacobians stored sample-major or output-major (as backward passes batched over outputs leave them)."""

from __future__ import annotations

import pytest
import torch

from conftest import RTOL64, assert_rel_close
from fastntk.methods.contraction import contract_jacobian_pair, is_output_major


def stored(j: torch.Tensor, layout: str) -> torch.Tensor:
    """j (N, O, p) with the same values, stored sample by sample or output by output."""
    return j.contiguous() if layout == "sample" else j.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("layouts", [("sample", "sample"), ("sample", "output"), ("output", "sample"), ("output", "output")])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_every_layout_gives_the_same_contraction(mode: str, layouts: tuple[str, str]) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 7, generator=gen, dtype=torch.float64), torch.randn(4, 3, 7, generator=gen, dtype=torch.float64)
    expected = {
        "full": torch.einsum("nap,mbp->nmab", a, b),
        "trace": torch.einsum("nap,map->nm", a, b),
        "diagonal": torch.einsum("nap,map->nma", a, b),
    }[mode]
    left, right = stored(a, layouts[0]), stored(b, layouts[1])
    assert is_output_major(left) == (layouts[0] == "output")
    assert_rel_close(contract_jacobian_pair(left, right, mode), expected, RTOL64)
