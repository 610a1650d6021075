"""Float32 matrix products on CPU through oneDNN instead of MKL.

PyTorch's CPU ``mm``/``addmm`` call MKL, whose float32 GEMM runs its AVX2 code path on AMD
processors; oneDNN, also inside PyTorch (``torch.ops.mkldnn._linear_pointwise``, the op
``torch.compile`` uses for CPU linear layers; private, see :mod:`._torch_private`), runs AVX-512 there and was measured about
2x faster on the benchmark machine (AMD EPYC, 2 threads; ``bench/gemm.py``) at float32
accuracy. Inside :func:`fast_matmuls` the library's own products (contractions, a chain's
backward pass) call :func:`mm`, which goes to oneDNN directly; code the library does not
own (a model's forward and backward passes) is routed by a Python dispatch mode that sends
float32 CPU ``mm``/``addmm`` calls to oneDNN. The mode costs each op a few microseconds, so
it is entered only around such passes: the structured method's, when the model's forward
FLOPs are mostly matrix products (convolution networks with many small ops do not earn it
back), and the vp method's forward-mode passes.
Anything else (other dtypes, CUDA, a PyTorch without the op) runs as before; a PyTorch
without dispatch modes routes only the library's own products.

Set the environment variable ``FASTNTK_ONEDNN=0`` to keep PyTorch's own kernels.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

import torch

from . import _torch_private

aten = torch.ops.aten


def _linear(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a @ b_tᵀ (+ bias) by oneDNN, for 2-D float32 CPU tensors."""
    return _torch_private.onednn_linear(a, b_t, bias)


def onednn_available() -> bool:
    """Whether oneDNN products are enabled, present in this PyTorch, and correct on a small case
    (:data:`._torch_private.ONEDNN_LINEAR`, probed once)."""
    return os.environ.get("FASTNTK_ONEDNN", "1") != "0" and bool(_torch_private.ONEDNN_LINEAR)


MIN_FLOPS = 2**24
"""Smaller products stay with MKL: oneDNN sets up (JIT-compiles) a kernel for every new shape,
which costs more than it saves on products this small."""


def _eligible(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a @ b goes to oneDNN: 2-D float32 CPU operands, big enough."""
    return (
        all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 2 for t in (a, b))
        and 2 * a.shape[0] * a.shape[1] * b.shape[1] >= MIN_FLOPS
    )


def _route(func, args: tuple, kwargs: dict):  # noqa: ANN001, ANN202
    """Runs an aten op, float32 CPU ``mm`` and plain ``addmm`` (bias vector, no scaling) by oneDNN
    (the handler of :func:`._torch_private.intercept_aten_ops` inside :func:`fast_matmuls`)."""
    if func is aten.mm.default and _eligible(*args):
        a, b = args
        return _linear(a, b.T, None)
    if func is aten.addmm.default and not kwargs and len(args) == 3:
        bias, a, b = args
        if _eligible(a, b) and bias.dim() == 1 and bias.dtype == torch.float32 and bias.shape[0] == b.shape[1]:
            return _linear(a, b.T, bias)
    return func(*args, **kwargs)


_ROUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("fastntk_onednn_routing", default=False)
"""Whether :func:`mm` calls go to oneDNN (inside :func:`fast_matmuls`)."""

_INTERCEPTING: contextvars.ContextVar[bool] = contextvars.ContextVar("fastntk_onednn_intercepting", default=False)
"""Whether a model's ``mm``/``addmm`` calls go to oneDNN (inside :func:`fast_matmuls` with ``intercept``)."""


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; inside :func:`fast_matmuls`, by oneDNN when eligible, with no dispatch mode needed
    (the library's own contractions call this; a model's passes need the mode)."""
    if _ROUTING.get() and _eligible(a, b) and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return _linear(a, b.T, None)  # (oneDNN's op has no autograd formula: products to differentiate stay with PyTorch)
    return a @ b


@contextlib.contextmanager
def fast_matmuls(enabled: bool = True, intercept: bool = True) -> Iterator[None]:
    """Run float32 CPU matrix products inside this block through oneDNN (when available and
    ``enabled``): those of :func:`mm` always, and with ``intercept`` every ``mm``/``addmm``
    (a model's forward and backward passes) through a dispatch mode, which costs every op of
    the block a few microseconds."""
    if not enabled or not onednn_available():
        yield
        return
    token = _ROUTING.set(True)
    try:
        if intercept and not _active():
            with _torch_private.intercept_aten_ops(_route) as intercepting:
                inner = _INTERCEPTING.set(intercepting)
                try:
                    yield
                finally:
                    _INTERCEPTING.reset(inner)
        else:
            yield
    finally:
        _ROUTING.reset(token)


def _active() -> bool:
    """Whether a model's products are already routed here (nested use)."""
    return _INTERCEPTING.get()

