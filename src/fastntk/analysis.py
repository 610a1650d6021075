"""Numbers that describe kernels, computed in float64 from any kernel fastntk returns (a tensor,
a numpy array, the ``np.memmap`` of a ``.npy`` file written by :func:`fastntk.gram`)."""

from __future__ import annotations

import torch

from .predict import Array, _tensor


def kernel_distance(a: Array, b: Array) -> float:
    r"""The kernel distance of Fort et al. (2020), 1 − ⟨A, B⟩_F / (‖A‖_F ‖B‖_F): 0 for kernels
    equal up to a positive scale, 1 for orthogonal ones (2 at most, for B = −A).

    Args:
        a: a kernel of any shape fastntk returns ((N1, N2, O, O), (N1, N2), (N1, N2, O)).
        b: a kernel of the same shape.

    Returns:
        The distance, a Python float.

    Example:
        >>> import torch, fastntk
        >>> k = torch.eye(3)
        >>> fastntk.analysis.kernel_distance(k, 2 * k)
        0.0
    """
    x, y = _tensor(a, "a"), _tensor(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"the kernels have shapes {tuple(x.shape)} and {tuple(y.shape)}: compare kernels of the same samples and mode")
    norms = torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)
    if norms == 0:
        raise ValueError("a kernel is zero: its distance to another kernel is undefined")
    return max(0.0, float(1.0 - (x * y).sum() / norms))
