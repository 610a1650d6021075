"""Reductions: what a kernel keeps of the O×O block of each pair of samples, in one place.

    "full"        (N1, N2, O, O)   every block
    "trace"       (N1, N2)         Σ_a K[n, m, a, a]
    "diagonal"    (N1, N2, O)      K[n, m, a, a]
    "trace_mean"  (N1, N2)         the trace / O (neural-tangents' ``trace_axes`` convention)

Methods compute "full", "trace" or "diagonal" directly (each contraction keeps only what its
mode needs); "trace_mean" is the trace divided by O (:func:`mean_over_outputs`).
"""

from __future__ import annotations

from typing import Literal

from ._errors import OptionError

Mode = Literal["full", "trace", "diagonal"]
MODES: tuple[str, ...] = ("full", "trace", "diagonal")


MEAN_MODES: dict[str, Mode] = {"trace_mean": "trace"}
"""Modes computed as another and then divided by O."""


def check_mode(mode: str) -> Mode:
    """The computed mode of ``mode`` ("trace_mean" -> "trace"), or OptionError listing the valid ones."""
    if isinstance(mode, str) and mode in MODES:
        return mode  # type: ignore[return-value]
    if isinstance(mode, str) and mode in MEAN_MODES:
        return MEAN_MODES[mode]
    raise OptionError(f"unknown mode {mode!r}: use one of {', '.join(map(repr, (*MODES, *MEAN_MODES)))}")


def mean_over_outputs(value, num_outputs: int):
    """A "trace" block as "trace_mean": divided by O."""
    return value / num_outputs


def block_shape(mode: Mode, n1: int, n2: int, num_outputs: int) -> tuple[int, ...]:
    """Shape of the kernel block between n1 and n2 samples in ``mode``."""
    if mode == "full":
        return (n1, n2, num_outputs, num_outputs)
    if mode == "diagonal":
        return (n1, n2, num_outputs)
    return (n1, n2)


def reduce_full(full, mode: str):
    """A full kernel block (N1, N2, O, O) reduced to ``mode`` (any of the four)."""
    computed = check_mode(mode)
    if computed == "full":
        return full
    diagonal = full.diagonal(dim1=2, dim2=3)
    if computed == "diagonal":
        return diagonal
    trace = diagonal.sum(-1)
    return mean_over_outputs(trace, full.shape[-1]) if mode in MEAN_MODES else trace


def transpose_block(block, mode: Mode):
    """K(x2, x1) from K(x1, x2): swap the sample axes (and the output axes in full mode)."""
    if mode == "full":
        return block.permute(1, 0, 3, 2)
    if mode == "diagonal":
        return block.permute(1, 0, 2)
    return block.transpose(0, 1)
