"""fast_matmuls: the library's own float32 CPU products through oneDNN, the same numbers,
everything else untouched."""

from __future__ import annotations

import pytest
import torch

from fastntk import _gemm
from fastntk._gemm import fast_matmuls, mm, onednn_available

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN linear op")


def float32_tolerance(k: int) -> float:
    """Relative error bound of a float32 dot product of length k (rounding grows like k·eps)."""
    return k * torch.finfo(torch.float32).eps


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Shapes of the products that went to oneDNN."""
    calls: list[tuple[int, ...]] = []
    original = _gemm._linear

    def spy(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append((*a.shape, b_t.shape[0]))
        return original(a, b_t, bias)

    monkeypatch.setattr(_gemm, "_linear", spy)
    return calls


def operands(*shapes: tuple[int, ...], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


STRIDED = {
    "contiguous": lambda t: t,
    "expanded": lambda t: t[:1].expand_as(t),  # stride 0, as autograd's broadcast gradients are
    "every other row": lambda t: torch.cat([t, t]).reshape(2 * t.shape[0], -1)[::2],
    "every other column": lambda t: torch.cat([t, t], dim=1)[:, ::2],
    "transposed": lambda t: t.T.contiguous().T,
}


@needs_onednn
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("layout", list(STRIDED))
def test_mm_is_routed_inside_the_block_and_equal(routed: list, layout: str, side: str) -> None:
    a, b = operands((37, 300), (300, 23))
    if side == "left":
        a = STRIDED[layout](a)
    else:
        b = STRIDED[layout](b)
    expected = a.double() @ b.double()
    outside = mm(a, b)
    assert routed == []
    with fast_matmuls():
        product = mm(a, b)
        plain = a @ b  # a model's own products are PyTorch's
    assert routed == [(37, 300, 23)]
    for value in (product, outside, plain):
        assert value.shape == (37, 23) and value.dtype == torch.float32
        assert (value.double() - expected).abs().max() <= float32_tolerance(300) * expected.abs().max()


@needs_onednn
def test_products_to_differentiate_stay_with_pytorch(routed: list) -> None:
    """oneDNN's op has no autograd formula (its gradients would silently be missing)."""
    a, b = operands((37, 300), (300, 23))
    a.requires_grad_()
    with fast_matmuls():
        mm(a, b).sum().backward()
        with torch.no_grad():
            mm(a, b)
    assert routed == [(37, 300, 23)]  # only the product under no_grad
    torch.testing.assert_close(a.grad, b.sum(1).expand(37, 300))


def test_other_products_are_left_alone(routed: list) -> None:
    a64, b64 = operands((6, 4), (4, 3), dtype=torch.float64)
    a, b = operands((6, 4), (4, 3))
    with fast_matmuls():
        double = mm(a64, b64)
        batched = mm(a[None], b)
    assert routed == []
    torch.testing.assert_close(double, a64 @ b64)
    torch.testing.assert_close(batched, (a @ b)[None])


def test_disabled_block_routes_nothing(routed: list) -> None:
    a, b = operands((5, 7), (7, 2))
    with fast_matmuls(enabled=False):
        mm(a, b)
    assert routed == []


@needs_onednn
def test_nested_blocks_route_once_and_restore(routed: list) -> None:
    a, b = operands((5, 7), (7, 2))
    with fast_matmuls():
        with fast_matmuls():
            mm(a, b)
        mm(a, b)
    mm(a, b)
    assert len(routed) == 2


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch, routed: list) -> None:
    monkeypatch.setenv("FASTNTK_ONEDNN", "0")
    assert not onednn_available()
    a, b = operands((5, 7), (7, 2))
    with fast_matmuls():
        product = mm(a, b)
    assert routed == []
    torch.testing.assert_close(product, a @ b)
