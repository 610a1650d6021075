"""Predictions from a kernel: kernel ridge regression, the mean of a network trained by gradient
descent on MSE (at any time t, and t = ∞), Gaussian-process inference, the largest stable
learning rate. Names and conventions follow neural-tangents' ``predict`` where they fit.

Kernels come from :func:`fastntk.ntk` or :func:`fastntk.gram` (tensors, numpy arrays, the
``np.memmap`` of a ``.npy`` file):

* "full" kernels (N1, N2, O, O) with targets (N, O): one (N·O) x (N·O) system, sample-major;
* traced kernels (N1, N2) ("trace", "trace_mean", or one output) with targets (N,) or (N, O):
  every output column is predicted with the same kernel (outputs independent).

Everything is computed in float64 (eigh and Cholesky), whatever the kernel's dtype. The loss of
:func:`gradient_descent_mse` and :func:`max_learning_rate` is neural-tangents':
L(θ) = ‖f(X) − Y‖² / (2·|Y|), |Y| the number of target entries, so gradient flow with learning
rate η moves the training outputs as df/dt = −(η / |Y|) Θ (f − Y).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from . import layout
from ._errors import InputError, NonFiniteError

Array = Any
"""A tensor or a numpy array (an ``np.memmap`` included)."""


class KernelError(InputError):
    """A kernel that cannot be solved with: not symmetric, not positive semi-definite, or singular."""


@dataclass(frozen=True)
class Gaussian:
    """A posterior: ``mean`` (N_test, ...) and ``covariance`` (N_test, N_test[, O, O]) or None."""

    mean: torch.Tensor
    covariance: torch.Tensor | None


@dataclass(frozen=True)
class _System:
    """A kernel as a 2-D float64 matrix over (sample, output) pairs, and how to map targets to its
    rows and back."""

    matrix: torch.Tensor
    outputs: int | None
    """O for a full kernel (rows are sample-major (n, a)); None for a traced one."""

    def rows(self, y: torch.Tensor, name: str, n: int) -> torch.Tensor:
        """Targets (N, O) or (N,) as the system's right-hand sides: (N·O, 1) full, (N, O or 1) traced."""
        if y.shape[0] != n:
            raise InputError(f"{name} has {y.shape[0]} samples but the kernel {n}: give one target row per sample")
        if self.outputs is not None:
            if y.dim() != 2 or y.shape[1] != self.outputs:
                raise InputError(f"{name} has shape {tuple(y.shape)}; a full kernel of O={self.outputs} outputs needs targets ({n}, {self.outputs})")
            return layout.to_vector(y)[:, None]
        if y.dim() not in (1, 2):
            raise InputError(f"{name} has shape {tuple(y.shape)}: give targets (N,) or (N, O)")
        return y.reshape(n, -1)

    def back(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Right-hand sides back in the targets' shape (N', O) or (N',)."""
        if self.outputs is not None:
            return layout.from_vector(rows.reshape(-1), self.outputs)
        return rows.reshape(-1) if like.dim() == 1 else rows


def _tensor(x: Array, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.float64))  # a copy: memmaps are read-only
    t = t.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{name} holds NaN or inf: it cannot be solved with")
    return t


def _matrix(k: torch.Tensor, name: str, square: bool) -> tuple[torch.Tensor, int | None]:
    """A kernel (N1, N2[, O, O]) as a 2-D matrix (N1[·O], N2[·O]) (:func:`fastntk.layout.to_matrix`) and its O (None when traced)."""
    outputs = layout.kernel_outputs(k, name)
    matrix = layout.to_matrix(k)
    if square and matrix.shape[0] != matrix.shape[1]:
        raise InputError(f"{name} has shape {tuple(k.shape)}: the train-train kernel must be square, K(x_train, x_train)")
    return matrix, outputs


def _train_system(k_train_train: Array, ridge: float) -> _System:
    if not (isinstance(ridge, numbers.Real) and math.isfinite(ridge) and ridge >= 0):
        raise InputError(f"ridge={ridge!r}: give a finite number >= 0 (added to the kernel's diagonal)")
    ridge = float(ridge)
    matrix, outputs = _matrix(_tensor(k_train_train, "k_train_train"), "k_train_train", square=True)
    matrix = _symmetric(matrix, "k_train_train", "K(x_train, x_train) itself, e.g. fastntk.ntk(model, x_train)")
    if ridge:
        matrix = matrix + ridge * torch.eye(matrix.shape[0], dtype=matrix.dtype)
    return _System(matrix, outputs)


def _symmetric(matrix: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """(K + Kᵀ) / 2 of a square matrix, refused when K is not symmetric up to rounding; ``what``
    names the kernel to pass instead."""
    scale = float(matrix.abs().max()) if matrix.numel() else 0.0
    asymmetry = float((matrix - matrix.T).abs().max()) if matrix.numel() else 0.0
    if asymmetry > 1e-6 * (scale or 1.0):
        raise KernelError(
            f"{name} is not symmetric (max |K - Kᵀ| = {asymmetry:.3g}, {asymmetry / scale:.2g} of its largest entry): pass {what}"
        )
    return (matrix + matrix.T) / 2


def _nonnegative(values: torch.Tensor, name: str, fix: str) -> torch.Tensor:
    """Eigenvalues (any order) of a kernel that must be PSD, refused when clearly not; the tiny
    negatives of rounding set to 0. ``fix`` says what to do instead."""
    if not values.numel():
        return values
    smallest, largest = float(values.min()), float(values.max())
    floor = -math.sqrt(torch.finfo(torch.float32).eps) * max(abs(largest), 1e-300)
    if smallest < floor:
        raise KernelError(
            f"{name} is not positive semi-definite: smallest eigenvalue {smallest:.4g}, largest {largest:.4g}; "
            f"an eNTK K(x, x) is PSD up to rounding: compute it in float64 (dtype=torch.float64){fix}"
        )
    return values.clamp(min=0)


def _spectrum(system: _System) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of the train kernel, refused when clearly not PSD."""
    values, vectors = torch.linalg.eigh(system.matrix)
    return _nonnegative(values, "k_train_train", ", or pass a ridge larger than minus its smallest eigenvalue"), vectors


def _solver(system: _System) -> Callable[[torch.Tensor], torch.Tensor]:
    """Solve K z = b by Cholesky, refusing a singular K with its smallest eigenvalue and condition number."""
    factor, info = torch.linalg.cholesky_ex(system.matrix)
    values = None
    if int(info) == 0:
        diagonal = factor.diagonal()
        condition = float((diagonal.max() / diagonal.min()) ** 2) if diagonal.numel() else 1.0
        if condition < 1 / torch.finfo(torch.float64).eps:
            return lambda b: torch.cholesky_solve(b, factor)
    values = torch.linalg.eigvalsh(system.matrix)
    _nonnegative(values, "k_train_train (+ ridge)", ", or pass a ridge larger than minus its smallest eigenvalue")
    smallest, largest = float(values[0]), float(values[-1])
    condition = largest / smallest if smallest > 0 else math.inf
    suggested = max(max(largest, 1e-300) * 1e-6, -10 * smallest)
    raise KernelError(
        f"k_train_train (+ ridge) is singular or too ill-conditioned to solve with: smallest eigenvalue {smallest:.4g}, "
        f"largest {largest:.4g}, condition number {condition:.3g}; pass ridge > 0 (e.g. ridge={suggested:.2g}, "
        "1e-6 of the largest eigenvalue or 10 times minus the smallest, whichever is larger)"
    )


def _cross(k_test_train: Array, system: _System, n_train: int) -> torch.Tensor:
    matrix, outputs = _matrix(_tensor(k_test_train, "k_test_train"), "k_test_train", square=False)
    if outputs != system.outputs or matrix.shape[1] != system.matrix.shape[1]:
        raise InputError(
            f"k_test_train has shape {tuple(_tensor(k_test_train, 'k_test_train').shape)}: it must be K(x_test, x_train) "
            f"of the same mode as k_train_train ({n_train} training samples)"
        )
    return matrix


def kernel_ridge(k_train_train: Array, y_train: Array, k_test_train: Array | None = None, *, ridge: float = 0.0) -> torch.Tensor:
    """Kernel ridge regression: K(x_test, X) (K(X, X) + ridge·I)⁻¹ Y.

    Args:
        k_train_train: K(X, X), (N, N, O, O) or (N, N).
        y_train: targets (N, O), or (N,) with a traced kernel.
        k_test_train: K(x_test, X), same mode; None predicts on the training points.
        ridge: added to the kernel's diagonal (absolute units).

    Returns:
        Predictions (N_test, O) (or (N_test,)), float64.

    Raises:
        KernelError: a kernel that is not symmetric or is singular (with its smallest eigenvalue
            and condition number); InputError: shapes that do not match.
    """
    system = _train_system(k_train_train, ridge)
    y = _tensor(y_train, "y_train")
    n = system.matrix.shape[0] // (system.outputs or 1)
    rhs = system.rows(y, "y_train", n)
    solve = _solver(system)
    weights = solve(rhs)
    cross = system.matrix - (ridge * torch.eye(system.matrix.shape[0], dtype=torch.float64) if ridge else 0) if k_test_train is None else _cross(k_test_train, system, n)
    return system.back(cross @ weights, y)


def gp_inference(
    k_train_train: Array, y_train: Array, k_test_train: Array, k_test_test: Array | None = None, *, ridge: float = 0.0
) -> Gaussian:
    """The Gaussian-process posterior at the test points, with NNGP or NTK kernels.

    mean = K_*X (K_XX + ridge·I)⁻¹ Y; covariance = K_** − K_*X (K_XX + ridge·I)⁻¹ K_X* (when
    ``k_test_test`` is given; ridge is the observation noise variance).

    Args:
        k_train_train: K(X, X), (N, N, O, O) or (N, N).
        y_train: targets (N, O), or (N,) with a traced kernel.
        k_test_train: K(x_test, X), same mode.
        k_test_test: K(x_test, x_test), same mode, or None for the mean only.
        ridge: the observation noise variance, added to the kernel's diagonal.

    Returns:
        :class:`Gaussian`: mean (N_test, O) or (N_test,); covariance (N_test, N_test, O, O) for
        full kernels, (N_test, N_test) for traced ones, or None.

    Raises:
        KernelError: a kernel that is not symmetric or is singular (with its smallest eigenvalue
            and condition number); InputError: shapes that do not match.
    """
    system = _train_system(k_train_train, ridge)
    y = _tensor(y_train, "y_train")
    n = system.matrix.shape[0] // (system.outputs or 1)
    solve = _solver(system)
    cross = _cross(k_test_train, system, n)
    mean = system.back(cross @ solve(system.rows(y, "y_train", n)), y)
    if k_test_test is None:
        return Gaussian(mean, None)
    prior, outputs = _matrix(_tensor(k_test_test, "k_test_test"), "k_test_test", square=True)
    if outputs != system.outputs or prior.shape[0] != cross.shape[0]:
        raise InputError("k_test_test must be K(x_test, x_test) of the same mode and test points as k_test_train")
    covariance = prior - cross @ solve(cross.T)
    covariance = (covariance + covariance.T) / 2
    if outputs is not None:
        covariance = layout.from_matrix(covariance, outputs)
    return Gaussian(mean, covariance)


def gradient_descent_mse(
    k_train_train: Array, y_train: Array, *, learning_rate: float = 1.0, ridge: float = 0.0
) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """The mean outputs of a (linearised) network trained by gradient flow on MSE, at any time.

    On the training points f_t = Y + e^{−ηΘt/|Y|}(f_0 − Y); on test points
    f_t(x) = f_0(x) + Θ(x, X) Θ⁻¹ (I − e^{−ηΘt/|Y|}) (Y − f_0), with Θ = K(X, X) + ridge·I, by
    one eigendecomposition (made here, reused by every call). t = ∞ gives the kernel
    regression solution, with Θ's eigenvalues below √eps·λ_max (eps of float64) taken as 0
    (a pseudo-inverse: the residual's components along them keep their value at t = 0).

    Args:
        k_train_train: Θ(X, X), (N, N, O, O) or (N, N).
        y_train: targets (N, O), or (N,) with a traced kernel.
        learning_rate: η.
        ridge: added to the kernel's diagonal.

    Returns:
        ``predict(t, f0_train=None, f0_test=None, k_test_train=None) -> (f_train_t, f_test_t)``:
        t a float (``math.inf`` allowed); f0 the network's outputs at initialisation (None:
        zeros); ``f_test_t`` is None without ``k_test_train``.

    Raises:
        KernelError: a kernel that is not symmetric or not positive semi-definite (with its
            smallest eigenvalue).
    """
    if not (isinstance(learning_rate, numbers.Real) and learning_rate > 0 and math.isfinite(learning_rate)):
        raise InputError(f"learning_rate={learning_rate!r}: give a positive number")
    learning_rate = float(learning_rate)
    system = _train_system(k_train_train, ridge)
    y = _tensor(y_train, "y_train")
    n = system.matrix.shape[0] // (system.outputs or 1)
    targets = system.rows(y, "y_train", n)
    values, vectors = _spectrum(system)
    rate = learning_rate / y.numel()
    top = float(values[-1]) if values.numel() else 0.0
    null = values <= math.sqrt(torch.finfo(torch.float64).eps) * max(top, 1e-300)

    def predict(t: float, f0_train: Array | None = None, f0_test: Array | None = None, k_test_train: Array | None = None):
        if not (isinstance(t, numbers.Real) and t >= 0):
            raise InputError(f"t={t!r}: give a number >= 0, the time (math.inf for the end of training)")
        t = float(t)
        f0 = torch.zeros_like(targets) if f0_train is None else system.rows(_tensor(f0_train, "f0_train"), "f0_train", n)
        residual = vectors.T @ (f0 - targets)  # in the eigenbasis
        if math.isinf(t):
            decay = torch.where(null, torch.ones_like(values), torch.zeros_like(values))
            gain = torch.where(null, torch.zeros_like(values), 1 / values.clamp(min=1e-300))
        else:
            decay = torch.exp(-rate * values * t)
            positive = values > 0  # (1 − e^{−rλt}) / λ, exact for every λ > 0; its limit r·t at λ = 0
            gain = torch.where(positive, -torch.expm1(-rate * values * t) / values.clamp(min=1e-300), torch.full_like(values, rate * t))
        f_train = system.back(targets + vectors @ (decay[:, None] * residual), y)
        if k_test_train is None:
            return f_train, None
        cross = _cross(k_test_train, system, n)
        start = torch.zeros(cross.shape[0], targets.shape[1], dtype=torch.float64)
        if f0_test is not None:
            start = system.rows(_tensor(f0_test, "f0_test"), "f0_test", cross.shape[0] // (system.outputs or 1))
        f_test = start - cross @ (vectors @ (gain[:, None] * residual))
        return f_train, system.back(f_test, y)

    return predict


def max_learning_rate(k_train_train: Array, *, y_train_size: int | None = None, momentum: float = 0.0) -> float:
    """The largest learning rate for which gradient descent on MSE (the loss above, full batch)
    converges on the linearised network: 2·(1 + momentum)·|Y| / λ_max(Θ).

    Args:
        k_train_train: Θ(X, X), (N, N, O, O) or (N, N).
        y_train_size: |Y|, the number of target entries (default: the kernel's rows, N·O for a
            full kernel, N for a traced one).
        momentum: the optimiser's momentum.

    Returns:
        The learning rate η, a float.

    Raises:
        KernelError: a kernel that is not symmetric, or has no positive eigenvalue.
    """
    system = _train_system(k_train_train, 0.0)
    largest = float(torch.linalg.eigvalsh(system.matrix)[-1])
    if largest <= 0:
        raise KernelError(f"k_train_train has no positive eigenvalue (largest {largest:.4g}): every learning rate is stable")
    size = system.matrix.shape[0] if y_train_size is None else int(y_train_size)
    return 2 * (1 + momentum) * size / largest
