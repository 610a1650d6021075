"""The structured method on layer variants and on models only partly covered by rules."""

from __future__ import annotations

import pytest
import torch

import fastntk
from cases import CASES_BY_NAME, STRUCTURED_CASES
from conftest import DTYPES, assert_kernel_close, reduce_full, reference_full
from fastntk._functional import FunctionalModel
from fastntk.methods import StructuredMethod
from fastntk.methods.structured.rules import conv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gram", [False, True], ids=["x1-x2", "gram"])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("case", [c.name for c in STRUCTURED_CASES])
def test_structured_matches_reference(case: str, mode: str, gram: bool, dtype: torch.dtype) -> None:
    c = CASES_BY_NAME[case]
    model = c.build(dtype)
    x1 = c.draw(4, dtype, seed=1)
    x2 = None if gram else c.draw(3, dtype, seed=2)
    kernel = fastntk.ntk(model, x1, x2, mode=mode, method="structured")
    assert_kernel_close(kernel, reduce_full(reference_full(case, dtype, gram), mode), dtype)


CONV_CASES = ["tutorial_cnn", "conv1d", "conv2d_options", "conv2d_groups", "depthwise_separable", "conv1d_dilated", "conv3d", "groupnorm"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["full", "trace"])
@pytest.mark.parametrize("path", ["grouped", "patches"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_both_conv_weight_jacobians(case: str, path: str, mode: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every convolution through the grouped weight backward, or (1d/2d) through patches."""
    monkeypatch.setattr(conv, "SMALL_PATCH", 0 if path == "grouped" else 10**9)
    c = CASES_BY_NAME[case]
    kernel = fastntk.ntk(c.build(dtype), c.draw(4, dtype, seed=1), c.draw(3, dtype, seed=2), mode=mode, method="structured")
    assert_kernel_close(kernel, reduce_full(reference_full(case, dtype, False), mode), dtype)


def calibrated(case: str) -> StructuredMethod:
    c = CASES_BY_NAME[case]
    method = StructuredMethod(FunctionalModel.build(c.build(torch.float64)), "full", 2)
    method.calibrate(c.draw(3, torch.float64))
    return method


@pytest.mark.parametrize(
    ("case", "fallback"),
    [
        ("mlp", []),
        ("tutorial_cnn", []),
        ("batchnorm_eval", []),
        ("groupnorm", []),
        ("token_dict", []),
        ("tied", ["embed.weight"]),  # an Embedding and a Linear share it: no single rule
        ("shuffled_batch", ["inner.bias", "inner.weight"]),  # caught by the gradient check
        ("direct_weight_use", ["fc.bias", "fc.weight"]),  # weight used outside its Linear, bias folded with it
        ("shared_linear_and_scale", ["scale"]),  # fc used twice stays structured
    ],
)
def test_fallback_is_exactly_what_no_rule_covers(case: str, fallback: list[str]) -> None:
    assert calibrated(case).fallback == fallback


def test_sequence_linear_uses_both_forms() -> None:
    """Few positions keep the position-pair form; many form per-sample Jacobians."""
    from fastntk.methods.structured.factors import JacobianFactor, PairFactor

    for case, kind in (("sequence_short", PairFactor), ("sequence_long", JacobianFactor)):
        c = CASES_BY_NAME[case]
        method = StructuredMethod(FunctionalModel.build(c.build(torch.float64)), "full", 2)
        factors = method.left(c.draw(2, torch.float64))
        assert isinstance(factors[("fc.weight", "fc.bias")], kind)
