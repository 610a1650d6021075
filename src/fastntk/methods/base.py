"""The interface every exact method implements: per-sample factors, then a contraction."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from .._functional import FunctionalModel
from .._gemm import fast_matmuls
from .._inputs import Batch
from ..reduction import Mode


@dataclass(frozen=True)
class Kept:
    """What calibration computed on its block: the block's ``factors``, as ``left`` gives them."""

    factors: Any


class KernelMethod(ABC):
    """An exact way to compute a kernel block K(x1_block, x2_block).

    All the engine (:mod:`fastntk.blocks.engine`) needs: ``left`` factors of a block of x1 and
    ``right`` factors of a block of x2, their contraction (``contracted``), and their size
    (``bytes_per_sample``); factors are reused across every block they meet. When
    ``symmetric_factors`` is True, left and right factors of the same samples are the same
    object, so K(x, x) computes them once. Before blocks are sized a method may take a look at
    a sample (``estimated``) and, before the first block, learn what depends on the model
    (``calibrated``); both return a new method, none is changed after it is built. A kernel of
    one block pair takes one call of ``left_and_right``, which a method may override to
    compute both sides in one pass.
    """

    name: str = ""
    symmetric_factors: bool = True
    sides_with_factors: int = 2
    """Sides whose blocks hold ``bytes_per_sample`` each (vp's left side is its inputs)."""

    def __init__(self, f: FunctionalModel, mode: Mode, num_outputs: int, calibration: Any = None) -> None:
        self.f = f
        self.mode = mode
        self.num_outputs = num_outputs
        self.calibration = calibration
        """What :meth:`calibrated` learned (immutable; reusable by later calls on inputs of the
        same kind: ``type(m)(f, mode, O, m.calibration)``). None: nothing learned yet."""

    @property
    def ready(self) -> bool:
        """Whether the method can compute blocks (it needs no calibration, or has one)."""
        return True

    def unsupported(self, x: Batch) -> str | None:
        """Why this method cannot compute the model on samples like x (None: it can)."""
        return None

    def estimated(self, x: Batch) -> "KernelMethod":
        """This method with what a look at the samples x tells of its sizes and costs, before
        blocks are sized (no backward pass, no kernel); itself when it needs no look."""
        return self

    def calibrated(self, x: Batch, keep: bool = False) -> tuple["KernelMethod", Kept | None]:
        """This method bound to what depends on the model (e.g. factor sizes), learned from the
        samples x, and with ``keep`` what it computed on the way: the factors of x for the
        engine's first ``left(x)``. Methods with nothing to learn return themselves and None."""
        return self, None

    @abstractmethod
    def left(self, x: Batch) -> Any:
        """Factors of a block of x1."""

    def right(self, x: Batch) -> Any:
        """Factors of a block of x2 (by default the same as ``left``)."""
        return self.left(x)

    def left_and_right(self, x1: Batch, x2: Batch) -> tuple[Any, Any]:
        """Factors of a block of x1 and of a block of x2, for a kernel of one block pair (a
        method may compute both in one pass)."""
        return self.left(x1), self.right(x2)

    def contracted(self, left: Any, right: Any) -> torch.Tensor:
        """:meth:`contract`, its products on oneDNN where that is faster (the contractions call
        ``_gemm.mm``; see :func:`fast_matmuls`)."""
        with fast_matmuls():
            return self.contract(left, right)

    @abstractmethod
    def contract(self, left: Any, right: Any) -> torch.Tensor:
        """The kernel block between the samples of ``left`` and ``right``, shaped per ``mode``."""

    @abstractmethod
    def bytes_per_sample(self) -> int:
        """Peak bytes the factors of one sample take while computed and kept."""
