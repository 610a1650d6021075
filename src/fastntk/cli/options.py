"""The options of the command line, named as the library names them (``--mode``, ``--method``,
``--dtype``, ``--block-size``, ``--max-memory``), and the one place that turns them into the
keyword arguments of :func:`fastntk.ntk` and :func:`fastntk.gram`."""

from __future__ import annotations

import argparse
import re
from typing import Any, NamedTuple, Sequence

import torch

from .._options import METHOD_NAMES
from .._errors import FastNTKError
from ..blocks.budget import parse_memory
from .errors import CLIError, warn

MODES = ("full", "trace", "diagonal", "trace_mean")
DTYPES = ("float32", "float64")
DEFAULT_MAX_MEMORY = "4GB"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are CLIError (one line, exit 2) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see '{self.prog} --help')")


def method_choices() -> tuple[str, ...]:
    """The valid ``--method`` values, as the library lists them."""
    return METHOD_NAMES


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


class MemorySize(NamedTuple):
    """A ``--max-memory`` value: as the user wrote it, and in bytes."""

    text: str
    bytes: int

    def __str__(self) -> str:
        return self.text


def memory_size(text: str) -> MemorySize:
    """argparse type: bytes or a size such as 4GB, 512MiB (:func:`fastntk.blocks.budget.parse_memory`)."""
    value: int | str = int(text) if text.strip().isdigit() else text
    try:
        return MemorySize(text, parse_memory(value, "--max-memory"))
    except FastNTKError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a memory size: give a positive number of bytes or a size such as 4GB, 512MiB, 1.5GiB"
        ) from None


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new option's ``dest`` and warns on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        warn(f"{option_string} is deprecated and will be removed; use {self.new}")
        setattr(namespace, self.dest, values)


def add_alias(group: Any, old: str, new: argparse.Action) -> None:
    """Accept ``old`` as a hidden, deprecated spelling of the option ``new``."""
    group.add_argument(old, dest=new.dest, type=new.type, metavar=new.metavar, action=DeprecatedAlias,
                       new=new.option_strings[0], default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_kernel_options(group: Any, *, device_help: str) -> dict[str, argparse.Action]:
    """The options of the kernel, the same for every command; returns them by name."""
    return {
        "mode": group.add_argument(
            "--mode", choices=MODES, default="full",
            help="full: (N1, N2, O, O); trace: (N1, N2), sum over outputs; diagonal: (N1, N2, O); "
            "trace_mean: (N1, N2), mean over outputs (default: full)",
        ),
        "method": group.add_argument("--method", choices=method_choices(), default="auto", help="exact method (default: auto)"),
        "dtype": group.add_argument("--dtype", choices=DTYPES, help="compute in this dtype (default: the model's)"),
        "device": group.add_argument("--device", help=device_help),
        "max_memory": group.add_argument(
            "--max-memory", type=memory_size, default=DEFAULT_MAX_MEMORY, metavar="SIZE",
            help="memory the computation may use (per-sample factors, input and output blocks): bytes, or a size "
            f"such as 2GB, 512MiB (default: {DEFAULT_MAX_MEMORY})",
        ),
        "block_size": group.add_argument(
            "--block-size", type=positive_int, metavar="N", help="samples per block (default: chosen from --max-memory)",
        ),
    }


def compute_dtype(args: argparse.Namespace) -> torch.dtype | None:
    """The ``--dtype`` as a torch dtype (None: the model's)."""
    return getattr(torch, args.dtype) if args.dtype else None


def ntk_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`fastntk.ntk` / :func:`fastntk.ntk_fn` from the parsed options."""
    return dict(mode=args.mode, method=args.method, dtype=compute_dtype(args), block_size=args.block_size, max_memory=args.max_memory.bytes)


def gram_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`fastntk.gram` from the parsed options (the mode explicit)."""
    return dict(mode=args.mode, method=args.method, dtype=compute_dtype(args),
                block_size=args.block_size, max_memory=args.max_memory.bytes)


CLI_TERMS = (
    ("resume=True", "--resume"), ("overwrite=True", "--overwrite"),
    ("block_size=", "--block-size "), ("block_size", "--block-size"),
    ("max_memory=", "--max-memory "), ("max_memory", "--max-memory"),
    ("method=", "--method "), ("out=", "--out "),
)


def in_cli_terms(message: str) -> str:
    """A library message with the options named as the command line spells them."""
    for library, flag in CLI_TERMS:
        message = re.sub(rf"(?<![\w-]){re.escape(library)}", flag, message)
    return message
