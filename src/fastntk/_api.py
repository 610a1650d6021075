"""The public entry points: ``ntk`` and ``ntk_fn``."""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Iterator

import torch
from torch import nn

from ._checks import check_per_sample, check_training_mode
from ._engine import DEFAULT_MEMORY_BUDGET, compute_kernel
from ._errors import NonFiniteError, OptionError
from ._heap import keep_freed_memory, keep_heap_requested
from ._functional import FunctionalModel, ParamSelection
from ._inputs import Batch, BatchSpec, all_finite, batch_size, cast_floating, check_compatible, check_finite, check_fits_model, describe, first_samples
from ._modes import MODES, Mode, check_mode
from ._process import quiet_fallbacks
from .methods import METHODS, KernelMethod
from .methods.per_sample import vmap_failure
from .plan import Plan, make_plan

MODE_ALIASES: dict[str, Mode] = {"trace_mean": "trace"}
PROBE = 3
"""Samples the model is probed on for batch dependence and randomness."""


def method_names() -> tuple[str, ...]:
    """Every valid ``method``: "auto" and the exact methods."""
    return ("auto", *METHODS)


class NTKFunction:
    """A reusable kernel ``(x1, x2=None) -> Tensor`` of one model: set up once, call often.

    The model's parameters are read at every call (so it tracks training); the
    per-sample probe of the model runs again only when the kind of input changes.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: str = "full",
        method: str = "auto",
        params: ParamSelection = None,
        chunk_size: int | None = None,
        dtype: torch.dtype | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        check: bool = True,
        progress: bool = False,
    ) -> None:
        self.mode: Mode = check_mode_or_alias(mode)
        self.mean = mode in MODE_ALIASES
        if not isinstance(method, str) or method not in method_names():
            raise OptionError(f"unknown method {method!r}: use one of {', '.join(map(repr, method_names()))}")
        if chunk_size is not None and not is_positive_int(chunk_size):
            raise OptionError(f"chunk_size={chunk_size!r}: it must be a positive number of samples per block, or None")
        if not is_positive_int(memory_budget):
            raise OptionError(f"memory_budget={memory_budget!r}: it must be a positive number of bytes, e.g. 2 * 1024**3")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise OptionError(f"dtype={dtype!r} is not a floating torch dtype: use e.g. torch.float32 or torch.float64")
        self.model, self.method, self.params, self.dtype = model, method, params, dtype
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.memory_budget, self.check, self.progress = int(memory_budget), check, progress
        self._probed: dict[BatchSpec, tuple[int, int]] = {}
        self._batchable: dict[BatchSpec, bool] = {}
        self._calibrations: dict[tuple[BatchSpec, str], Any] = {}
        self._choices: dict[tuple[BatchSpec, int, int | None], str] = {}
        FunctionalModel.build(model, params, dtype)  # validate the model and the selection now

    def functional(self) -> FunctionalModel:
        """The model as f(θ, x) with the current parameter values."""
        return FunctionalModel.build(self.model, self.params, self.dtype)

    def prepare(self, x1: Batch, x2: Batch | None) -> tuple[FunctionalModel, Batch, Batch | None, int]:
        """Validate everything, cast inputs if ``dtype`` was given; return f, x1, x2 and O."""
        f = self.functional()
        check_training_mode(self.model)
        spec = describe(x1, "x1")
        if x2 is not None:
            check_compatible(spec, describe(x2, "x2"))
        if self.dtype is not None:
            x1 = cast_floating(x1, f.dtype)
            x2 = None if x2 is None else cast_floating(x2, f.dtype)
            spec = describe(x1, "x1")
        check_fits_model(spec, "x1", f.device, f.dtype)
        if self.check:  # before any work: every method refuses the same way
            check_finite(x1, "x1")
            if x2 is not None:
                check_finite(x2, "x2")
            f.check_finite_params()
        available = min(PROBE, batch_size(x1) + (0 if x2 is None else batch_size(x2)))
        if spec not in self._probed or self._probed[spec][1] < available:
            self._probed[spec] = check_per_sample(f, x1, x2, PROBE)
        f.batchable = self._batchable.get(spec, True)  # until vmap is seen to fail on such inputs
        return f, x1, x2, self._probed[spec][0]

    def calibrated(self, name: str, f: FunctionalModel, num_outputs: int, spec: BatchSpec) -> KernelMethod:
        """Method ``name`` bound to f, with what an earlier call on such inputs learned."""
        method = METHODS[name](f, self.mode, num_outputs)
        method.calibration = self._calibrations.get((spec, name))
        return method

    def plan(self, x1: Batch, x2: Batch | None = None) -> Plan:
        """The cost estimates for K(x1, x2) and the method this function uses for it.

        With method="auto" that is the cheapest estimate; otherwise the method asked for.
        """
        return self.estimate(*self.prepare(x1, x2))[0]

    def estimate(self, f: FunctionalModel, x1: Batch, x2: Batch | None, num_outputs: int) -> tuple[Plan, dict[str, KernelMethod]]:
        """:meth:`plan` for inputs already validated by :meth:`prepare`, with the methods it costed."""
        spec = describe(x1, "x1")
        if spec not in self._batchable:  # the costs differ when the Jacobians must be looped
            self._batchable[spec] = vmap_failure(f, first_samples(x1, x2, 1)) is None
        f.batchable = self._batchable[spec]
        structured = self.calibrated("structured", f, num_outputs, spec)
        with kernel_context():
            plan, methods = make_plan(f, x1, x2, self.mode, num_outputs, self.memory_budget, structured, self.chunk_size)
        if self.method != "auto":
            plan.chosen = self.method
        return plan, methods

    def kernel_method(self, f: FunctionalModel, num_outputs: int, x1: Batch, x2: Batch | None) -> KernelMethod:
        """The exact method this call uses (for "auto", chosen once per kind and size of input by
        the plan's estimates; when chosen now, the method the plan costed, with what it read
        off the model: the engine calibrates it on its first block)."""
        spec = describe(x1, "x1")
        name = self.method
        if name == "auto":
            key = (spec, batch_size(x1), None if x2 is None else batch_size(x2))
            if key not in self._choices:
                plan, methods = self.estimate(f, x1, x2, num_outputs)
                self._choices[key] = plan.chosen
                return methods[plan.chosen]
            name = self._choices[key]
        return self.calibrated(name, f, num_outputs, spec)

    def __call__(self, x1: Batch, x2: Batch | None = None) -> torch.Tensor:
        """The kernel between x1 (N1 samples) and x2 (N2 samples; None: x1 itself).

        Returns:
            (N1, N2, O, O) for "full", (N1, N2) for "trace"/"trace_mean", (N1, N2, O) for "diagonal".

        Raises:
            InputError, ModelError, SelectionError, OptionError, NonFiniteError: see the messages.
        """
        f, x1, x2, num_outputs = self.prepare(x1, x2)
        method = self.kernel_method(f, num_outputs, x1, x2)
        with torch.no_grad(), kernel_context():
            kernel = compute_kernel(method, x1, x2, block=self.chunk_size, budget=self.memory_budget, progress=self.progress)
        spec = describe(x1, "x1")
        self._calibrations[(spec, method.name)] = method.calibration
        self._batchable[spec] = f.batchable  # False once vmap failed on these inputs: later calls loop at once
        if self.mean:
            kernel = kernel / num_outputs
        if self.check and not all_finite(kernel):
            check_finite_result(kernel, gram=x2 is None)
        return kernel


@contextlib.contextmanager
def kernel_context(keep_memory: bool = True) -> Iterator[None]:
    """What every kernel computation runs in: torch.func's "performance drop" warnings for
    ops without a batching rule silenced in this thread (they repeat on every call and format
    source lines each time; the cost model and the methods already account for such ops;
    :func:`fastntk._process.quiet_fallbacks`), and,
    with ``keep_memory`` and ``FASTNTK_KEEP_HEAP=1``, glibc's adaptive threshold raised
    (:mod:`fastntk._heap`; never by default: it outlives the call, and the budgeted Gram of
    :mod:`fastntk.scale` keeps its process near its budget). Nothing else outlives the block.
    """
    if keep_memory and keep_heap_requested():
        keep_freed_memory()
    with quiet_fallbacks():
        yield


def is_positive_int(value: object) -> bool:
    """A positive whole number (numpy integers too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def check_mode_or_alias(mode: str) -> Mode:
    """Validate ``mode`` (aliases resolved), listing the valid ones in the error."""
    if isinstance(mode, str) and mode in MODES:
        return check_mode(mode)
    if isinstance(mode, str) and mode in MODE_ALIASES:
        return MODE_ALIASES[mode]
    raise OptionError(f"unknown mode {mode!r}: use one of {', '.join(map(repr, (*MODES, *MODE_ALIASES)))}")


def check_finite_result(kernel: torch.Tensor, gram: bool) -> None:
    """Raise NonFiniteError, carrying the kernel, if it holds NaN or inf."""
    bad = ~torch.isfinite(kernel)
    if bool(bad.any()):
        n, m = (int(i) for i in bad.nonzero()[0][:2])
        raise NonFiniteError(
            f"the kernel contains NaN or inf (first at pair x1[{n}], {'x1' if gram else 'x2'}[{m}]) although inputs and parameters are "
            "finite: the model's derivatives overflow or are undefined there (e.g. sqrt or log at 0); "
            "try dtype=torch.float64, or fix the model; the computed kernel is in this error's .kernel",
            kernel=kernel,
        )


ntk_fn = NTKFunction
"""``fastntk.ntk_fn(model, *, mode=..., ...)``: a reusable eNTK of ``model`` (same options as :func:`ntk`)."""


def ntk(
    model: nn.Module,
    x1: Batch,
    x2: Batch | None = None,
    *,
    mode: str = "full",
    method: str = "auto",
    params: ParamSelection = None,
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    check: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    r"""The empirical NTK Θ(x1, x2) = J(x1) J(x2)ᵀ of ``model``.

    J is the Jacobian of the O per-sample outputs (every output tensor flattened per
    sample and concatenated in pytree order; of a Hugging Face ModelOutput, its logits)
    with respect to the selected parameters.

    Args:
        model: any ``nn.Module``, used as it is (train/eval mode honoured, never modified).
        x1: N1 samples: a tensor batched on dim 0, or a tuple (``model(*x)``) or dict
            (``model(**x)``) of such tensors. Integer tensors (token ids) are fine.
        x2: N2 samples of the same kind, or None for the Gram matrix K(x1, x1).
        mode: "full" -> (N1, N2, O, O); "trace" -> (N1, N2), the SUM over the O outputs;
            "diagonal" -> (N1, N2, O); "trace_mean" -> (N1, N2), the mean over outputs
            (what neural-tangents' ``trace_axes`` returns).
        method: "jacobian", "vp", "structured" or "auto" (the cheapest by :func:`plan`'s estimates).
        params: None (all with requires_grad), a list of names, or a predicate
            ``(name, parameter) -> bool``. Buffers are used, never differentiated.
        chunk_size: samples per block; bounds the memory of per-sample factors.
        dtype: compute in this floating dtype (e.g. torch.float64) instead of the model's.
        memory_budget: bytes the per-sample factors may take when chunk_size is None.
        check: validate inputs, parameters, the model and the result (NaN/inf, batch
            dependence, randomness). Disable only for trusted, repeated calls.
        progress: show a progress bar over blocks for long computations.

    Returns:
        The kernel on the model's device, in its dtype (or ``dtype``).

    Raises:
        InputError, ModelError, SelectionError, OptionError, NonFiniteError (all FastNTKError).

    Example:
        >>> import torch, fastntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> fastntk.ntk(net, torch.randn(5, 3), torch.randn(4, 3)).shape
        torch.Size([5, 4, 2, 2])
    """
    return NTKFunction(
        model, mode=mode, method=method, params=params, chunk_size=chunk_size, dtype=dtype,
        memory_budget=memory_budget, check=check, progress=progress,
    )(x1, x2)


def plan(
    model: nn.Module,
    x1: Batch,
    x2: Batch | None = None,
    *,
    mode: str = "full",
    params: ParamSelection = None,
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Plan:
    """The estimated cost of each exact method for :func:`ntk` with these arguments, and the
    one ``method="auto"`` picks. ``print(fastntk.plan(model, x1, x2))`` shows the table."""
    return NTKFunction(model, mode=mode, params=params, dtype=dtype, memory_budget=memory_budget).plan(x1, x2)
