"""The package's error family: every message names the cause and the fix."""

from __future__ import annotations

import torch


class FastNTKError(Exception):
    """Base class of every error fastntk raises on purpose."""


class InputError(FastNTKError, ValueError):
    """Inputs x1/x2 that do not fit the model or each other (shape, dtype, device, empty)."""


class OptionError(FastNTKError, ValueError):
    """An unknown mode, method or other option value."""


class SelectionError(FastNTKError, ValueError):
    """A ``params`` selection that is malformed or matches no parameter."""


class ModelError(FastNTKError, RuntimeError):
    """A model whose NTK is not defined as asked (batch dependence, randomness, failure)."""


class NonFiniteError(FastNTKError, FloatingPointError):
    """NaN or inf in the inputs, the parameters or the result.

    Attributes:
        kernel: the kernel computed so far when the result itself is not finite
            (``None`` when the check failed before any computation), so nothing
            already computed is lost.
    """

    def __init__(self, message: str, kernel: torch.Tensor | None = None) -> None:
        super().__init__(message)
        self.kernel = kernel
