"""How the command line fails: :class:`CLIError` for bad usage or input, one line on stderr."""

from __future__ import annotations

import sys
import traceback

import torch

PROG = "fastntk"


class CLIError(Exception):
    """Bad usage or bad input: reported on one line, exit status 2."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def report(exc: BaseException, message: str, debug: bool) -> None:
    """Print the traceback (with --debug) and the one-line error on stderr."""
    sys.stdout.flush()
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.stderr.flush()


def warn(message: str) -> None:
    """A one-line warning on stderr (e.g. a deprecated option)."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)
    sys.stderr.flush()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error of the host or the accelerator."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()
