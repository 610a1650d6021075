r"""Kernels and targets in the layouts other libraries expect.

fastntk returns a "full" kernel as a 4-D array (N1, N2, O, O): ``k[n, m, a, b]`` =
⟨∂f_a(x_n)/∂θ, ∂f_b(x_m)/∂θ⟩. Linear algebra, scikit-learn's ``KernelRidge(kernel="precomputed")``
and GPyTorch's multitask kernels want it as one 2-D matrix over (sample, output) pairs. Here it is
**sample-major** (outputs interleaved): row ``n·O + a`` is output a of sample n, the order of
``y.reshape(-1)`` for targets y (N, O) and of GPyTorch's ``MultitaskMultivariateNormal``
with ``interleaved=True`` (its default) — the same as the Kronecker order of its ``MultitaskKernel``.

Traced kernels (N1, N2) (modes "trace", "trace_mean", or one output) already are 2-D matrices over
samples: they are returned as they are, and targets (N, O) are O columns fitted with the same
kernel (scikit-learn's multi-output ``KernelRidge`` does this).

neural-tangents (``nt.empirical_ntk_fn``, ``nt.empirical_nngp_fn``, ``nt.predict``) differs in two
ways, both handled by :func:`from_neural_tangents` / :func:`to_neural_tangents`:

* its default ``trace_axes=(-1,)`` takes the **mean** over the output axis: an (N1, N2) kernel equal
  to fastntk's ``mode="trace_mean"`` (``mode="trace"`` is the sum, O times larger);
* with ``trace_axes=()`` and outputs (N, S1, ..., Sd) it interleaves the output axes,
  (N1, N2, S1, S1, ..., Sd, Sd); for vector outputs (d = 1) that is fastntk's full (N1, N2, O, O)
  exactly, for d > 1 fastntk's O is S1·...·Sd flattened in C order.

Every function accepts a torch tensor or a numpy array (a ``np.memmap`` included) and returns the
same kind, with the same dtype (it reorders entries, it computes nothing).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np
import torch

from ._errors import InputError

Array = Any
"""A tensor or a numpy array (an ``np.memmap`` included)."""


def _array(x: Array, name: str) -> torch.Tensor | np.ndarray:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return np.asarray(x)  # a memmap as a plain view of it
    raise InputError(f"{name} is a {type(x).__name__}: give a torch tensor or a numpy array")


def _permute(x: torch.Tensor | np.ndarray, order: Sequence[int]) -> torch.Tensor | np.ndarray:
    return x.permute(*order) if isinstance(x, torch.Tensor) else x.transpose(order)


def kernel_outputs(kernel: Array, name: str = "kernel") -> int | None:
    """O of a full kernel (N1, N2, O, O); None for a traced one (N1, N2).

    Args:
        kernel: a kernel as fastntk returns it.
        name: what to call it in an error message.

    Returns:
        The number of outputs O, or None when the kernel is traced.

    Raises:
        InputError: any other shape, e.g. a "diagonal" kernel (N1, N2, O), which is not a
            linear operator on the outputs.
    """
    shape = tuple(kernel.shape)
    if len(shape) == 2:
        return None
    if len(shape) == 4 and shape[2] == shape[3]:
        return int(shape[2])
    raise InputError(
        f"{name} has shape {shape}: give a full kernel (N1, N2, O, O) or a traced one (N1, N2), as fastntk.ntk "
        "returns them ('diagonal' kernels (N1, N2, O) are not a linear operator on the outputs: use mode='full' "
        "or 'trace', or sum a diagonal kernel over its last axis, which is the 'trace' kernel)"
    )


def to_matrix(kernel: Array) -> torch.Tensor | np.ndarray:
    """A kernel as a 2-D matrix, sample-major: full (N1, N2, O, O) -> (N1·O, N2·O), entry
    [n·O + a, m·O + b] = k[n, m, a, b]; a traced kernel (N1, N2) as it is.

    Args:
        kernel: (N1, N2, O, O) or (N1, N2), a tensor or a numpy array.

    Returns:
        The matrix, of the kernel's kind and dtype (a copy for a full kernel).

    Raises:
        InputError: a kernel of another shape (see :func:`kernel_outputs`).

    Example:
        >>> import torch, fastntk
        >>> k = torch.arange(16.0).reshape(2, 2, 2, 2)
        >>> m = fastntk.layout.to_matrix(k)
        >>> m.shape, bool(m[1 * 2 + 0, 0 * 2 + 1] == k[1, 0, 0, 1])
        (torch.Size([4, 4]), True)
    """
    k = _array(kernel, "kernel")
    outputs = kernel_outputs(k)
    if outputs is None:
        return k
    n1, n2 = k.shape[:2]
    return _permute(k, (0, 2, 1, 3)).reshape(n1 * outputs, n2 * outputs)


def from_matrix(matrix: Array, outputs: int) -> torch.Tensor | np.ndarray:
    """The inverse of :func:`to_matrix`: (N1·O, N2·O) sample-major -> (N1, N2, O, O).

    Args:
        matrix: a 2-D matrix whose sides are multiples of ``outputs``.
        outputs: O.

    Returns:
        The full kernel (N1, N2, O, O), of the matrix's kind and dtype.

    Raises:
        InputError: a matrix that is not 2-D, or whose sides are not multiples of O.
    """
    m = _array(matrix, "matrix")
    if not (isinstance(outputs, numbers.Integral) and outputs >= 1):
        raise InputError(f"outputs={outputs!r}: give the number of outputs O, an integer >= 1")
    outputs = int(outputs)
    if m.ndim != 2 or m.shape[0] % outputs or m.shape[1] % outputs:
        raise InputError(f"matrix has shape {tuple(m.shape)}: give a 2-D matrix (N1·O, N2·O) with O = {outputs}")
    rows, columns = m.shape[0] // outputs, m.shape[1] // outputs
    return _permute(m.reshape(rows, outputs, columns, outputs), (0, 2, 1, 3))


def to_vector(targets: Array) -> torch.Tensor | np.ndarray:
    """Targets (N, O) as one vector (N·O,) in the rows' order of :func:`to_matrix`: entry n·O + a
    is targets[n, a] (``targets.reshape(-1)``); a vector (N,) as it is.

    Args:
        targets: (N, O) or (N,).

    Returns:
        The vector (N·O,), of the targets' kind and dtype.

    Raises:
        InputError: targets of another number of dimensions.
    """
    y = _array(targets, "targets")
    if y.ndim not in (1, 2):
        raise InputError(f"targets have shape {tuple(y.shape)}: give (N, O) or (N,)")
    return y.reshape(-1)


def from_vector(vector: Array, outputs: int) -> torch.Tensor | np.ndarray:
    """The inverse of :func:`to_vector`: (N·O,) -> (N, O).

    Args:
        vector: (N·O,), sample-major.
        outputs: O.

    Returns:
        The targets (N, O), of the vector's kind and dtype.

    Raises:
        InputError: a vector that is not 1-D or whose length is not a multiple of O.
    """
    v = _array(vector, "vector")
    if not (isinstance(outputs, numbers.Integral) and outputs >= 1):
        raise InputError(f"outputs={outputs!r}: give the number of outputs O, an integer >= 1")
    outputs = int(outputs)
    if v.ndim != 1 or v.shape[0] % outputs:
        raise InputError(f"vector has shape {tuple(v.shape)}: give a 1-D vector (N·O,) with O = {outputs}")
    return v.reshape(-1, outputs)


def from_neural_tangents(kernel: Array) -> torch.Tensor | np.ndarray:
    """A neural-tangents empirical kernel in fastntk's layout.

    * ``trace_axes=()``, outputs (N, S1, ..., Sd): (N1, N2, S1, S1, ..., Sd, Sd) -> fastntk's full
      (N1, N2, O, O), O = S1·...·Sd (C order); for vector outputs this is the identity.
    * the default ``trace_axes=(-1,)`` with vector outputs: (N1, N2), returned as it is — it is
      fastntk's ``mode="trace_mean"`` (multiply by O for ``mode="trace"``).

    Kernels traced over only some output axes (e.g. the channels of an image output) have no
    fastntk mode: compute them with ``trace_axes=()``, or with fastntk directly.

    Args:
        kernel: neural-tangents' kernel (a jax array converted with ``np.asarray``, or a tensor).

    Returns:
        The kernel in fastntk's layout, of the input's kind and dtype.

    Raises:
        InputError: a kernel whose output axes do not come in pairs of equal sizes.
    """
    k = _array(kernel, "kernel")
    if k.ndim == 2:
        return k
    pairs = (k.ndim - 2) // 2
    sizes = k.shape[2:]
    if k.ndim % 2 or any(sizes[2 * i] != sizes[2 * i + 1] for i in range(pairs)):
        raise InputError(
            f"kernel has shape {tuple(k.shape)}: a neural-tangents kernel with trace_axes=() has shape "
            "(N1, N2, S1, S1, ..., Sd, Sd), and with the default trace_axes=(-1,) of vector outputs (N1, N2)"
        )
    first, second = [2 + 2 * i for i in range(pairs)], [3 + 2 * i for i in range(pairs)]
    outputs = math.prod(sizes[::2])
    return _permute(k, (0, 1, *first, *second)).reshape(k.shape[0], k.shape[1], outputs, outputs)


def to_neural_tangents(kernel: Array, output_shape: Sequence[int] | None = None) -> torch.Tensor | np.ndarray:
    """A fastntk kernel in neural-tangents' layout, the inverse of :func:`from_neural_tangents`.

    A full kernel (N1, N2, O, O) becomes neural-tangents' ``trace_axes=()`` kernel: itself for
    vector outputs, (N1, N2, S1, S1, ..., Sd, Sd) for ``output_shape`` (S1, ..., Sd) (a model's
    output shape without the batch axis, with S1·...·Sd = O). A traced kernel is returned as it
    is: one of ``mode="trace_mean"`` is neural-tangents' default ``trace_axes=(-1,)`` kernel.

    Args:
        kernel: (N1, N2, O, O) or (N1, N2).
        output_shape: the shape of one sample's output; None: (O,).

    Returns:
        The kernel in neural-tangents' layout, of the input's kind and dtype.

    Raises:
        InputError: a kernel of another shape, or an ``output_shape`` with another number of entries.
    """
    k = _array(kernel, "kernel")
    outputs = kernel_outputs(k)
    if outputs is None:
        if output_shape is not None:
            raise InputError("output_shape is for full kernels (N1, N2, O, O): a traced kernel has no output axes")
        return k
    shape = (outputs,) if output_shape is None else tuple(int(s) for s in output_shape)
    if math.prod(shape) != outputs:
        raise InputError(f"output_shape={shape} has {math.prod(shape)} entries but the kernel O = {outputs}")
    d = len(shape)
    interleaved = [axis for i in range(d) for axis in (2 + i, 2 + d + i)]
    return _permute(k.reshape(k.shape[0], k.shape[1], *shape, *shape), (0, 1, *interleaved))
