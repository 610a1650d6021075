r"""Matrix-free: the NTK Θ(x1, x2) as a linear operator on the flattened N·O output space.

``NTKOperator(model, x1, x2) @ v`` is Θ v = J(x1) (J(x2)ᵀ v) without Θ: a vector-Jacobian
product over the blocks of x2 (g = J(x2)ᵀ v, shaped like the parameters), then a
Jacobian-vector product over the blocks of x1 (J(x1) g). Memory: the parameter-shaped g of
each column and one block's activations, never N1·N2·O² numbers. Rows and columns are in
sample-major order, index n·O + a, the order of a full kernel K (N1, N2, O, O) laid out as
``K.permute(0, 2, 1, 3).reshape(N1 * O, N2 * O)``.

Around it, the solvers that need only products (scipy's, through :meth:`NTKOperator.to_scipy`):
:func:`solve` (conjugate gradients for kernel regression), :func:`top_eigenvalues` (Lanczos)
and :func:`trace_estimate` (Hutchinson, Hutch++). The conventions are curvlinops': ``@`` on
torch tensors (N2·O,) or (N2·O, K), ``.adjoint()``, ``.to_scipy()``, ``.shape``, ``.dtype``,
``.device``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.func import jvp, vjp, vmap

from ._api import NTKFunction
from ._errors import FastNTKError, InputError, NonFiniteError, OptionError
from ._functional import FunctionalModel, ParamSelection, Params, activation_bytes
from ._inputs import Batch, all_finite, take
from ._options import is_positive_int, options_of
from ._problem import Problem
from ._process import quiet_fallbacks
from ._torch_private import pytree
from .blocks.budget import DEFAULT_MAX_MEMORY, INPUT_COPIES, OUTPUT_COPIES, format_bytes
from .methods.jacobian import jacobian_bytes, per_sample_jacobians
from .methods.per_sample import or_on_composite_kernels
from .methods.vp import VPMethod, forward_mode_kernels

PARAMETER_COPIES = 3
"""Parameter-shaped numbers held per column: the accumulated g, one block's VJP and the tangent copies."""


class ConvergenceError(FastNTKError, RuntimeError):
    """An iterative solver that stopped before reaching its tolerance.

    Attributes:
        iterations: iterations run.
        residual: the relative residual ‖y − (Θ + ridge·I) α‖ / ‖y‖ reached.
    """

    def __init__(self, message: str, iterations: int, residual: float) -> None:
        super().__init__(message)
        self.iterations, self.residual = iterations, residual


class NTKOperator:
    r"""Θ(x1, x2) as a linear operator of shape (N1·O, N2·O), applied without forming it.

    ``op @ v`` costs one reverse pass over x2 and one forward-mode pass over x1 per column of
    v (columns are batched with vmap); models whose operations lack forward-mode AD
    (weight_norm, EmbeddingBag, ...) get J(x1) g from a double VJP, J g = ∂/∂u [(Jᵀu)·g],
    or, where even that is missing, from per-sample Jacobian rows. Θ is that of the
    parameters at construction: build a new operator after training the model (the operator
    holds detached views of them, copies under a ``dtype`` cast, and is not differentiable).

    Args:
        model: any ``nn.Module``, as for :func:`fastntk.ntk`.
        x1: N1 samples (rows), in any form :func:`fastntk.ntk` takes.
        x2: N2 samples (columns), or None for Θ(x1, x1) (then the operator is symmetric).
        params: as for :func:`fastntk.ntk`.
        dtype: as for :func:`fastntk.ntk`; products are computed in it.
        block_size: samples per block of x1 and of x2; default: as many as ``max_memory`` holds.
        max_memory: bytes a product may hold (its parameter-shaped vectors, one block's
            inputs, activations and outputs), as for :func:`fastntk.ntk`.
        check: as for :func:`fastntk.ntk`; also checks every product is finite.

    Attributes:
        shape: (N1·O, N2·O).
        num_outputs: O.

    Raises:
        InputError: inputs that do not fit the model (as :func:`fastntk.ntk`).
        OptionError: a bad option value.
        ModelError: a model whose per-sample NTK is not defined (as :func:`fastntk.ntk`).

    Example:
        >>> import torch, fastntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> op = fastntk.NTKOperator(net, torch.randn(5, 3))
        >>> op.shape
        (10, 10)
        >>> (op @ torch.ones(10)).shape
        torch.Size([10])
    """

    def __init__(
        self,
        model: nn.Module,
        x1: Any,
        x2: Any = None,
        *,
        params: ParamSelection = None,
        dtype: torch.dtype | None = None,
        block_size: int | None = None,
        max_memory: int | str = DEFAULT_MAX_MEMORY,
        check: bool = True,
    ) -> None:
        given = dict(mode="full", params=params, dtype=dtype, block_size=block_size, max_memory=max_memory, check=check)
        options = options_of(given, stacklevel=2)
        problem = NTKFunction(model, options)._problem(x1, x2)
        f = problem.f
        forward = VPMethod(f, "full", problem.num_outputs).unsupported(take(problem.probe1, 0, 1)) is None
        self._setup(problem, _Pushes(forward), activation_bytes(f, problem.probe1))

    def _setup(self, problem: Problem, pushes: "_Pushes", activations: int) -> None:
        self._problem, self._pushes, self._activations = problem, pushes, activations
        self.num_outputs = problem.num_outputs
        self.shape = (problem.n1 * self.num_outputs, problem.n2 * self.num_outputs)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype products are computed and returned in."""
        return self._problem.f.dtype

    @property
    def device(self) -> torch.device:
        """The model's device, where products are computed and returned."""
        return self._problem.f.device

    @property
    def symmetric(self) -> bool:
        """Whether this is Θ(x, x) (built with x2=None): symmetric positive semi-definite."""
        return self._problem.symmetric

    def adjoint(self) -> "NTKOperator":
        """Θ(x2, x1) = Θ(x1, x2)ᵀ, sharing this operator's model view (itself when x2 is None)."""
        if self.symmetric:
            return self
        p = self._problem
        swapped = dataclasses.replace(p, x1=p.x2, x2=p.x1, probe1=p.probe2, probe2=p.probe1)
        other = object.__new__(NTKOperator)
        other._setup(swapped, self._pushes, self._activations)
        return other

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        """Θ v for v (N2·O,) or (N2·O, K), in this operator's dtype and on its device.

        Raises:
            InputError: v not a floating tensor of one of those shapes.
            NonFiniteError: v, or a product, that is NaN or inf (with ``check``).
        """
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise InputError(f"NTKOperator @ v needs a floating torch.Tensor, got {type(v).__name__}: for numpy arrays use op.to_scipy()")
        n = self.shape[1]
        if v.dim() not in (1, 2) or v.shape[0] != n:
            raise InputError(
                f"v has shape {tuple(v.shape)}: the operator is {self.shape[0]}x{n} (N·O in sample-major order, index n·O + a), "
                f"so give ({n},) or ({n}, K)"
            )
        matrix = v.detach().to(self.device, self.dtype).reshape(n, -1)
        if self._problem.options.check and not all_finite(matrix):
            raise NonFiniteError(f"v holds NaN or inf (in {self.dtype}): Θ v would too; give a finite vector")
        out = self._matmat(matrix)
        if self._problem.options.check and not all_finite(out):
            raise NonFiniteError("Θ v contains NaN or inf although v, the inputs and the parameters are finite: the model's derivatives overflow; try dtype=torch.float64")
        return out.reshape(-1) if v.dim() == 1 else out

    def __rmatmul__(self, v: torch.Tensor) -> torch.Tensor:
        """vᵀ Θ for v (N1·O,) or (K, N1·O): (Θᵀ vᵀ)ᵀ."""
        if isinstance(v, torch.Tensor) and v.dim() == 2:
            return (self.adjoint() @ v.T).T
        return self.adjoint() @ v

    def __repr__(self) -> str:
        return f"NTKOperator(shape={self.shape}, O={self.num_outputs}, dtype={self.dtype}, device={self.device})"

    def to_scipy(self) -> Any:
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` on float64 numpy arrays
        (products still run in torch, in this operator's dtype and device), for scipy's
        ``cg``, ``eigsh``, ``lsqr``...

        Raises:
            ImportError: scipy is missing (``pip install 'fastntk[scipy]'``).
        """
        linalg = scipy_linalg()

        def product(op: NTKOperator) -> Callable[[np.ndarray], np.ndarray]:
            return lambda x: (op @ torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).cpu().double().numpy()

        return linalg.LinearOperator(
            self.shape, matvec=product(self), matmat=product(self), rmatvec=product(self.adjoint()), rmatmat=product(self.adjoint()), dtype=np.float64
        )

    # --- the products ---------------------------------------------------------------------

    def _matmat(self, v: torch.Tensor) -> torch.Tensor:
        """Θ v for v (N2·O, K): the columns in chunks whose parameter-shaped g fits half the budget."""
        f, o = self._problem.f, self.num_outputs
        k = v.shape[1]
        column_bytes = PARAMETER_COPIES * f.num_params * f.dtype.itemsize
        chunk = max(1, min(k, self._problem.options.max_memory // 2 // max(1, column_bytes)))
        out = torch.empty(self.shape[0], k, dtype=f.dtype, device=f.device)
        for start in range(0, k, chunk):
            stop = min(k, start + chunk)
            with torch.enable_grad(), quiet_fallbacks():  # a caller's no_grad would drop the graph fused kernels keep (oneDNN's LSTM)
                g = self._pull(v[:, start:stop].reshape(self._problem.n2, o, stop - start))
                out[:, start:stop] = self._push(g)
        return out

    def _block(self, n: int, columns: int, extra: int = 0) -> int:
        """Samples per block for products of ``columns`` columns (``extra``: bytes per sample beyond
        inputs, activations and outputs)."""
        p, f = self._problem, self._problem.f
        if p.options.block_size:
            return p.options.block_size
        held = PARAMETER_COPIES * columns * f.num_params * f.dtype.itemsize
        per_sample = INPUT_COPIES * p.input_bytes + (1 + 2 * columns) * self._activations + OUTPUT_COPIES * columns * self.num_outputs * f.dtype.itemsize + extra
        room = p.options.max_memory - held
        if room < per_sample:
            raise OptionError(
                f"max_memory={format_bytes(p.options.max_memory)} is too small: a product holds {format_bytes(held)} of "
                f"parameter-shaped vectors and one sample needs {format_bytes(per_sample)}; pass max_memory={held + per_sample} "
                "or more, or differentiate fewer parameters (params=)"
            )
        return max(1, min(n, room // per_sample))

    def _pull(self, v: torch.Tensor) -> Params:
        """g = J(x2)ᵀ v for v (N2, O, K): a dict name -> (K, *parameter shape), summed over blocks of x2."""
        p, f = self._problem, self._problem.f
        n, k = p.n2, v.shape[2]
        block = self._block(n, k)
        g = {name: torch.zeros((k, *t.shape), dtype=t.dtype, device=t.device) for name, t in f.primals.items()}
        for start in range(0, n, block):
            stop = min(n, start + block)
            x = p.load(2, start, stop)
            _, pullback = vjp(lambda q: f(q, x), f.primals)
            cotangents = v[start:stop].permute(2, 0, 1)  # (K, b, O)
            grads = self._pushes.columns(lambda u: pullback(u)[0], cotangents)
            for name, value in grads.items():
                g[name] += value
        return g

    def _push(self, g: Params) -> torch.Tensor:
        """J(x1) g for g a dict name -> (K, *parameter shape): (N1·O, K), block by block of x1."""
        p, f, o = self._problem, self._problem.f, self.num_outputs
        n, k = p.n1, next(iter(g.values())).shape[0]
        extra = jacobian_bytes(f, o) if self._pushes.how == "rows" else 0
        block = self._block(n, k, extra)
        out = torch.empty(n * o, k, dtype=f.dtype, device=f.device)
        for start in range(0, n, block):
            stop = min(n, start + block)
            value = self._pushes.push(f, p.load(1, start, stop), g)  # (K, b, O)
            out[start * o : stop * o] = value.permute(1, 2, 0).reshape(-1, k)
        return out


class _Pushes:
    """How J(x) g is computed for this model (learnt once, shared with the adjoint): "forward"
    mode, a "double" VJP where forward mode is missing, or Jacobian "rows" where double
    backward is missing too; and whether vmap can batch the columns."""

    def __init__(self, forward: bool) -> None:
        self.how = "forward" if forward else "double"
        self.batched = True

    def columns(self, product: Callable[[Any], Any], inputs: Any) -> Any:
        """``product`` of each column (dim 0 of every leaf of ``inputs``), vmapped; one by one
        should vmap fail on this model's backward (e.g. recurrent layers)."""
        if self.batched:
            try:
                return vmap(product)(inputs)
            except (torch.OutOfMemoryError, NotImplementedError):
                raise
            except Exception:  # noqa: BLE001 - any other failure under vmap is vmap's: loop the columns
                self.batched = False
        k = pytree.tree_leaves(inputs)[0].shape[0]
        results = [pytree.tree_flatten(product(pytree.tree_map(lambda t: t[i], inputs))) for i in range(k)]
        return pytree.tree_unflatten([torch.stack(ts) for ts in zip(*(leaves for leaves, _ in results))], results[0][1])

    def push(self, f: FunctionalModel, x: Batch, g: Params) -> torch.Tensor:
        """J(x) g: (K, b, O) for g a dict name -> (K, *parameter shape)."""
        if self.how == "forward":
            try:
                with forward_mode_kernels():
                    return or_on_composite_kernels(lambda: self.columns(lambda t: jvp(lambda q: f(q, x), (f.primals,), (t,))[1], g))
            except NotImplementedError:  # an op the first sample's probe did not reach: reverse mode twice
                self.how = "double"
        if self.how == "double":
            try:
                out, pullback = vjp(lambda q: f(q, x), f.primals)
                _, transpose = vjp(lambda u: pullback(u)[0], torch.zeros_like(out))  # u -> Jᵀu is linear: its VJP is J
                return self.columns(lambda t: transpose(t)[0], g)
            except (NotImplementedError, RuntimeError) as exc:  # an op without a double backward (EmbeddingBag): Jacobian rows
                if not missing_derivative(exc):
                    raise
                self.how = "rows"
        rows = per_sample_jacobians(f, x)  # name -> (b, O, *p)
        return sum(torch.einsum("bop,kp->kbo", rows[name].flatten(2), t.flatten(1)) for name, t in g.items())


def missing_derivative(exc: BaseException) -> bool:
    """Whether autograd lacks a derivative formula: a NotImplementedError, or the RuntimeError
    "derivative for <op> is not implemented" of ops whose backward has no backward (e.g. CPU
    flash attention's, which float32 ``scaled_dot_product_attention`` runs)."""
    message = str(exc)
    return isinstance(exc, NotImplementedError) or ("derivative for" in message and "not implemented" in message)


def scipy_linalg() -> Any:
    """``scipy.sparse.linalg``, imported when first needed (scipy is an optional dependency)."""
    try:
        import scipy.sparse.linalg as linalg
    except ImportError as exc:  # pragma: no cover - the test extra installs scipy
        raise ImportError("this function needs scipy: pip install 'fastntk[scipy]'") from exc
    return linalg


# --- solvers on the operator ----------------------------------------------------------------


@dataclass(frozen=True)
class Solution:
    """A conjugate-gradient solution of (Θ + ridge·I) α = y.

    Attributes:
        alpha: α, shaped like y ((N, O) or (N·O,)), float64, on the operator's device.
        iterations: CG iterations run (one operator product each).
        residual: the relative residual ‖y − (Θ + ridge·I) α‖ / ‖y‖, recomputed with one more product.
    """

    alpha: torch.Tensor
    iterations: int
    residual: float


def solve(op: NTKOperator, y: torch.Tensor, *, ridge: float = 0.0, rtol: float = 1e-5, maxiter: int | None = None) -> Solution:
    r"""(Θ + ridge·I)⁻¹ y by conjugate gradients (``scipy.sparse.linalg.cg``), one operator product
    per iteration: kernel regression where Θ(x_train, x_train) is too large to form.

    Predictions on test points are then ``NTKOperator(model, x_test, x_train) @ alpha.reshape(-1)``
    ((N_test·O,), sample-major). CG runs in float64 on the host; each product in the operator's
    dtype, which bounds the reachable residual (about eps(dtype) times Θ's condition number:
    use ``dtype=torch.float64`` or a ``ridge`` for tight tolerances).

    Args:
        op: Θ(x_train, x_train), an :class:`NTKOperator` built with x2=None.
        y: targets (N, O) or flat (N·O,), sample-major.
        ridge: added to Θ's diagonal (absolute units, as :func:`fastntk.predict.kernel_ridge`).
        rtol: stop when ‖y − (Θ + ridge·I) α‖ <= rtol·‖y‖.
        maxiter: most iterations; default 10·N·O.

    Returns:
        The :class:`Solution` (α, iterations, relative residual).

    Raises:
        InputError: an operator that is not Θ(x, x), y of the wrong size, or a bad ridge, rtol or maxiter.
        ConvergenceError: CG stopped above ``rtol`` (its iterations and residual are attached).

    Example:
        >>> import torch, fastntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        >>> op = fastntk.NTKOperator(net, torch.randn(5, 3, dtype=torch.float64))
        >>> solution = fastntk.operator.solve(op, torch.randn(5, 2, dtype=torch.float64), ridge=1e-3)
        >>> solution.alpha.shape, solution.residual <= 1e-5
        (torch.Size([5, 2]), True)
    """
    if not isinstance(op, NTKOperator) or not op.symmetric:
        raise InputError("solve needs Θ(x_train, x_train): build the operator as NTKOperator(model, x_train) (x2=None)")
    if not (isinstance(ridge, numbers.Real) and not isinstance(ridge, bool) and math.isfinite(ridge) and ridge >= 0):
        raise InputError(f"ridge={ridge!r}: give a finite number >= 0 (added to Θ's diagonal)")
    if not (isinstance(rtol, numbers.Real) and not isinstance(rtol, bool) and 0 < rtol < 1):
        raise InputError(f"rtol={rtol!r}: give a relative tolerance in (0, 1), e.g. 1e-5")
    if maxiter is not None and not is_positive_int(maxiter):
        raise InputError(f"maxiter={maxiter!r}: give a positive number of iterations, or None for 10·N·O")
    n = op.shape[0]
    target = torch.as_tensor(y).detach()
    if target.numel() != n or target.dim() not in (1, 2) or (target.dim() == 2 and target.shape[1] != op.num_outputs):
        raise InputError(f"y has shape {tuple(target.shape)}: give targets ({n // op.num_outputs}, {op.num_outputs}) or ({n},), sample-major")
    b = target.reshape(-1).cpu().double().numpy()
    if not np.isfinite(b).all():
        raise NonFiniteError("y holds NaN or inf: it cannot be solved for")
    linalg = scipy_linalg()
    theta = op.to_scipy()
    system = linalg.LinearOperator((n, n), matvec=lambda x: theta.matvec(x) + ridge * x, dtype=np.float64)
    iterations = 0

    def count(_: np.ndarray) -> None:
        nonlocal iterations
        iterations += 1

    norm = float(np.linalg.norm(b))
    if norm == 0.0:
        return Solution(torch.zeros_like(target, dtype=torch.float64, device=op.device), 0, 0.0)
    tolerance = {"rtol" if "rtol" in inspect.signature(linalg.cg).parameters else "tol": rtol}  # scipy < 1.12 names it tol
    x, info = linalg.cg(system, b, atol=0.0, maxiter=int(maxiter) if maxiter is not None else 10 * n, callback=count, **tolerance)
    residual = float(np.linalg.norm(b - system.matvec(x))) / norm
    if info != 0 or residual > rtol:
        raise ConvergenceError(
            f"conjugate gradients stopped after {iterations} iterations at relative residual {residual:.3g} > rtol={rtol:g}: "
            "raise maxiter=, add a ridge > 0 (Θ may be singular or ill-conditioned), compute in dtype=torch.float64 "
            "(products in float32 limit the residual to about 1e-7 times Θ's condition number) or loosen rtol",
            iterations, residual,
        )
    alpha = torch.from_numpy(x).to(op.device).reshape(target.shape)
    return Solution(alpha, iterations, residual)


def top_eigenvalues(op: NTKOperator, k: int, *, eigenvectors: bool = False, tol: float = 0.0, seed: int = 0) -> Any:
    """The k largest eigenvalues of Θ(x, x) by Lanczos (``scipy.sparse.linalg.eigsh``, ARPACK),
    one product per iteration.

    Args:
        op: Θ(x, x), an :class:`NTKOperator` built with x2=None.
        k: how many, 1 <= k < N·O.
        eigenvectors: also return the eigenvectors.
        tol: ARPACK's relative accuracy of the eigenvalues (0: machine precision).
        seed: seeds the starting vector (the global random state is untouched).

    Returns:
        The eigenvalues (k,), float64, largest first; with ``eigenvectors``, also the
        eigenvectors (N·O, k) as columns, in sample-major order.

    Raises:
        InputError: an operator that is not Θ(x, x), or k out of range.
    """
    if not isinstance(op, NTKOperator) or not op.symmetric:
        raise InputError("top_eigenvalues needs the symmetric Θ(x, x): build the operator as NTKOperator(model, x) (x2=None)")
    n = op.shape[0]
    if not (is_positive_int(k) and k < n):
        raise InputError(f"k={k!r}: give 1 <= k < N·O = {n} (for all eigenvalues form the kernel with fastntk.ntk and use torch.linalg.eigvalsh)")
    v0 = np.random.default_rng(seed).standard_normal(n)
    result = scipy_linalg().eigsh(op.to_scipy(), k=int(k), which="LA", tol=tol, v0=v0, return_eigenvectors=eigenvectors)
    values, vectors = result if eigenvectors else (result, None)
    order = np.argsort(values)[::-1]
    values_t = torch.from_numpy(np.ascontiguousarray(values[order]))
    if not eigenvectors:
        return values_t
    return values_t, torch.from_numpy(np.ascontiguousarray(vectors[:, order]))


TRACE_METHODS = ("hutchinson", "hutch++")


def trace_estimate(op: NTKOperator, matvecs: int, *, method: str = "hutch++", seed: int = 0) -> float:
    r"""An unbiased estimate of tr Θ from ``matvecs`` products with random ±1 (Rademacher) vectors.

    "hutchinson": the mean of zᵀΘz over ``matvecs`` vectors (variance 2(‖Θ‖_F² − Σ Θ_ii²)/matvecs).
    "hutch++" (Meyer, Musco, Musco & Woodruff 2021): a third of the products find Θ's top
    range Q (Θ S, S random), its trace tr(QᵀΘQ) is exact, and Hutchinson runs on the
    remainder (I − QQᵀ)Θ(I − QQᵀ) only; exact when rank Θ <= matvecs // 3, and far more
    accurate than Hutchinson when the spectrum decays (as eNTK spectra do).

    Args:
        op: a square operator, e.g. Θ(x, x) (for the exact trace of that one, see
            ``fastntk.self_ntk(model, x, mode="trace").sum()``).
        matvecs: products to spend (>= 1 for Hutchinson, >= 3 for Hutch++).
        method: "hutch++" or "hutchinson".
        seed: seeds a private ``torch.Generator`` (the global random state is untouched).

    Returns:
        The estimate of tr Θ, as a float.

    Raises:
        InputError: a non-square operator, an unknown method or too few matvecs.
    """
    n = op.shape[0]
    if op.shape[0] != op.shape[1]:
        raise InputError(f"the trace needs a square operator, this one is {op.shape[0]}x{op.shape[1]}: use NTKOperator(model, x)")
    if method not in TRACE_METHODS:
        raise InputError(f"method={method!r}: use one of {', '.join(map(repr, TRACE_METHODS))}")
    least = 3 if method == "hutch++" else 1
    if not (is_positive_int(matvecs) and matvecs >= least):
        raise InputError(f"matvecs={matvecs!r}: {method} needs at least {least} products")
    matvecs = int(matvecs)
    generator = torch.Generator().manual_seed(seed)

    def rademacher(columns: int) -> torch.Tensor:
        return (torch.randint(0, 2, (n, columns), generator=generator, dtype=torch.float64) * 2 - 1).to(op.device)

    def product(m: torch.Tensor) -> torch.Tensor:
        return (op @ m.to(op.dtype)).double()

    if method == "hutchinson":
        z = rademacher(matvecs)
        return float((z * product(z)).sum() / matvecs)
    third = matvecs // 3
    s, g = rademacher(third), rademacher(matvecs - 2 * third)
    q = torch.linalg.qr(product(s)).Q  # (n, third): Θ's top range
    exact = float((q * product(q)).sum())
    g = g - q @ (q.T @ g)
    return exact + float((g * product(g)).sum() / g.shape[1])
