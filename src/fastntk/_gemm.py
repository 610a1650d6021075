"""Float32 matrix products on CPU through oneDNN instead of MKL.

PyTorch's CPU ``mm``/``addmm`` call MKL, whose float32 GEMM runs its AVX2 code path on AMD
processors; oneDNN, also inside PyTorch (``torch.ops.mkldnn._linear_pointwise``, the op
``torch.compile`` uses for CPU linear layers; private, see :mod:`._torch_private`), runs
AVX-512 there: faster at float32 accuracy (``bench/gemm.py`` measures both on a machine). Inside :func:`fast_matmuls` the library's own products (contractions, a chain's
backward pass) call :func:`mm`, which goes to oneDNN; a model's own passes keep PyTorch's
kernels (routing them through a dispatch mode did not earn its cost: ``docs/special-paths.md``).
Anything else (other dtypes, CUDA, a PyTorch without the op) runs as before.

Set the environment variable ``FASTNTK_ONEDNN=0`` to keep PyTorch's own kernels.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

import torch

from . import _torch_private

def _linear(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a @ b_tᵀ (+ bias) by oneDNN, for 2-D float32 CPU tensors."""
    return _torch_private.onednn_linear(a, b_t, bias)


def onednn_available() -> bool:
    """Whether oneDNN products are enabled, present in this PyTorch, and correct on a small case
    (:data:`._torch_private.ONEDNN_LINEAR`, probed once)."""
    return os.environ.get("FASTNTK_ONEDNN", "1") != "0" and bool(_torch_private.ONEDNN_LINEAR)


def _eligible(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a @ b goes to oneDNN: 2-D float32 CPU operands."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 2 for t in (a, b))


_ROUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("fastntk_onednn_routing", default=False)
"""Whether :func:`mm` calls go to oneDNN (inside :func:`fast_matmuls`)."""

def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; inside :func:`fast_matmuls`, by oneDNN when eligible (the library's own
    contractions and a chain's backward pass call this)."""
    if _ROUTING.get() and _eligible(a, b) and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return _linear(a, b.T, None)  # (oneDNN's op has no autograd formula: products to differentiate stay with PyTorch)
    return a @ b


@contextlib.contextmanager
def fast_matmuls(enabled: bool = True) -> Iterator[None]:
    """Run the :func:`mm` products of this block through oneDNN (when available and ``enabled``)."""
    if not enabled or not onednn_available():
        yield
        return
    token = _ROUTING.set(True)
    try:
        yield
    finally:
        _ROUTING.reset(token)
