r"""Per-layer kernels Θ_g = J_g J_gᵀ (they sum to Θ) and the weighted kernel J Λ Jᵀ = Σ_g λ_g Θ_g,
in one pass: each block's per-sample factors are computed once for all groups.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from typing import Any, Mapping, Union

import torch
from torch import nn

from ._api import NTKFunction
from ._errors import NonFiniteError, OptionError, SelectionError
from ._functional import ParamSelection, select_parameters
from ._inputs import all_finite
from ._options import options_of
from ._problem import Problem
from .blocks.budget import DEFAULT_MAX_MEMORY, Sizing, format_bytes
from .blocks.engine import place, progress_bar, run
from .blocks.schedule import Block, all_blocks
from .methods.base import Kept, KernelMethod
from .methods.grouped import SPLITTABLE, GroupedMethod

Groups = Union[str, Mapping[str, ParamSelection]]
"""How parameters are grouped: "module", "parameter", or {name: selection}."""

GROUPINGS = ("module", "parameter")


def parameter_groups(model: nn.Module, groups: Groups = "module", params: ParamSelection = None) -> dict[str, list[str]]:
    """The parameter groups of ``model``: group name -> canonical parameter names.

    Args:
        model: the module.
        groups: "module" (one group per module owning selected parameters directly, named as
            in ``named_modules()``, the root module ""), "parameter" (one per parameter tensor,
            named as in ``named_parameters()``), or a dict {name: selection}, each selection as
            ``params=`` takes it (a list of names or a predicate); dict groups may not overlap
            and need not cover every parameter.
        params: the parameters that count (as for :func:`fastntk.ntk`); every group lies within them.

    Returns:
        The groups in order (the modules' and parameters' order, or the dict's).

    Raises:
        OptionError: an unknown grouping, or a group name that is not a string.
        SelectionError: a bad selection, a group outside ``params``, or two groups sharing a parameter.
    """
    chosen = select_parameters(model, params)
    if isinstance(groups, str):
        if groups == "parameter":
            return {name: [name] for name in chosen}
        if groups == "module":
            out: dict[str, list[str]] = {}
            for name in chosen:
                out.setdefault(name.rpartition(".")[0], []).append(name)
            return out
    if not isinstance(groups, Mapping):
        raise OptionError(f"groups={groups!r}: use 'module', 'parameter', or a dict {{name: selection}} (selections as params= takes them)")
    if not groups:
        raise OptionError("groups is an empty dict: name at least one group {name: selection}")
    out, owner = {}, {}
    for group, selection in groups.items():
        if not isinstance(group, str):
            raise OptionError(f"group names must be strings, got {group!r}")
        try:
            names = select_parameters(model, selection)
        except SelectionError as exc:
            raise SelectionError(f"group {group!r}: {exc}") from None
        outside = [name for name in names if name not in chosen]
        if outside:
            raise SelectionError(
                f"group {group!r} selects {outside}, which params= (or requires_grad=False) leaves out: "
                "select within the differentiated parameters"
            )
        for name in names:
            if name in owner:
                raise SelectionError(
                    f"groups {owner[name]!r} and {group!r} both select {name!r}: groups must not overlap "
                    "(each parameter's share of the kernel is counted once)"
                )
            owner[name] = group
        out[group] = names
    return out


def layer_ntk(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    *,
    groups: Groups = "module",
    mode: str = "full",
    method: str = "auto",
    params: ParamSelection = None,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    check: bool = True,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    r"""Each parameter group's share of the kernel, Θ_g(x1, x2) = J_g(x1) J_g(x2)ᵀ, in one pass.

    Θ = Σ_g Θ_g: the kernels of groups covering all the parameters sum to :func:`fastntk.ntk`'s.
    Each block's per-sample factors are computed once (one forward and backward pass per
    block, whatever the number of groups G); each group's share is contracted apart.

    Args:
        model: any ``nn.Module``, as for :func:`fastntk.ntk`.
        x1: N1 samples, in any form :func:`fastntk.ntk` takes.
        x2: N2 samples of the same kind, or None for the Gram matrices K(x1, x1).
        groups: "module" (one group per module owning parameters directly, named as in
            ``named_modules()``; the root module's own parameters are group ""), "parameter"
            (one per parameter tensor), or a dict {name: selection}, each selection a list of
            parameter names or a predicate as ``params=`` takes; dict groups must not overlap.
        mode: as for :func:`fastntk.ntk`; each kernel has that mode's shape.
        method: "structured", "jacobian" or "auto" (the cheaper of the two by :func:`fastntk.plan`'s
            estimates); "vp" cannot split its products by parameter and is refused.
        params: the parameters that count (as for :func:`fastntk.ntk`); groups lie within them.
        dtype: as for :func:`fastntk.ntk`.
        block_size: as for :func:`fastntk.ntk`.
        max_memory: as for :func:`fastntk.ntk`, counting the G kernels held.
        check: as for :func:`fastntk.ntk`.
        progress: as for :func:`fastntk.ntk`.

    Returns:
        Group name -> its kernel (N1, N2, O, O) / (N1, N2) / (N1, N2, O) per ``mode``, in the
        groups' order; with a dict ``groups``, the kernels sum to
        ``fastntk.ntk(model, x1, x2, params=<the union of the groups>)``.

    Raises:
        OptionError: a bad option or grouping, method "vp", or a ``max_memory`` below the G kernels.
        SelectionError: a bad selection, or overlapping groups.
        NonFiniteError: NaN or inf in the inputs, parameters or a group's kernel (it carries the kernels).

    Example:
        >>> import torch, fastntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> kernels = fastntk.layer_ntk(net, torch.randn(5, 3), mode="trace")
        >>> {name: tuple(k.shape) for name, k in kernels.items()}
        {'0': (5, 5), '2': (5, 5)}
    """
    given = dict(mode=mode, method=method, params=params, dtype=dtype, block_size=block_size, max_memory=max_memory, check=check, progress=progress)
    named = parameter_groups(model, groups, params)
    result = grouped_kernel(model, x1, x2, named, given, None)
    return dict(zip(named, result.unbind(0)))


def weighted_ntk(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    *,
    weights: Mapping[str, float],
    groups: Groups = "module",
    mode: str = "full",
    method: str = "auto",
    params: ParamSelection = None,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    check: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    r"""The weighted kernel J Λ Jᵀ = Σ_g λ_g Θ_g, Λ = diag(λ_g on group g's parameters).

    E.g. a linearised Laplace approximation's prior covariance in function space, with a prior
    variance λ_g per layer (the inverse of its prior precision). Computed in one pass like
    :func:`layer_ntk`, without holding the G kernels: one kernel's memory.

    Args:
        model: any ``nn.Module``, as for :func:`fastntk.ntk`.
        x1: N1 samples, in any form :func:`fastntk.ntk` takes.
        x2: N2 samples of the same kind, or None for the Gram matrix K(x1, x1).
        weights: λ_g for every group, by group name: finite and >= 0 (a negative weight would
            make J Λ Jᵀ indefinite, no longer a kernel; combine :func:`layer_ntk`'s kernels for
            that). A weight of 0 skips its group's contraction.
        groups: as for :func:`layer_ntk`.
        mode: as for :func:`fastntk.ntk`.
        method: as for :func:`layer_ntk`.
        params: as for :func:`layer_ntk`.
        dtype: as for :func:`fastntk.ntk`.
        block_size: as for :func:`fastntk.ntk`.
        max_memory: as for :func:`fastntk.ntk`.
        check: as for :func:`fastntk.ntk`.
        progress: as for :func:`fastntk.ntk`.

    Returns:
        The kernel, shaped per ``mode`` as :func:`fastntk.ntk`'s.

    Raises:
        OptionError: a weight for an unknown group, a group without a weight, a negative or
            non-finite weight, or as :func:`layer_ntk`.
        SelectionError: as :func:`layer_ntk`.
        NonFiniteError: as :func:`layer_ntk`.

    Example:
        >>> import torch, fastntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> fastntk.weighted_ntk(net, torch.randn(5, 3), weights={"0": 0.5, "2": 2.0}, mode="trace").shape
        torch.Size([5, 5])
    """
    given = dict(mode=mode, method=method, params=params, dtype=dtype, block_size=block_size, max_memory=max_memory, check=check, progress=progress)
    named = parameter_groups(model, groups, params)
    return grouped_kernel(model, x1, x2, named, given, group_weights(weights, named))


def group_weights(weights: Mapping[str, float], named: Mapping[str, list[str]]) -> list[float]:
    """λ_g in the groups' order, validated."""
    if not isinstance(weights, Mapping):
        raise OptionError(f"weights must be a dict {{group name: weight}}, got {type(weights).__name__}")
    unknown = [name for name in weights if name not in named]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), [str(n) for n in named], n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise OptionError(f"weights name {unknown} but the groups are {list(named)}{hint}")
    missing = [name for name in named if name not in weights]
    if missing:
        raise OptionError(f"no weight for the groups {missing}: give every group a weight (0 leaves a group out)")
    out = []
    for name in named:
        value = weights[name]
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise OptionError(f"weight of group {name!r} is {value!r}: give a real number")
        if not math.isfinite(value) or value < 0:
            raise OptionError(
                f"weight of group {name!r} is {value!r}: weights must be finite and >= 0 (J Λ Jᵀ with a negative "
                "weight is not a kernel; combine fastntk.layer_ntk's kernels for signed sums)"
            )
        out.append(float(value))
    return out


def grouped_kernel(
    model: nn.Module, x1: Any, x2: Any, named: Mapping[str, list[str]], given: dict[str, Any], weights: list[float] | None
) -> torch.Tensor:
    """The (G, *kernel) stack of the groups' kernels (``weights`` None), or their weighted sum."""
    union = [name for names in named.values() for name in names]
    options = options_of({**given, "params": union}, stacklevel=3)
    if options.method not in ("auto", *SPLITTABLE):
        raise OptionError(
            f"method={options.method!r} cannot split the kernel by parameter group (its products run over all "
            "parameters at once): use method='structured', 'jacobian' or 'auto'"
        )
    fn = NTKFunction(model, options)
    problem = fn._problem(x1, x2)
    count = len(named) if weights is None else 1
    result_bytes = count * problem.result_bytes
    if result_bytes >= options.max_memory:
        raise OptionError(
            f"the {count} kernel(s) alone take {format_bytes(result_bytes)}, more than max_memory={format_bytes(options.max_memory)}: "
            "raise max_memory, choose a smaller mode (\"trace\", \"diagonal\"), or use fewer groups"
        )
    sizing = problem.sizing(options.max_memory - result_bytes, partitioned=False, reserved=result_bytes)
    sizing = dataclasses.replace(sizing, pair_bytes=count * sizing.pair_bytes)  # a block's value holds the G groups
    inner, kept, block = fn._calibrated(problem, inner_method(fn, problem, sizing), sizing, keep=True)
    sizing.check(inner, block)
    index = {name: g for g, names in enumerate(named.values()) for name in names}
    method = GroupedMethod(inner, index, len(named), weights)
    kept = None if kept is None else Kept(method.grouped(kept.factors))
    mode = options.mode
    shape = problem.shape if weights is not None else (count, *problem.shape)
    result = torch.empty(shape, device=problem.f.device, dtype=problem.f.dtype)

    def sink(b: Block, value: torch.Tensor) -> None:
        if weights is not None:
            place(result, b, value, problem.symmetric, mode)
        else:
            for g in range(count):
                place(result[g], b, value[g], problem.symmetric, mode)

    blocks = all_blocks(problem.n1, problem.n2, block, problem.symmetric)
    with progress_bar(options.progress and len(blocks) > 1, len(blocks)) as bar:
        run(problem.kernel(method).unchecked(), blocks, block, sizing.cache_capacity(method, block), sink, kept=kept, bar=bar)
    if options.check and not all_finite(result):
        if weights is None:
            what = "the kernel of group " + repr(next(name for name, k in zip(named, result) if not all_finite(k)))
        else:
            what = "the weighted kernel"
        raise NonFiniteError(
            f"{what} contains NaN or inf although inputs and parameters are finite: the model's derivatives overflow "
            "or are undefined there; try dtype=torch.float64; the computed kernels are in this error's .kernel",
            kernel=result,
        )
    return result


def inner_method(fn: NTKFunction, problem: Problem, sizing: Sizing) -> KernelMethod:
    """The method whose factors are split: the one asked for, or for "auto" the cheaper of
    "structured" and "jacobian" by the cost model (vp's products cannot be split)."""
    name = fn._options.method
    if name != "auto":
        return fn._bound(name, problem)
    plan, methods = fn._plan(problem, sizing)
    usable = [m for m in SPLITTABLE if m not in plan.unusable] or list(SPLITTABLE)
    return methods[min(usable, key=plan.flops.__getitem__)]
