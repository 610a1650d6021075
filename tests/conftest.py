"""Shared fixtures: seeded cases, cached float64 references, dtype-derived tolerances."""

from __future__ import annotations

import functools
import os
from typing import Callable, Hashable

import pytest
import torch
from hypothesis import settings

import fastntk
from cases import CASES_BY_NAME
from fastntk._inputs import Batch

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = [torch.float32, torch.float64]


RTOL64 = 1e-10
"""float64 results of different but exact algorithms agree to this, relative to max|K|
(rounding grows with the size of the contractions; 1e-10 leaves room for millions of terms)."""


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """max|actual − expected| <= rtol · max|expected| (and equal shapes)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item()
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= rtol * scale, f"max error {error:.3g} vs max|K| {scale:.3g}"


def rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of a kernel against the float64 reference: 500 ulps of ``dtype``."""
    return 500 * torch.finfo(dtype).eps


def assert_kernel_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """max|K − K_ref| <= rtol(dtype) · max|K_ref| (and equal shapes)."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= rtol(dtype) * max(scale, torch.finfo(dtype).tiny), f"max error {error:.3g} vs max|K| {scale:.3g}"


@functools.lru_cache(maxsize=None)
def reference_full(case: str, dtype: torch.dtype, gram: bool, n1: int = 4, n2: int = 3) -> torch.Tensor:
    """The float64 full reference kernel of a case's model (weights in ``dtype``)."""
    c = CASES_BY_NAME[case]
    model = c.build(dtype)
    x1 = c.draw(n1, dtype, seed=1)
    x2 = None if gram else c.draw(n2, dtype, seed=2)
    return fastntk.reference_ntk(model, x1, x2, mode="full")


def reduce_full(full: torch.Tensor, mode: str) -> torch.Tensor:
    """The trace/diagonal reductions of a full kernel."""
    if mode == "full":
        return full
    diagonal = torch.diagonal(full, dim1=2, dim2=3)
    return diagonal if mode == "diagonal" else diagonal.sum(-1)


METHODS = ["jacobian", "vp", "structured", "auto"]
MODES = ["full", "trace", "diagonal"]
METHOD_MODES = [(method, mode) for method in METHODS for mode in MODES]
"""Every method in every mode, for one parametrize."""

_REFERENCES: dict[Hashable, torch.Tensor] = {}


def assert_matches_reference(key: Hashable, build: Callable[[], torch.nn.Module], x1: Batch, x2: Batch | None, method: str, mode: str) -> None:
    """fastntk.ntk of a float64 model against fastntk.reference_ntk (the full reference computed
    once per ``key``, reduced per ``mode``)."""
    if key not in _REFERENCES:
        _REFERENCES[key] = fastntk.reference_ntk(build(), x1, x2)
    kernel = fastntk.ntk(build(), x1, x2, mode=mode, method=method)
    assert kernel.dtype == torch.float64
    assert_kernel_close(kernel, reduce_full(_REFERENCES[key], mode), torch.float64)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def captured_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes of the structured method's forward captures, in order."""
    from fastntk.methods.structured import method as structured

    sizes: list[int] = []
    original = structured.capture

    def counting(f, x, *args, **kwargs):  # noqa: ANN001, ANN202
        sizes.append(x.shape[0])
        return original(f, x, *args, **kwargs)

    monkeypatch.setattr(structured, "capture", counting)
    return sizes
