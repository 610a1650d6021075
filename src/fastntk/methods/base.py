"""The interface every exact method implements: per-sample factors, then a contraction."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from .._functional import FunctionalModel
from .._gemm import fast_matmuls
from .._inputs import Batch
from .._modes import Mode


class KernelMethod(ABC):
    """An exact way to compute a kernel block K(x1_block, x2_block).

    The engine asks for ``left`` factors of a block of x1 and ``right`` factors of a
    block of x2, then ``contract``\\ s them; factors are reused across every block they meet.
    When ``symmetric_factors`` is True, left and right factors of the same samples are the
    same object, so K(x, x) computes them once.
    """

    name: str = ""
    symmetric_factors: bool = True
    sides_with_factors: int = 2
    """Sides whose blocks hold ``bytes_per_sample`` each (vp's left side is its inputs)."""
    calibration: Any = None
    """What ``calibrate`` learned; reusable by later calls on inputs of the same kind."""
    kept: Any = None
    """(x, what ``calibrate(x, keep=True)`` computed): factors for the first ``left(x)``, or
    K(x, x) for the first ``gram(x)``; None drops it."""

    def __init__(self, f: FunctionalModel, mode: Mode, num_outputs: int, *, vmap_chunk: int | None = None) -> None:
        self.f = f
        self.mode = mode
        self.num_outputs = num_outputs
        self.vmap_chunk = vmap_chunk

    def unsupported(self, x: Batch) -> str | None:
        """Why this method cannot compute the model on samples like x (None: it can)."""
        return None

    def estimate_size(self, x: Batch) -> None:
        """Look at a few samples before blocks are sized, when ``bytes_per_sample`` needs it."""

    def calibrate(self, x: Batch, keep: bool = False, gram: bool = False) -> None:
        """Learn what depends on the model (e.g. factor sizes) from the samples x. With
        ``keep``, the method may keep what it computed for x to serve a later ``left(x)``
        (with ``gram``, x being all of a Gram matrix's inputs, a later ``gram(x)``)."""

    @abstractmethod
    def left(self, x: Batch) -> Any:
        """Factors of a block of x1."""

    def right(self, x: Batch) -> Any:
        """Factors of a block of x2 (by default the same as ``left``)."""
        return self.left(x)

    def gram(self, x: Batch) -> torch.Tensor:
        """K(x, x) of one block (a method may contract factors as they come, keeping fewer)."""
        left = self.left(x)
        right = left if self.symmetric_factors else self.right(x)
        return self.contracted(left, right)

    def left_and_right(self, x1: Batch, x2: Batch) -> tuple[Any, Any]:
        """Factors of a block of x1 and of a block of x2, for a kernel of one block pair (a
        method may compute both in one pass)."""
        return self.left(x1), self.right(x2)

    def contracted(self, left: Any, right: Any) -> torch.Tensor:
        """:meth:`contract`, its products on oneDNN where that is faster (the contractions call
        ``_gemm.mm``, so no dispatch mode is needed; see :func:`fast_matmuls`)."""
        with fast_matmuls(intercept=False):
            return self.contract(left, right)

    @abstractmethod
    def contract(self, left: Any, right: Any) -> torch.Tensor:
        """The kernel block between the samples of ``left`` and ``right``, shaped per ``mode``."""

    @abstractmethod
    def bytes_per_sample(self) -> int:
        """Peak bytes the factors of one sample take while computed and kept."""
