"""``fastntk report``: the numbers of :mod:`fastntk.analysis` for a kernel file (written by
``fastntk gram`` or ``fastntk compute``, or any (N, N[, O, O]) array), and a PNG with its
heatmap and spectrum (:func:`fastntk.plots.overview`)."""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import analysis, plots
from .._version import __version__
from ..blocks.schedule import Block
from ..scale import store
from .errors import PROG, CLIError
from .loading import load_batch
from .summary import print_spectrum

PLOT_MAX_ROWS = 8192
"""Largest 2-D matrix side drawn (a heatmap of more rows than pixels shows nothing more)."""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to the ``fastntk`` parser's subcommands."""
    report = commands.add_parser(
        "report",
        help="print the spectrum, condition number, effective rank (and alignment) of a kernel file; plot it",
        description=textwrap.fill(
            "Describe a Gram kernel K(x, x) in a file: its shape and mode, trace, eigenvalue range, "
            "condition number, effective rank (entropy, Roy & Vetterli 2007) and participation ratio, and "
            "with --targets the kernel-target alignment and centred alignment; write its heatmap and "
            "spectrum to --out. Full kernels (N, N, O, O) are analysed as their (N*O) x (N*O) matrix, "
            "sample-major; traced ones (N, N) as they are; diagonal ones (N, N, O) by their sum over "
            "outputs, which is the trace kernel. Everything is computed in float64.",
            width=79,
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} gram --model fastntk.zoo:mlp --x1 train.npy --out k.npy && {PROG} report k.npy\n"
            f"  {PROG} report k.npy --targets labels.npy --out k.png\n"
            "\n"
            "Targets: (N,) or (N, O) (e.g. one-hot classes) in the kernel's sample order, .npy/.npz/.pt.\n"
            "Exit status: 0 success, 2 bad usage or input, 1 unexpected error."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("kernel", metavar="KERNEL", help="the kernel: a .npy file (read as a memmap), or .npz (FILE:KEY) / .pt")
    report.add_argument("--targets", metavar="FILE", help="targets (N,) or (N, O) for the alignments, same formats")
    report.add_argument("--out", metavar="FILE", default="report.png", help="the figure to write (default: report.png; .pdf, .svg too)")
    report.add_argument("--no-plot", action="store_true", help="print the numbers only, write no figure")
    report.add_argument("--debug", action="store_true", help="print the traceback of errors")
    report.set_defaults(func=run_report)
    return report


def load_kernel(spec: str) -> Any:
    """A kernel from a file: a .npy as a read-only memmap (never loaded whole), else a tensor."""
    if Path(spec).suffix.lower() == ".npy":
        if not Path(spec).is_file():
            raise CLIError(f"KERNEL {spec}: no such file")
        try:
            return np.load(spec, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise CLIError(f"KERNEL {spec}: cannot read it: {type(exc).__name__}: {exc}") from exc
    kernel = load_batch(spec, "KERNEL")
    if not isinstance(kernel, torch.Tensor):
        raise CLIError(f"KERNEL {spec}: holds a {type(kernel).__name__}, not one array")
    return kernel


def recorded_mode(path: Path, kernel: Any) -> str | None:
    """The mode in the record ``fastntk gram`` keeps next to ``path``, if that record describes
    this file: same shape and dtype, every journaled block's bytes still with their CRC. Raises
    CLIError when it does but its blocks do not cover the kernel (a run interrupted or running)."""
    try:
        meta = store.read_meta(path) or {}
        shape, dtype, symmetric = tuple(meta["shape"]), np.dtype(meta["dtype"]), bool(meta.get("symmetric"))
    except Exception:  # not a Gram record: the shape tells what it can
        return None
    if shape != tuple(kernel.shape) or dtype != kernel.dtype:
        return None  # the record of another kernel, written over since
    entries, layout = store.read_journals(path)[0], store.Layout(path, shape, dtype)
    fd = os.open(path, os.O_RDONLY)
    try:
        rects = {e.rect for e in entries if layout.crc(fd, store.rects_of(*e.rect, symmetric)) == e.crc}
    finally:
        os.close(fd)
    if any(e.rect not in rects for e in entries):
        return None  # bytes changed since fastntk gram wrote them: not its kernel any more
    whole = Block(0, 0, (0, shape[0]), (0, shape[1]))
    if not store.covered([m for rect in rects for m in store.rects_of(*rect, symmetric)], [whole], shape):
        raise CLIError(
            f"KERNEL {path} is incomplete: fastntk gram has not written all of its blocks (a run interrupted or still "
            "running); rerun the same fastntk gram command, which resumes it"
        )
    return meta.get("fingerprint", {}).get("settings", {}).get("mode")


def mode_of(kernel: Any, spec: str) -> str:
    """The mode: from the record ``fastntk gram`` keeps next to its output, else from the shape."""
    written = recorded_mode(Path(spec), kernel) if Path(spec).suffix.lower() == ".npy" else None
    shape = tuple(kernel.shape)
    if written is not None:
        return f"{written} (recorded by fastntk gram)"
    if len(shape) == 4:
        return "full (from the shape)"
    if len(shape) == 3:
        return "diagonal (from the shape)"
    if len(shape) == 2:
        return "trace or trace_mean (from the shape: traced)"
    raise CLIError(f"KERNEL {spec} has shape {shape}: give a kernel (N, N, O, O), (N, N) or (N, N, O)")


def run_report(args: argparse.Namespace) -> int:
    """``fastntk report``: load, summarise, plot."""
    kernel = load_kernel(args.kernel)
    mode = mode_of(kernel, args.kernel)
    shape = tuple(int(s) for s in kernel.shape)
    if len(shape) >= 2 and shape[0] != shape[1]:
        raise CLIError(
            f"KERNEL {args.kernel} has shape {shape}: a cross kernel K(x1, x2) has no spectrum; "
            "report a Gram kernel K(x, x) (fastntk gram without --x2)"
        )
    analysed = kernel
    print(f"fastntk {__version__}: kernel report")
    print(f"kernel    {shape} {kernel.dtype if isinstance(kernel, np.ndarray) else str(kernel.dtype).removeprefix('torch.')}  from {args.kernel}")
    print(f"mode      {mode}")
    if len(shape) == 3:  # diagonal: Σ_a K[:, :, a] is the trace kernel
        analysed = torch.from_numpy(np.asarray(kernel, dtype=np.float64).sum(-1)) if isinstance(kernel, np.ndarray) else kernel.double().sum(-1)
        print("          analysed: the sum over outputs, (N, N), which is the 'trace' kernel")
    targets = None if args.targets is None else load_batch(args.targets, "--targets")
    if targets is not None and not isinstance(targets, torch.Tensor):
        raise CLIError(f"--targets {args.targets}: holds a {type(targets).__name__}, not one array")
    s = analysis.summary(analysed, targets)
    values = s.eigenvalues
    side = values.numel()
    print(f"matrix    {side} x {side}" + (" (N·O, sample-major)" if s.mode == "full" else ""))
    print(f"trace     {s.trace:.6g}")
    print_spectrum(s)
    if s.alignment is not None:
        print(f"targets   {tuple(targets.shape)} from {args.targets}")
        centred = "undefined (constant targets)" if s.centered_alignment is None else f"{s.centered_alignment:.6g}"
        print(f"alignment {s.alignment:.6g} (Cristianini et al. 2002), centred {centred} (Cortes et al. 2012)")
    if args.no_plot:
        return 0
    if side > PLOT_MAX_ROWS:
        print(f"figure    skipped: the matrix has {side} > {PLOT_MAX_ROWS} rows")
        return 0
    out = Path(args.out)
    try:
        plots.overview(analysed, path=out, eigenvalues=values, title=f"{Path(args.kernel).name}: {mode.split(' (')[0]}")
    except ImportError as exc:
        raise CLIError(f"--out {args.out}: {exc} (or pass --no-plot)") from None
    except (OSError, ValueError) as exc:
        raise CLIError(f"--out {args.out}: cannot write it: {type(exc).__name__}: {exc}") from exc
    print(f"wrote     {out.resolve()}")
    return 0

