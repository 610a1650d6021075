"""The public entry points ``ntk``, ``ntk_fn`` and ``plan``, and the set-up that ``gram`` shares.

Every kernel goes the same way: validate the options (:mod:`._options`) and the model, read the
inputs as sources and probe the model on their first samples (:class:`~._problem.Problem`),
choose the method by the cost model (:mod:`.plan`) and size its blocks within ``max_memory``
(:mod:`.blocks.budget`), calibrate it on its first block, and run the block engine
(:mod:`.blocks.engine`). ``ntk`` keeps the result in memory; ``fastntk.gram`` adds disks and ranks.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

from ._checks import check_per_sample, check_training_mode
from ._errors import ModelError, NonFiniteError, OptionError
from ._functional import FunctionalModel, ParamSelection
from ._heap import keep_freed_memory, keep_heap_requested
from ._inputs import BatchSpec, all_finite, batch_size, check_compatible, check_finite, describe, take
from ._options import Options, options_of
from ._problem import Problem
from .blocks.budget import DEFAULT_MAX_MEMORY, Sizing, format_bytes
from .blocks.engine import calibrate_on_first_block, kernel_context, place, progress_bar, raise_non_finite, run
from .blocks.schedule import Block, all_blocks
from .methods import METHODS, KernelMethod
from .methods.base import Kept
from .methods.per_sample import vmap_failure
from .plan import Plan, make_plan
from .sources import ArraySource, DatasetSource, Select, Source, as_source

PROBE = 3
"""Samples the model is probed on for batch dependence and randomness."""

Kind = tuple[BatchSpec, tuple[bool, ...]]
"""What an NTKFunction's caches are keyed by: the kind of input, and the modules' train/eval
flags (``Problem.kind``, set once per call)."""


class NTKFunction:
    """The empirical NTK of one model as a reusable function ``(x1, x2=None) -> Tensor``;
    made by :func:`ntk_fn`.

    Set up once, call often: the model's parameters are read at every call (so it tracks
    training); the probe of the model, the choice of method and its calibration are made
    again only when the kind or number of inputs changes.
    """

    def __init__(self, model: nn.Module, options: Options | None = None, **kwargs: Any) -> None:
        if options is None:  # fastntk 0.1's NTKFunction(model, mode=..., ...)
            warnings.warn("fastntk: NTKFunction(model, ...) is deprecated, use fastntk.ntk_fn(model, ...)", DeprecationWarning, stacklevel=2)
            options = options_of(kwargs, stacklevel=2)
        FunctionalModel.build(model, options.params, options.dtype)  # validate the model and the selection now
        self._model, self._options = model, options
        self._probed: dict[Kind, tuple[int, int]] = {}
        self._batchable: dict[Kind, bool] = {}
        self._calibrations: dict[tuple[Kind, str], Any] = {}
        self._choices: dict[tuple[Kind, int, int | None], str] = {}

    def __call__(self, x1: Any, x2: Any = None) -> torch.Tensor:
        """The kernel between x1 (N1 samples) and x2 (N2 samples; None: x1 itself).

        Returns:
            (N1, N2, O, O) for "full", (N1, N2) for "trace"/"trace_mean", (N1, N2, O) for "diagonal".

        Raises:
            FastNTKError: as :func:`ntk`.
        """
        if keep_heap_requested():
            keep_freed_memory()
        return self._in_memory(self._problem(x1, x2))

    def plan(self, x1: Any, x2: Any = None) -> Plan:
        """The cost estimates for K(x1, x2), the method this function uses for it (with "auto"
        the cheapest estimate) and its block size. Computes no kernel. A kernel larger than
        ``max_memory`` is planned as ``fastntk.gram(..., out=...)`` computes it, on disk."""
        problem = self._problem(x1, x2)
        if problem.result_bytes >= self._options.max_memory:
            sizing = problem.sizing(self._options.max_memory, partitioned=True)
        else:
            sizing = self._in_memory_sizing(problem)
        plan, _ = self._plan(problem, sizing)
        return plan

    # -- shared with fastntk.gram ---------------------------------------------------------

    def _problem(self, x1: Any, x2: Any, select: Select = None) -> Problem:
        """Validate the model and the inputs, probe the model on the first samples."""
        if torch.is_inference_mode_enabled():  # its tensors cannot be differentiated or version-checked
            raise OptionError(
                "fastntk is called inside torch.inference_mode(), where nothing can be differentiated: call it outside "
                "inference_mode (torch.no_grad() around the call is fine: fastntk enables the gradients it needs)"
            )
        options, model = self._options, self._model
        f = FunctionalModel.build(model, options.params, options.dtype)
        check_training_mode(model)
        s1 = as_source(x1, "x1", select)
        s2 = None if x2 is None else as_source(x2, "x2", select)
        problem = Problem(f, s1, s2, 0, None, None, options)  # type: ignore[arg-type]
        with torch.no_grad():
            problem.probe1 = problem.load(1, 0, min(PROBE, len(s1)))
            problem.probe2 = None if s2 is None else problem.load(2, 0, min(PROBE, len(s2)))
        spec = describe(problem.probe1, "x1")
        if problem.probe2 is not None:
            check_compatible(spec, describe(problem.probe2, "x2"))
        # the caches' key, once per call: the kind of input and the train/eval flags (a forward may branch on them)
        kind = problem.kind = describe(problem.probe1, "x1"), tuple(m.training for m in model.modules())
        if options.check:  # before any work: every method refuses the same way
            for source in (s1, s2):
                if in_memory(source):
                    check_finite(source.take(0, len(source)), source.name)
            f.check_finite_params()
        available = min(PROBE, batch_size(problem.probe1) + (0 if problem.probe2 is None else batch_size(problem.probe2)))
        if kind not in self._probed or self._probed[kind][1] < available:
            try:
                self._probed[kind] = check_per_sample(f, problem.probe1, problem.probe2, PROBE)
            except ModelError as exc:
                if select is None and isinstance(s1, DatasetSource) and isinstance(problem.probe1, (tuple, list)):
                    raise ModelError(f"{exc}; the dataset's items are tuples, all passed to the model: for (inputs, labels) items pass select=0") from exc
                raise
        f.batchable = self._batchable.get(kind, True)  # until vmap is seen to fail on such inputs
        problem.num_outputs = self._probed[kind][0]
        return problem

    def _plan(self, problem: Problem, sizing: Sizing) -> tuple[Plan, dict[str, KernelMethod]]:
        """The cost of every method on this problem, and the methods it costed."""
        kind, f = problem.kind, problem.f
        if kind not in self._batchable:  # the costs differ when the Jacobians must be looped
            self._batchable[kind] = vmap_failure(f, take(problem.probe1, 0, 1)) is None
        f.batchable = self._batchable[kind]
        with kernel_context():
            plan, methods = make_plan(
                f, problem.probe1, sizing, problem.options.mode, problem.num_outputs,
                self._bound("structured", problem), block_given=self._options.block_size is not None,
            )
        if self._options.method != "auto":
            plan.chosen = self._options.method
            plan.block_size = None if sizing.over(methods[plan.chosen]) else sizing.block(methods[plan.chosen])
        if self._options.block_size is not None:
            plan.block_size = self._options.block_size
        return plan, methods

    def _bound(self, name: str, problem: Problem) -> KernelMethod:
        """Method ``name`` bound to the problem, with what an earlier call on such inputs learned."""
        calibration = self._calibrations.get((problem.kind, name))
        return METHODS[name](problem.f, problem.options.mode, problem.num_outputs, calibration)

    def _choose(self, problem: Problem, sizing: Sizing) -> KernelMethod:
        """The method for this problem: the one asked for, or for "auto" the cheapest estimate
        (chosen once per kind and number of inputs; when chosen now, the method as costed)."""
        name = self._options.method
        if name != "auto":
            return self._bound(name, problem)
        key = (problem.kind, problem.n1, None if problem.symmetric else problem.n2)
        if key in self._choices:
            return self._bound(self._choices[key], problem)
        plan, methods = self._plan(problem, sizing)
        self._choices[key] = plan.chosen
        return methods[plan.chosen]

    def _calibrated(
        self, problem: Problem, method: KernelMethod, sizing: Sizing, keep: bool, samples: int | None = None
    ) -> tuple[KernelMethod, Kept | None, int]:
        """``method`` calibrated on the first block (or on the first ``samples`` samples;
        remembered for later calls), what it kept of that block, and the block size. A given
        ``block_size`` that cannot fit the budget is refused before any calibration."""
        block = self._options.block_size
        kept = None
        if not method.ready:
            if block is not None and samples is None:
                method = method.estimated(problem.load(1, 0, 1))
                sizing.check(method, block)
            n2 = None if problem.symmetric else problem.n2
            with kernel_context():
                method, kept, calibrated_block = calibrate_on_first_block(method, problem.load, problem.n1, n2, samples or block, sizing.block, keep=keep)
            block = block if samples else calibrated_block
            self._calibrations[(problem.kind, method.name)] = method.calibration
        return method, kept, block or sizing.block(method)

    def _in_memory_sizing(self, problem: Problem) -> Sizing:
        """Block sizing for a result held in memory: what ``max_memory`` leaves beside the result."""
        budget = self._options.max_memory
        if problem.result_bytes >= budget:
            raise OptionError(
                f"the kernel alone takes {format_bytes(problem.result_bytes)}, more than max_memory={format_bytes(budget)}: "
                "raise max_memory, choose a smaller mode (\"trace\", \"diagonal\"), or write it to disk block by block "
                "with fastntk.gram(..., out='kernel.npy')"
            )
        return problem.sizing(budget - problem.result_bytes, partitioned=False, reserved=problem.result_bytes)

    def _in_memory(self, problem: Problem, on_block: Callable[[Block], None] | None = None) -> torch.Tensor:
        """The whole kernel in memory, on one rank (``on_block``: called with each finished block)."""
        sizing = self._in_memory_sizing(problem)
        method, kept, block = self._calibrated(problem, self._choose(problem, sizing), sizing, keep=True)
        sizing.check(method, block)
        result = torch.empty(problem.shape, device=problem.f.device, dtype=problem.f.dtype)
        blocks = all_blocks(problem.n1, problem.n2, block, problem.symmetric)
        mode = problem.options.mode
        kernel = problem.kernel(method)
        with progress_bar(self._options.progress and len(blocks) > 1, len(blocks)) as bar:
            run(
                kernel.unchecked(), blocks, block, sizing.cache_capacity(method, block),
                lambda b, value: place(result, b, value, problem.symmetric, mode), kept=kept, bar=bar, on_block=on_block,
            )
        self._batchable[problem.kind] = problem.f.batchable  # False once vmap failed on these inputs: later calls loop at once
        if self._options.check and not all_finite(result):  # the whole kernel first: nothing computed is lost
            try:
                raise_non_finite(Block(0, 0, (0, problem.n1), (0, problem.n2)), result, problem.symmetric)
            except NonFiniteError as exc:
                raise NonFiniteError(f"{exc}; the computed kernel is in this error's .kernel", kernel=result) from None
        return result


def in_memory(source: Source | None) -> bool:
    """Whether a source's samples are tensors already in memory (cheap to check whole)."""
    return isinstance(source, ArraySource) and all(isinstance(leaf, torch.Tensor) for leaf in source.leaves)


def ntk_fn(
    model: nn.Module,
    *,
    mode: str = "full",
    method: str = "auto",
    params: ParamSelection = None,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    check: bool = True,
    progress: bool = False,
    **renamed: Any,
) -> NTKFunction:
    """A reusable eNTK of ``model``: ``fastntk.ntk_fn(model, ...)(x1, x2)`` equals
    ``fastntk.ntk(model, x1, x2, ...)``, and later calls skip the set-up (same options as :func:`ntk`).

    Example:
        >>> import torch, fastntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> kernel = fastntk.ntk_fn(net, mode="trace")
        >>> kernel(torch.randn(5, 3)).shape
        torch.Size([5, 5])
    """
    options = dict(mode=mode, method=method, params=params, dtype=dtype, block_size=block_size, max_memory=max_memory, check=check, progress=progress)
    return NTKFunction(model, options_of({**options, **renamed}, stacklevel=2))


def ntk(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    *,
    mode: str = "full",
    method: str = "auto",
    params: ParamSelection = None,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    check: bool = True,
    progress: bool = False,
    **renamed: Any,
) -> torch.Tensor:
    r"""The empirical NTK Θ(x1, x2) = J(x1) J(x2)ᵀ of ``model``.

    J is the Jacobian of the O per-sample outputs (every output tensor flattened per
    sample and concatenated in pytree order; of a Hugging Face ModelOutput, its logits)
    with respect to the selected parameters.

    Args:
        model: any ``nn.Module``, used as it is (train/eval mode honoured, never modified).
        x1: N1 samples: a tensor or numpy array batched on dim 0, a tuple (``model(*x)``) or
            dict (``model(**x)``) of them, a .npy path, or a map-style Dataset or DataLoader
            (see :func:`fastntk.gram`). Integer tensors (token ids) are fine; floating ones are
            cast to the compute dtype and moved to the model's device.
        x2: N2 samples of the same kind, or None for the Gram matrix K(x1, x1).
        mode: "full" -> (N1, N2, O, O); "trace" -> (N1, N2), the SUM over the O outputs;
            "diagonal" -> (N1, N2, O); "trace_mean" -> (N1, N2), the mean over outputs
            (what neural-tangents' ``trace_axes`` returns).
        method: "jacobian", "vp", "structured" or "auto" (the cheapest by :func:`plan`'s estimates).
        params: None (all with requires_grad), a list of names, or a predicate
            ``(name, parameter) -> bool``. Buffers are used, never differentiated.
        dtype: compute in this floating dtype (e.g. torch.float64) instead of the model's.
        block_size: samples per block (default: the largest that fits ``max_memory``).
        max_memory: bytes (int) or a size such as "4GB", "512MiB" that the computation may
            hold: per-sample factors of live blocks, input and output blocks, and the result.
        check: validate inputs, parameters, the model and the result (NaN/inf, batch
            dependence, randomness). Disable only for trusted, repeated calls.
        progress: show a progress bar over blocks for long computations.

    Returns:
        The kernel on the model's device, in its dtype (or ``dtype``).

    Raises:
        InputError: inputs of the wrong structure, shape or kind.
        ModelError: a model whose per-sample NTK is not defined as asked (batch statistics,
            randomness, a failing or input-modifying forward).
        SelectionError: a bad ``params`` selection.
        OptionError: a bad option, or a ``max_memory`` too small for one sample or the result.
        NonFiniteError: NaN or inf in the inputs, parameters or result (then it carries the kernel).

    Example:
        >>> import torch, fastntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> fastntk.ntk(net, torch.randn(5, 3), torch.randn(4, 3)).shape
        torch.Size([5, 4, 2, 2])
    """
    options = dict(mode=mode, method=method, params=params, dtype=dtype, block_size=block_size, max_memory=max_memory, check=check, progress=progress)
    return NTKFunction(model, options_of({**options, **renamed}, stacklevel=2))(x1, x2)


def plan(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    *,
    mode: str = "full",
    method: str = "auto",
    params: ParamSelection = None,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    **renamed: Any,
) -> Plan:
    """The estimated cost of each exact method for :func:`ntk` with these arguments, the one it
    uses (``method="auto"``: the cheapest) and its block size; computes no kernel.
    ``print(fastntk.plan(model, x1, x2))`` shows the table."""
    options = dict(mode=mode, method=method, params=params, dtype=dtype, block_size=block_size, max_memory=max_memory)
    return NTKFunction(model, options_of({**options, **renamed}, stacklevel=2)).plan(x1, x2)
