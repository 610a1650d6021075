"""Plots of kernels with matplotlib (the optional extra ``pip install 'fastntk[plot]'``).

Each function builds a ``matplotlib.figure.Figure`` directly (no ``pyplot``: no global figure
state, no display needed; it renders with the Agg canvas), returns it, and saves it to ``path``
when given (the format from the suffix: .png, .pdf, .svg).

    heatmap(k)                     the kernel's 2-D matrix (sample-major for full kernels)
    spectrum(k)                    its eigenvalues, descending, on a log scale
    overview(k)                    both side by side (what ``fastntk report`` writes)
    over_training(steps, series)   named series (alignment, distance from the initial kernel, ...) against steps
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from . import analysis, layout
from ._errors import InputError
from .predict import Array, _tensor

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _new_figure(width: float, height: float) -> "Figure":
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("fastntk.plots needs matplotlib: pip install 'fastntk[plot]'") from None
    return Figure(figsize=(width, height), layout="constrained")


def _finish(figure: "Figure", path: str | Path | None) -> "Figure":
    if path is not None:
        figure.savefig(Path(path), dpi=120)
    return figure


def _draw_heatmap(ax: "Axes", kernel: Array) -> None:
    k = _tensor(kernel, "kernel")
    outputs = layout.kernel_outputs(k)
    matrix = layout.to_matrix(k).numpy()
    bound = float(np.abs(matrix).max()) or 1.0
    signed = bool((matrix < 0).any())
    image = ax.imshow(
        matrix, cmap="RdBu_r" if signed else "viridis", vmin=-bound if signed else 0.0, vmax=bound, interpolation="nearest"
    )
    ax.figure.colorbar(image, ax=ax, shrink=0.8)
    rows, columns = matrix.shape
    if outputs is None:
        ax.set(title=f"kernel ({rows} x {columns})", xlabel="sample", ylabel="sample")
    else:
        ax.set(title=f"kernel ({rows} x {columns}, O = {outputs})", xlabel="sample·O + output", ylabel="sample·O + output")


def _draw_spectrum(ax: "Axes", kernel: Array, eigenvalues: Array | None) -> None:
    values = (analysis.eigenvalues(kernel) if eigenvalues is None else _tensor(eigenvalues, "eigenvalues")).numpy()
    values = np.sort(values.reshape(-1))[::-1]
    positive = values > 0
    index = np.arange(1, len(values) + 1)
    ax.semilogy(index[positive], values[positive], ".-", markersize=3)
    dropped = int((~positive).sum())
    note = f" ({dropped} eigenvalue{'s' if dropped != 1 else ''} <= 0 not shown)" if dropped else ""
    ax.set(title=f"eigenvalues{note}", xlabel="index (descending)", ylabel="eigenvalue")
    ax.grid(True, which="both", alpha=0.3)


def heatmap(kernel: Array, *, path: str | Path | None = None, title: str | None = None) -> "Figure":
    """The kernel as an image: its 2-D matrix (full kernels (N1, N2, O, O) sample-major, rows
    n·O + a, :func:`fastntk.layout.to_matrix`); a diverging colour map centred at 0 when it has
    negative entries.

    Args:
        kernel: (N1, N2, O, O) or (N1, N2) (a cross kernel too).
        path: where to save the figure, or None.
        title: the figure's title, or None.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ImportError: matplotlib is not installed.
        InputError: a kernel of another shape.
    """
    figure = _new_figure(5.5, 4.5)
    _draw_heatmap(figure.add_subplot(), kernel)
    if title:
        figure.suptitle(title)
    return _finish(figure, path)


def spectrum(
    kernel: Array, *, path: str | Path | None = None, title: str | None = None, eigenvalues: Array | None = None
) -> "Figure":
    """The eigenvalues of a Gram kernel K(X, X), descending, on a log scale
    (:func:`fastntk.analysis.eigenvalues`; those <= 0 cannot be drawn and are counted in the title).

    Args:
        kernel: (N, N, O, O) or (N, N).
        path: where to save the figure, or None.
        title: the figure's title, or None.
        eigenvalues: the kernel's eigenvalues if already computed (e.g. ``Summary.eigenvalues``),
            or None to compute them.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ImportError: matplotlib is not installed.
        InputError: a kernel that is not square.
        KernelError: a kernel that is not symmetric.
    """
    figure = _new_figure(5.5, 4.0)
    _draw_spectrum(figure.add_subplot(), kernel, eigenvalues)
    if title:
        figure.suptitle(title)
    return _finish(figure, path)


def overview(
    kernel: Array, *, path: str | Path | None = None, title: str | None = None, eigenvalues: Array | None = None
) -> "Figure":
    """:func:`heatmap` and :func:`spectrum` of a Gram kernel side by side.

    Args:
        kernel: (N, N, O, O) or (N, N).
        path: where to save the figure, or None.
        title: the figure's title, or None.
        eigenvalues: the kernel's eigenvalues if already computed (e.g. ``Summary.eigenvalues``),
            or None to compute them.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ImportError: matplotlib is not installed.
        InputError: a kernel that is not square.
        KernelError: a kernel that is not symmetric.
    """
    figure = _new_figure(11.0, 4.5)
    left, right = figure.subplots(1, 2)
    _draw_heatmap(left, kernel)
    _draw_spectrum(right, kernel, eigenvalues)
    if title:
        figure.suptitle(title)
    return _finish(figure, path)


def over_training(
    steps: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    path: str | Path | None = None,
    title: str | None = None,
    ylabel: str = "value",
    log_y: bool = False,
) -> "Figure":
    """Named series against training steps, e.g. the kernel distance from the initial kernel and
    the kernel–target alignment, recorded every k optimiser steps.

    Args:
        steps: the steps (T,) at which the series were recorded.
        series: a name per series, each (T,) values (e.g. ``{"distance from init": [...],
            "alignment": [...]}``); NaN entries leave gaps.
        path: where to save the figure, or None.
        title: the figure's title, or None.
        ylabel: the label of the y axis.
        log_y: a logarithmic y axis.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ImportError: matplotlib is not installed.
        InputError: no series, or a series whose length is not the number of steps.
    """
    x = np.asarray(steps, dtype=np.float64).reshape(-1)
    if not series:
        raise InputError("series is empty: give at least one named series, e.g. {'distance': [...]}")
    lines: dict[str, np.ndarray] = {}
    for name, values in series.items():
        y = np.asarray(values, dtype=np.float64).reshape(-1)
        if y.shape != x.shape:
            raise InputError(f"series {name!r} has {y.size} values but there are {x.size} steps: give one value per step")
        lines[str(name)] = y
    figure = _new_figure(6.0, 4.0)
    ax = figure.add_subplot()
    for name, y in lines.items():
        ax.plot(x, y, "o-" if x.size <= 30 else "-", markersize=3, label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _finish(figure, path)

