"""The ``fastntk`` command line: ``fastntk compute``, ``fastntk gram`` and ``fastntk report``.

``main(argv)`` parses the arguments, runs the command and returns the exit status:
0 on success, 2 for bad usage or input (missing files, wrong shapes, any
:class:`fastntk.FastNTKError`, a bad ``--model``), 1 for anything unexpected. Errors are
one line ``fastntk: error: <message>`` on stderr; ``--debug`` adds the traceback.

The package imports the library and never the reverse:

    __init__.py  the parser and main: dispatch, exit statuses
    options.py   the options both commands share, named as the library names them
    loading.py   the model and input files
    compute.py   ``fastntk compute``: a kernel in memory, written to a file, with a summary
    gram.py      ``fastntk gram``: a kernel block by block on disk (resumable, over ranks)
    report.py    ``fastntk report``: the spectrum, ranks and alignments of a kernel file, and its plot
    summary.py   what both commands print about a run
    errors.py    CLIError and the one-line error report
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .._errors import FastNTKError
from .._version import __version__
from . import compute, gram, report as report_command
from .errors import PROG, CLIError, is_out_of_memory, one_line, report
from .options import Parser, in_cli_terms

__all__ = ["main", "build_parser", "CLIError"]


def build_parser() -> argparse.ArgumentParser:
    """The ``fastntk`` argument parser with its subcommands."""
    parser = Parser(
        prog=PROG,
        description="Exact empirical neural tangent kernels of PyTorch models.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    compute.add_parser(commands)  # a kernel in memory
    gram.add_parser(commands)  # a large kernel block by block on disk
    report_command.add_parser(commands)  # numbers and a plot of a kernel file
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastntk`` command line; return the exit status (0, 1 or 2).

    Args:
        argv: the arguments without the program name; None reads ``sys.argv[1:]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except CLIError as exc:
        report(exc, one_line(exc), debug)
        return 2
    if args.command is None:
        report(CLIError(), f"choose a command: compute (see '{PROG} --help')", False)
        return 2
    debug = args.debug
    args.argv = argv  # a command may quote its own command line (gram: how to resume after Ctrl-C)
    try:
        return args.func(args)
    except CLIError as exc:
        report(exc, one_line(exc), debug)
        return 2
    except FastNTKError as exc:  # the library's refusals, with its options named as flags
        report(exc, f"{type(exc).__name__}: {in_cli_terms(one_line(exc))}", debug)
        return 2
    except KeyboardInterrupt as exc:
        report(exc, f"interrupted{': ' + one_line(exc) if str(exc) else ''}", debug)
        return 130
    except Exception as exc:
        hint = "" if debug else " (run with --debug for the traceback)"
        if is_out_of_memory(exc):
            message = (f"out of memory ({type(exc).__name__}: {one_line(exc)}); try a smaller --max-memory or "
                       f"--block-size, --mode trace or diagonal, or --method vp{hint}")
        else:
            message = f"unexpected {type(exc).__name__}: {one_line(exc)}{hint}"
        report(exc, message, debug)
        return 1
