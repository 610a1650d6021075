"""The options every entry point shares (``ntk``, ``ntk_fn``, ``plan``, ``gram``, the CLI), validated once."""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ._errors import OptionError
from ._functional import ParamSelection
from .blocks.budget import DEFAULT_MAX_MEMORY, parse_memory
from .reduction import MEAN_MODES, Mode, check_mode

METHOD_NAMES = ("auto", "jacobian", "vp", "structured")

RENAMED = {"chunk_size": "block_size", "memory_budget": "max_memory"}
"""Names of fastntk 0.1 still accepted, with a DeprecationWarning."""

DEFAULTS: dict[str, Any] = {"block_size": None, "max_memory": DEFAULT_MAX_MEMORY}


@dataclass(frozen=True)
class Options:
    """What to compute and within which limits.

    Attributes:
        mode: "full", "trace" or "diagonal" (the kernel's reduction over outputs).
        mean: whether the "trace" is divided by O ("trace_mean").
        method: "auto" or an exact method's name.
        params: the parameter selection (see :func:`fastntk.ntk`).
        dtype: the compute dtype, or None for the model's.
        block_size: samples per block, or None to size blocks from ``max_memory``.
        max_memory: bytes the computation may hold (see :mod:`fastntk.blocks.budget`).
        check: validate inputs, parameters, model and result.
        progress: a progress bar over blocks.
    """

    mode: Mode = "full"
    mean: bool = False
    method: str = "auto"
    params: ParamSelection = None
    dtype: torch.dtype | None = None
    block_size: int | None = None
    max_memory: int = parse_memory(DEFAULT_MAX_MEMORY)
    check: bool = True
    progress: bool = False

    @property
    def mode_name(self) -> str:
        """The mode as the caller named it ("trace_mean" included)."""
        return "trace_mean" if self.mean else self.mode


OPTION_NAMES = ("mode", "method", "params", "dtype", "block_size", "max_memory", "check", "progress")


def options_of(given: dict[str, Any], stacklevel: int = 2, extra: tuple[str, ...] = ()) -> Options:
    """:func:`parse_options` of keyword arguments as a caller gave them: fastntk 0.1's names
    (:data:`RENAMED`) are taken with a DeprecationWarning pointing ``stacklevel`` frames up
    from the caller; unknown names are refused (``extra``: the caller's own options, listed).

    Raises:
        OptionError: an unknown option, an old name given with its new one, or a bad value.
    """
    options: dict[str, Any] = {}
    for name, value in given.items():
        if name in RENAMED:
            new = RENAMED[name]
            if new in given and given[new] != DEFAULTS[new]:
                raise OptionError(f"{name}= and {new}= are the same option (0.1's name and today's): pass only {new}=")
            warnings.warn(f"fastntk: {name}= is deprecated, use {new}=", DeprecationWarning, stacklevel=stacklevel + 1)
            options[new] = value
        elif name in OPTION_NAMES:
            options.setdefault(name, value)
        else:
            hint = "; to write the kernel to disk block by block use fastntk.gram(..., out=...)" if name in ("out", "resume") else ""
            raise OptionError(f"unknown option {name!r}: the options are {', '.join((*OPTION_NAMES, *extra))}{hint}")
    return parse_options(**options)


def parse_options(
    *,
    mode: str = "full",
    method: str = "auto",
    params: ParamSelection = None,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    check: bool = True,
    progress: bool = False,
) -> Options:
    """Validate every option.

    Raises:
        OptionError: naming the option, the value given and what to pass instead.
    """
    resolved = check_mode(mode)
    if not isinstance(method, str) or method not in METHOD_NAMES:
        raise OptionError(f"unknown method {method!r}: use one of {', '.join(map(repr, METHOD_NAMES))}")
    if block_size is not None and not is_positive_int(block_size):
        raise OptionError(f"block_size={block_size!r}: it must be a positive number of samples per block, or None")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise OptionError(f"dtype={dtype!r} is not a floating torch dtype: use e.g. torch.float32 or torch.float64")
    for name, flag in (("check", check), ("progress", progress)):
        if not isinstance(flag, bool):
            raise OptionError(f"{name}={flag!r}: pass True or False")
    return Options(
        mode=resolved, mean=mode in MEAN_MODES, method=method, params=params, dtype=dtype,
        block_size=None if block_size is None else int(block_size), max_memory=parse_memory(max_memory), check=check, progress=progress,
    )


def is_positive_int(value: object) -> bool:
    """A positive whole number (numpy integers too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
