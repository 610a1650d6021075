"""Every exact method, in every mode, against the float64 brute-force reference."""

from __future__ import annotations

import pytest
import torch

import fastntk
from cases import CASES, CASES_BY_NAME
from conftest import DTYPES, assert_kernel_close, reduce_full, reference_full

METHODS = ["jacobian", "vp", "structured", "auto"]
MODES = ["full", "trace", "diagonal"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gram", [False, True], ids=["x1-x2", "gram"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_matches_reference(case: str, method: str, mode: str, gram: bool, dtype: torch.dtype) -> None:
    c = CASES_BY_NAME[case]
    model = c.build(dtype)
    x1 = c.draw(4, dtype, seed=1)
    x2 = None if gram else c.draw(3, dtype, seed=2)
    kernel = fastntk.ntk(model, x1, x2, mode=mode, method=method)
    assert kernel.dtype == dtype
    assert_kernel_close(kernel, reduce_full(reference_full(case, dtype, gram), mode), dtype)


@pytest.mark.parametrize("method", METHODS)
def test_float64_on_float32_model(method: str) -> None:
    c = CASES_BY_NAME["tutorial_cnn"]
    model = c.build(torch.float32)
    x1, x2 = c.draw(4, torch.float32, seed=1), c.draw(3, torch.float32, seed=2)
    kernel = fastntk.ntk(model, x1, x2, method=method, dtype=torch.float64)
    assert kernel.dtype == torch.float64
    assert_kernel_close(kernel, reference_full("tutorial_cnn", torch.float32, False), torch.float64)


def test_tutorial_check_methods_agree() -> None:
    """The tutorial's own check: both methods agree to atol 1e-5 (float32, tutorial CNN)."""
    c = CASES_BY_NAME["tutorial_cnn"]
    model = c.build(torch.float32)
    x1, x2 = c.draw(5, seed=1), c.draw(4, seed=2)
    for mode in MODES:
        a = fastntk.ntk(model, x1, x2, mode=mode, method="jacobian")
        b = fastntk.ntk(model, x1, x2, mode=mode, method="vp")
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["shared_linear_and_scale", "direct_weight_use", "shuffled_batch", "embedding_padding"])
def test_partly_structured_models(case: str, method: str) -> None:
    """Models with 0-d parameters, shared layers and odd parameter uses, on every method."""
    c = CASES_BY_NAME[case]
    model = c.build(torch.float64)
    x1, x2 = c.draw(4, torch.float64, seed=1), c.draw(3, torch.float64, seed=2)
    for mode in MODES:
        kernel = fastntk.ntk(model, x1, x2, mode=mode, method=method)
        assert_kernel_close(kernel, reduce_full(reference_full(case, torch.float64, False), mode), torch.float64)
