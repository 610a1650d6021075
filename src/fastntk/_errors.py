"""The package's error family: every message names the cause and the fix."""

from __future__ import annotations

import torch


class FastNTKError(Exception):
    """Base class of every error fastntk raises on purpose.

    Each message names the cause and the fix. Subclasses also derive from the matching
    built-in class (``ValueError``, ``RuntimeError``, ``FloatingPointError``).
    """


class InputError(FastNTKError, ValueError):
    """Inputs x1/x2 that do not fit the model or each other.

    Raised for a leaf that is not a tensor or array, a 0-d tensor, batch sizes that differ
    within an input, an empty batch, x1 and x2 of different structure, per-sample shape,
    dtype or device, an input on another device than the model, and unreadable ``.npy``
    files or unusable datasets (no ``len()``, a shuffling ``DataLoader``).
    """


class OptionError(FastNTKError, ValueError):
    """An option value that cannot be used.

    Raised for an unknown ``mode`` or ``method``, a malformed ``block_size``, ``dtype`` or
    ``max_memory``, a ``max_memory`` too small for one sample's working set (the message
    gives the bytes needed), and a result held in memory larger than ``max_memory``.
    """


class SelectionError(FastNTKError, ValueError):
    """A ``params`` selection that is malformed, names an unknown parameter (close matches
    are listed) or matches no parameter."""


class ModelError(FastNTKError, RuntimeError):
    """A model whose per-sample NTK is not defined as asked, or that fails.

    Raised for a BatchNorm in training mode or without running statistics, active dropout,
    outputs that differ between identical calls (randomness) or between a sample alone and
    in a batch (batch dependence), a model that writes to its inputs, fails on them, or
    returns outputs that are not floating tensors batched on dim 0; parameters on several
    devices or on ``meta``; a method that cannot compute the model (``vp`` without
    forward-mode AD); and fastntk called from inside the model's forward pass.
    """


class NonFiniteError(FastNTKError, FloatingPointError):
    """NaN or inf in the inputs, the parameters or buffers, or the result (the first bad
    sample, tensor or pair is named).

    Attributes:
        kernel: the kernel computed so far when the result itself is not finite
            (``None`` when the check failed before any computation), so nothing
            already computed is lost.
    """

    def __init__(self, message: str, kernel: torch.Tensor | None = None) -> None:
        super().__init__(message)
        self.kernel = kernel
