r"""Numbers that describe kernels, computed in float64 from any kernel fastntk returns (a tensor,
a numpy array, the ``np.memmap`` of a ``.npy`` file written by :func:`fastntk.gram`).

A full kernel (N, N, O, O) is analysed as its (N·O) x (N·O) matrix, sample-major
(:func:`fastntk.layout.to_matrix`); a traced kernel (N, N) ("trace", "trace_mean") as it is.
Targets are (N,) or (N, O) (e.g. one-hot classes), in the kernel's sample order: with a full
kernel they are the vector y = vec(Y) of the same (sample, output) rows; with a traced kernel
the target kernel is Y Yᵀ (N, N).

    eigenvalues(k)               the spectrum, descending
    condition_number(k)          λ_max / λ_min
    effective_rank(k)            exp(entropy of λ / Σλ) (Roy & Vetterli 2007), or the participation ratio
    alignment(k, y)              ⟨K, yyᵀ⟩_F / (‖K‖_F ‖yyᵀ‖_F) (Cristianini et al. 2002)
    centered_alignment(k, y)     the same after centring both over samples (Cortes et al. 2012)
    kernel_distance(a, b)        1 − ⟨A, B⟩_F / (‖A‖_F ‖B‖_F) (Fort et al. 2020)
    summary(k, y=None)           all of the above for one kernel (what ``fastntk report`` prints)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import layout
from ._errors import InputError
from .predict import Array, KernelError, _nonnegative, _symmetric, _tensor

__all__ = [
    "eigenvalues", "condition_number", "effective_rank", "alignment", "centered_alignment", "kernel_distance",
    "summary", "Summary", "KernelError", "EFFECTIVE_RANKS",
]

EFFECTIVE_RANKS = ("entropy", "participation_ratio")


def _square(kernel: Array, name: str = "kernel") -> tuple[torch.Tensor, int | None]:
    """A Gram kernel K(X, X) as its float64 2-D matrix, checked square and symmetric, and its O."""
    k = _tensor(kernel, name)
    outputs = layout.kernel_outputs(k, name)
    matrix = layout.to_matrix(k)
    if k.shape[0] != k.shape[1]:
        raise InputError(
            f"{name} has shape {tuple(k.shape)}: it must be square, a Gram kernel K(x, x) "
            "(a cross kernel K(x1, x2) has no eigenvalues or alignment)"
        )
    return _symmetric(matrix, name, "a Gram kernel K(x, x) itself, e.g. fastntk.ntk(model, x)"), outputs


def _psd(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a kernel that must be PSD: refused when clearly not, rounding's negatives set to 0."""
    return _nonnegative(values, "kernel", "")


def _condition(values: torch.Tensor) -> float:
    largest, smallest = float(values.max()), float(values.min())
    if largest == 0:
        return math.nan
    return largest / smallest if smallest > 0 else math.inf


def _effective_rank(values: torch.Tensor, definition: str) -> float:
    total = float(values.sum())
    if total == 0:
        return 0.0
    p = values / total
    if definition == "participation_ratio":
        return float(1 / (p * p).sum())
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def eigenvalues(kernel: Array) -> torch.Tensor:
    """The eigenvalues of a Gram kernel K(X, X), in descending order (float64 ``eigvalsh``).

    Args:
        kernel: (N, N, O, O) (its (N·O) x (N·O) matrix) or (N, N).

    Returns:
        (N·O,) or (N,) float64, largest first; negative ones are kept as computed.

    Raises:
        InputError: a kernel that is not square, or not 4-D full / 2-D traced.
        KernelError: a kernel that is not symmetric.

    Example:
        >>> import torch, fastntk
        >>> fastntk.analysis.eigenvalues(torch.diag(torch.tensor([1.0, 3.0, 2.0])))
        tensor([3., 2., 1.], dtype=torch.float64)
    """
    matrix, _ = _square(kernel)
    return torch.linalg.eigvalsh(matrix).flip(0)


def condition_number(kernel: Array) -> float:
    """λ_max / λ_min of a PSD Gram kernel (``math.inf`` when λ_min is 0 up to rounding).

    Args:
        kernel: (N, N, O, O) or (N, N).

    Returns:
        The condition number, a float >= 1 (nan for the zero kernel).

    Raises:
        KernelError: a kernel that is not symmetric, or not positive semi-definite.
        InputError: a kernel that is not square.

    Example:
        >>> import torch, fastntk
        >>> fastntk.analysis.condition_number(torch.diag(torch.tensor([4.0, 1.0])))
        4.0
    """
    return _condition(_psd(eigenvalues(kernel)))


def effective_rank(kernel: Array, *, definition: str = "entropy") -> float:
    r"""The effective rank of a PSD Gram kernel, from its eigenvalues λ (p = λ / Σλ).

    * ``"entropy"`` (Roy & Vetterli 2007): exp(−Σ p_i log p_i), between 1 and the rank;
    * ``"participation_ratio"``: (Σλ)² / Σλ² = 1 / Σ p_i², also between 1 and the rank.

    Both equal r for r equal nonzero eigenvalues; the entropy rank counts small eigenvalues more.

    Args:
        kernel: (N, N, O, O) or (N, N).
        definition: "entropy" or "participation_ratio".

    Returns:
        The effective rank, a float (0 for the zero kernel).

    Raises:
        KernelError: a kernel that is not symmetric, or not positive semi-definite.
        InputError: a kernel that is not square, or an unknown ``definition``.

    Example:
        >>> import torch, fastntk
        >>> k = torch.diag(torch.tensor([2.0, 2.0, 0.0]))
        >>> round(fastntk.analysis.effective_rank(k), 12), fastntk.analysis.effective_rank(k, definition="participation_ratio")
        (2.0, 2.0)
    """
    if definition not in EFFECTIVE_RANKS:
        raise InputError(f"definition={definition!r}: choose one of {', '.join(map(repr, EFFECTIVE_RANKS))}")
    return _effective_rank(_psd(eigenvalues(kernel)), definition)


def _targets(targets: Array, outputs: int | None, n: int) -> torch.Tensor:
    """The factor Y of the target kernel Y Yᵀ: vec(Y) as (N·O, 1) for a full kernel, (N, C) for a traced one."""
    y = _tensor(targets, "targets")
    if y.dim() not in (1, 2) or y.shape[0] != n:
        raise InputError(f"targets have shape {tuple(y.shape)}: give (N,) or (N, O) with N = {n}, the kernel's samples, in its order")
    if outputs is not None:
        if y.dim() == 1 and outputs != 1 or y.dim() == 2 and y.shape[1] != outputs:
            raise InputError(f"targets have shape {tuple(y.shape)}: a full kernel of O = {outputs} outputs needs targets ({n}, {outputs})")
        return layout.to_vector(y)[:, None]
    return y.reshape(n, -1)


def _aligned(matrix: torch.Tensor, y: torch.Tensor, what: str) -> float:
    """⟨K, Y Yᵀ⟩_F / (‖K‖_F ‖Y Yᵀ‖_F) = tr(Yᵀ K Y) / (‖K‖_F ‖Yᵀ Y‖_F), never forming Y Yᵀ."""
    norms = torch.linalg.vector_norm(matrix) * torch.linalg.vector_norm(y.T @ y)
    if norms == 0:
        raise InputError(f"{what} is zero: its alignment is undefined")
    return float((y * (matrix @ y)).sum() / norms)


def _centre(matrix: torch.Tensor, outputs: int | None) -> torch.Tensor:
    """H K H, H = (I_N − 11ᵀ/N) ⊗ I_O: each output's features centred over the samples."""
    o = outputs or 1
    n = matrix.shape[0] // o
    k = matrix.reshape(n, o, n, o)
    k = k - k.mean(dim=0, keepdim=True)
    k = k - k.mean(dim=2, keepdim=True)
    return k.reshape(n * o, n * o)


def _centre_rows(y: torch.Tensor, outputs: int | None) -> torch.Tensor | None:
    """H Y, the same H: (H Y)(H Y)ᵀ = H Y Yᵀ H; None when the targets are constant over the
    samples (H Y is 0 up to the rounding of the mean)."""
    o = outputs or 1
    rows = y.reshape(-1, o, y.shape[1])
    centred = (rows - rows.mean(dim=0, keepdim=True)).reshape(y.shape)
    if float(centred.abs().max()) <= 64 * torch.finfo(torch.float64).eps * float(y.abs().max()):
        return None
    return centred


def alignment(kernel: Array, targets: Array) -> float:
    r"""Kernel–target alignment (Cristianini et al. 2002): ⟨K, yyᵀ⟩_F / (‖K‖_F ‖yyᵀ‖_F).

    With a full kernel, y = vec(Y) over its (sample, output) rows; with a traced kernel and
    targets (N, O), the target kernel is Y Yᵀ (for one-hot Y: 1 where two samples share a class).

    Args:
        kernel: K(X, X), (N, N, O, O) or (N, N).
        targets: (N,) or (N, O), in the kernel's sample order.

    Returns:
        The alignment, a float in [−1, 1] (in [0, 1] for a PSD kernel).

    Raises:
        InputError: a kernel that is not square, targets that do not match it, or a zero kernel
            or zero targets.
        KernelError: a kernel that is not symmetric.

    Example:
        >>> import torch, fastntk
        >>> y = torch.tensor([1.0, -1.0, 2.0])
        >>> round(fastntk.analysis.alignment(torch.outer(y, y), y), 12)
        1.0
    """
    matrix, outputs = _square(kernel)
    y = _targets(targets, outputs, matrix.shape[0] // (outputs or 1))
    return _aligned(matrix, y, "the kernel or the target kernel")


def centered_alignment(kernel: Array, targets: Array) -> float:
    r"""Centred kernel–target alignment (Cortes et al. 2012): the alignment of H K H with H yyᵀ H.

    H = I − 11ᵀ/N centres over the samples (for a full kernel H ⊗ I_O: each output over the
    samples), so a constant added to the kernel (to each output block of a full kernel) or to the
    targets does not change it.

    Args:
        kernel: K(X, X), (N, N, O, O) or (N, N).
        targets: (N,) or (N, O), in the kernel's sample order.

    Returns:
        The centred alignment, a float in [−1, 1].

    Raises:
        InputError: a kernel that is not square, targets that do not match it, or a kernel or
            targets that are zero after centring (targets the same for every sample).
        KernelError: a kernel that is not symmetric.
    """
    matrix, outputs = _square(kernel)
    centred = _centre_rows(_targets(targets, outputs, matrix.shape[0] // (outputs or 1)), outputs)
    if centred is None:
        raise InputError("the targets are the same for every sample: centred, they are zero and the centred alignment is undefined")
    return _aligned(_centre(matrix, outputs), centred, "the centred kernel")


def kernel_distance(a: Array, b: Array) -> float:
    r"""The kernel distance of Fort et al. (2020), 1 − ⟨A, B⟩_F / (‖A‖_F ‖B‖_F): 0 for kernels
    equal up to a positive scale, 1 for orthogonal ones (2 at most, for B = −A).

    Args:
        a: a kernel of any shape fastntk returns ((N1, N2, O, O), (N1, N2), (N1, N2, O)).
        b: a kernel of the same shape.

    Returns:
        The distance, a Python float.

    Raises:
        InputError: kernels of different shapes, or a zero kernel.

    Example:
        >>> import torch, fastntk
        >>> k = torch.eye(3)
        >>> fastntk.analysis.kernel_distance(k, 2 * k)
        0.0
    """
    x, y = _tensor(a, "a"), _tensor(b, "b")
    if x.shape != y.shape:
        raise InputError(f"the kernels have shapes {tuple(x.shape)} and {tuple(y.shape)}: compare kernels of the same samples and mode")
    norms = torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)
    if norms == 0:
        raise InputError("a kernel is zero: its distance to another kernel is undefined")
    return max(0.0, float(1.0 - (x * y).sum() / norms))


@dataclass(frozen=True)
class Summary:
    """What :func:`summary` finds in a Gram kernel (every number in float64)."""

    shape: tuple[int, ...]
    """The kernel's shape."""
    mode: str
    """"full" for (N, N, O, O), "traced" for (N, N) ("trace" or "trace_mean": the shape cannot tell)."""
    trace: float
    """Σ_i K_ii of the 2-D matrix (Σ of the eigenvalues)."""
    eigenvalues: torch.Tensor
    """(N·O,) or (N,), descending."""
    condition_number: float
    """λ_max / λ_min (inf when λ_min is 0)."""
    effective_rank: float
    """The entropy effective rank (Roy & Vetterli 2007)."""
    participation_ratio: float
    """(Σλ)² / Σλ²."""
    alignment: float | None
    """Kernel–target alignment, None without targets."""
    centered_alignment: float | None
    """Centred kernel–target alignment, None without targets (or for constant targets)."""


def summary(kernel: Array, targets: Array | None = None) -> Summary:
    """The numbers of this module for one Gram kernel, from one eigendecomposition.

    Args:
        kernel: K(X, X), (N, N, O, O) or (N, N).
        targets: (N,) or (N, O) in the kernel's sample order, or None.

    Returns:
        A :class:`Summary`.

    Raises:
        KernelError: a kernel that is not symmetric, or not positive semi-definite.
        InputError: a kernel that is not square, or targets that do not match it.
    """
    matrix, outputs = _square(kernel)
    values = torch.linalg.eigvalsh(matrix).flip(0)
    nonnegative = _psd(values)
    aligned = centred = None
    if targets is not None:
        y = _targets(targets, outputs, matrix.shape[0] // (outputs or 1))
        aligned = _aligned(matrix, y, "the kernel or the target kernel")
        centred_y = _centre_rows(y, outputs)
        if centred_y is not None:  # constant targets: no centred alignment
            centred = _aligned(_centre(matrix, outputs), centred_y, "the centred kernel")
    return Summary(
        shape=tuple(int(s) for s in np.shape(kernel)),
        mode="full" if outputs is not None else "traced",
        trace=float(matrix.diagonal().sum()),
        eigenvalues=values,
        condition_number=_condition(nonnegative),
        effective_rank=_effective_rank(nonnegative, "entropy"),
        participation_ratio=_effective_rank(nonnegative, "participation_ratio"),
        alignment=aligned,
        centered_alignment=centred,
    )
