"""fast_matmuls: float32 CPU products through oneDNN, the same numbers, everything else untouched."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from fastntk import _gemm
from fastntk._gemm import fast_matmuls, onednn_available

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN linear op")


def float32_tolerance(k: int) -> float:
    """Relative error bound of a float32 dot product of length k (rounding grows like k·eps)."""
    return k * torch.finfo(torch.float32).eps


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Shapes of the products that went to oneDNN (every size: MIN_FLOPS lowered to 1)."""
    monkeypatch.setattr(_gemm, "MIN_FLOPS", 1)
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


@needs_onednn
@pytest.mark.parametrize("transposed", [False, True])
def test_mm_is_routed_and_equal(routed: list, transposed: bool) -> None:
    a, b = operands((37, 300), (300, 23))
    if transposed:
        b = b.T.contiguous().T  # a column-major operand
    expected = a.double() @ b.double()
    with fast_matmuls():
        product = a @ b
    assert routed == [(37, 300, 23)]
    assert product.shape == (37, 23) and product.dtype == torch.float32
    assert (product.double() - expected).abs().max() <= float32_tolerance(300) * expected.abs().max()


@needs_onednn
def test_explicit_products_need_no_dispatch_mode(routed: list) -> None:
    """The library's own contractions call _gemm.mm: routed inside fast_matmuls(intercept=False)
    without the dispatch mode (whose per-op cost every view would pay), and a plain product
    outside it; other products in that block stay with PyTorch."""
    a, b = operands((37, 300), (300, 23))
    expected = a.double() @ b.double()
    outside = _gemm.mm(a, b)
    assert routed == []
    with fast_matmuls(intercept=False):
        assert not _gemm._active()
        product = _gemm.mm(a, b)
        assert routed == [(37, 300, 23)]
        torch.testing.assert_close(a @ b, outside)  # not through the mode
    assert routed == [(37, 300, 23)]
    for value in (product, outside):
        assert (value.double() - expected).abs().max() <= float32_tolerance(300) * expected.abs().max()
    assert _gemm.mm(a.double(), b.double()).dtype == torch.float64  # ineligible: PyTorch's


@needs_onednn
def test_explicit_products_to_differentiate_stay_with_pytorch(routed: list) -> None:
    """oneDNN's op has no autograd formula (its gradients would silently be missing)."""
    a, b = operands((37, 300), (300, 23))
    a.requires_grad_()
    with fast_matmuls(intercept=False):
        _gemm.mm(a, b).sum().backward()
        with torch.no_grad():
            _gemm.mm(a, b)
    assert routed == [(37, 300, 23)]  # only the product under no_grad
    torch.testing.assert_close(a.grad, b.sum(1).expand(37, 300))


STRIDED = {
    "expanded": lambda t: t[:1].expand_as(t),  # stride 0, as autograd's broadcast gradients are
    "every other row": lambda t: torch.cat([t, t]).reshape(2 * t.shape[0], -1)[::2],
    "every other column": lambda t: torch.cat([t, t], dim=1)[:, ::2],
    "transposed": lambda t: t.T.contiguous().T,
}


@needs_onednn
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("layout", list(STRIDED))
def test_any_strides(routed: list, layout: str, side: str) -> None:
    a, b = operands((40, 30), (30, 20))
    if side == "left":
        a = STRIDED[layout](a)
    else:
        b = STRIDED[layout](b)
    expected = a.double() @ b.double()
    with fast_matmuls():
        product = a @ b
    assert routed
    assert (product.double() - expected).abs().max() <= float32_tolerance(30) * expected.abs().max()


@needs_onednn
def test_linear_with_bias_and_its_backward(routed: list) -> None:
    x, w, b = operands((16, 50), (30, 50), (30,))
    x.requires_grad_()
    with fast_matmuls():
        y = torch.nn.functional.linear(x, w, b)
        (grad,) = torch.autograd.grad(y.sum() * 1.0, x)
    assert len(routed) >= 2  # the forward addmm and the backward mm
    expected = x.detach().double() @ w.double().T + b.double()
    assert (y.detach().double() - expected).abs().max() <= float32_tolerance(50) * expected.abs().max()
    torch.testing.assert_close(grad, w.sum(0).expand(16, 50), rtol=float32_tolerance(30), atol=float32_tolerance(30))


@needs_onednn
def test_batched_backward_under_vmap(routed: list) -> None:
    """Backward passes vmapped over output directions (how the structured method gets cotangents)."""
    x, w = operands((8, 20), (5, 20))
    h = x.clone().requires_grad_()
    basis = torch.eye(5).unsqueeze(1).expand(5, 8, 5)
    with fast_matmuls():
        y = h @ w.T
        (grads,) = torch.autograd.grad(y, h, basis, is_grads_batched=True)
        doubled = vmap(lambda m: m @ w.T)(x.expand(3, 8, 20))
    torch.testing.assert_close(grads, w[:, None, :].expand(5, 8, 20))
    torch.testing.assert_close(doubled, (x @ w.T).expand(3, 8, 5))
    assert routed


def test_small_products_stay_with_mkl(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(_gemm, "_linear", lambda a, b_t, bias: calls.append(1) or a @ b_t.T)
    small, big = operands((8, 8), (8, 8)), operands((256, 256), (256, 256))
    with fast_matmuls():
        small[0] @ small[1]
        big[0] @ big[1]
    assert calls == ([1] if onednn_available() else [])


def test_other_products_are_left_alone(routed: list) -> None:
    a64, b64 = operands((6, 4), (4, 3), dtype=torch.float64)
    a, b, c = operands((6, 4), (4, 3), (6, 3))
    with fast_matmuls():
        double = a64 @ b64
        scaled = torch.addmm(c, a, b, beta=0.5, alpha=2.0)  # a matrix bias, scaled: not a linear layer
        empty = torch.ones(0, 4) @ b
    assert routed == []
    torch.testing.assert_close(double, a64 @ b64)
    torch.testing.assert_close(scaled, 0.5 * c + 2.0 * (a @ b))
    assert empty.shape == (0, 3)


def test_disabled_block_routes_nothing(routed: list) -> None:
    a, b = operands((5, 7), (7, 2))
    with fast_matmuls(enabled=False):
        a @ b
    assert routed == []


@needs_onednn
def test_nested_blocks_route_once(routed: list) -> None:
    a, b = operands((5, 7), (7, 2))
    with fast_matmuls(), fast_matmuls():
        a @ b
    assert len(routed) == 1


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch, routed: list) -> None:
    monkeypatch.setenv("FASTNTK_ONEDNN", "0")
    assert not onednn_available()
    a, b = operands((5, 7), (7, 2))
    with fast_matmuls():
        product = a @ b
    assert routed == []
    torch.testing.assert_close(product, a @ b)
