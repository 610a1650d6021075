"""Result modes of the kernel and the shapes they produce."""

from __future__ import annotations

from typing import Literal

from ._errors import OptionError

Mode = Literal["full", "trace", "diagonal"]
MODES: tuple[str, ...] = ("full", "trace", "diagonal")


def check_mode(mode: str) -> Mode:
    """Return ``mode`` if it is valid, else raise OptionError listing the valid ones."""
    if mode not in MODES:
        raise OptionError(f"unknown mode {mode!r}: use one of {', '.join(map(repr, MODES))}")
    return mode  # type: ignore[return-value]


def block_shape(mode: Mode, n1: int, n2: int, num_outputs: int) -> tuple[int, ...]:
    """Shape of the kernel block between n1 and n2 samples in ``mode``."""
    if mode == "full":
        return (n1, n2, num_outputs, num_outputs)
    if mode == "diagonal":
        return (n1, n2, num_outputs)
    return (n1, n2)


def reduce_full(full, mode: Mode):
    """A full kernel block (N1, N2, O, O) reduced to ``mode``: its output diagonal, summed for trace."""
    if mode == "full":
        return full
    diagonal = full.diagonal(dim1=2, dim2=3)
    return diagonal if mode == "diagonal" else diagonal.sum(-1)


def transpose_block(block, mode: Mode):
    """K(x2, x1) from K(x1, x2): swap the sample axes (and the output axes in full mode)."""
    if mode == "full":
        return block.permute(1, 0, 3, 2)
    if mode == "diagonal":
        return block.permute(1, 0, 2)
    return block.transpose(0, 1)
