"""``fastntk compute``: the kernel of a model on inputs that fit in memory, written to a file,
with a summary (model, shapes, method, time, peak memory, spectrum of the Gram matrix of x1)."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from .._torch_private import pytree

from .. import zoo
from .._version import __version__
from ..scale.store import file_place_problem
from .errors import PROG, CLIError
from .loading import fit_inputs, load_batch, load_model, model_device, model_dtype
from .options import add_alias, add_kernel_options, ntk_options
from .summary import count_parameters, describe_batch, peak_rss_mib, print_spectrum

DEFAULT_N1, DEFAULT_N2 = 20, 5
SPECTRUM_MAX_N = 4096
"""Largest N1 whose Gram spectrum is computed (eigvalsh is O(N1^3), and the Gram may cost a second kernel)."""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``compute`` subcommand to the ``fastntk`` parser's subcommands."""
    compute = commands.add_parser(
        "compute",
        help="compute the eNTK of a model on inputs and write it to a file",
        description=textwrap.fill(
            "Compute the empirical NTK of a model between the samples of x1 and x2, write it to "
            "--out and print a summary (model, shapes, method, time, peak memory, spectrum of the "
            "Gram matrix of x1). The built-in default, used without --model and --x1: the CNN of "
            "PyTorch's 'Neural Tangent Kernels' tutorial (fastntk.zoo.tutorial_cnn, seed --seed) on "
            f"standard-normal CIFAR-shaped inputs, x1 {DEFAULT_N1}x3x32x32 (seed --seed + 1) and x2 "
            f"{DEFAULT_N2}x3x32x32 (seed --seed + 2).",
            width=79,
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} compute                                  # the built-in default, ntk.npy\n"
            f"  {PROG} compute --model nets.py:make --weights w.pt --x1 a.npy --x2 b.npy\n"
            f"  {PROG} compute --model fastntk.zoo:mlp --x1 data.npz:train --mode trace --out k.pt\n"
            "\n"
            "Floating inputs are cast to the model's dtype (or to --dtype).\n"
            "Exit status: 0 success, 2 bad usage or input, 1 unexpected error."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = compute.add_argument_group("model and inputs")
    what.add_argument(
        "--model", metavar="MODULE:ATTR",
        help="the model: ATTR of MODULE (a module name importable from the current directory, or a path "
        "to a .py file); an nn.Module instance, or a callable returning one (called with no arguments "
        "after torch.manual_seed(--seed)). Default: fastntk.zoo.tutorial_cnn",
    )
    what.add_argument(
        "--weights", metavar="FILE",
        help="a state_dict (torch.load with weights_only=True) loaded into the model, strictly",
    )
    what.add_argument(
        "--x1", metavar="FILE",
        help="N1 samples (rows of the kernel): .npy; .npz (its first array, or FILE:KEY); .pt/.pth "
        "(weights_only=True) holding a tensor, or a tuple/list (model(*x)) or dict (model(**x)) of "
        "tensors batched on dim 0. Default: the built-in CIFAR-shaped inputs",
    )
    what.add_argument(
        "--x2", metavar="FILE",
        help="N2 samples (columns of the kernel), same formats as --x1. Default with --x1: none, "
        "the Gram matrix K(x1, x1)",
    )
    what.add_argument(
        "--train-mode", action="store_true",
        help="keep the model in the mode it comes in; by default the CLI calls model.eval() "
        "(dropout off, batch norm with running statistics)",
    )
    what.add_argument("--seed", type=int, default=0, help="seed of the default model/inputs and of a --model factory (default 0)")

    how = compute.add_argument_group("kernel")
    kernel_options = add_kernel_options(
        how, device_help="cpu, cuda, cuda:1, ...: the model and inputs are moved there (default: where the model is)",
    )
    add_alias(how, "--chunk-size", kernel_options["block_size"])  # the name before 0.2; warns

    out = compute.add_argument_group("output")
    out.add_argument("--out", metavar="FILE", default="ntk.npy", help="where to write the kernel: .npy or .pt (default: ntk.npy)")
    out.add_argument("--no-spectrum", action="store_true", help="skip the spectrum summary of the Gram matrix of x1")
    out.add_argument("--plan", action="store_true", help="print the cost plan: estimated FLOPs and memory of every exact method")
    out.add_argument("--quiet", action="store_true", help="no progress bar and no summary: print only the path written")
    out.add_argument("--debug", action="store_true", help="print the traceback of errors")
    compute.set_defaults(func=run_compute)
    return compute


def load_inputs(args: argparse.Namespace) -> tuple[Any, Any, str, str]:
    """x1, x2 (None for the Gram matrix) and where they come from."""
    if args.x1 is None:
        if args.x2 is not None:
            raise CLIError("--x2 needs --x1 (without both, the built-in CIFAR-shaped inputs are used)")
        return (
            zoo.cifar_like_inputs(DEFAULT_N1, seed=args.seed + 1),
            zoo.cifar_like_inputs(DEFAULT_N2, seed=args.seed + 2),
            f"cifar_like_inputs({DEFAULT_N1}, seed={args.seed + 1})",
            f"cifar_like_inputs({DEFAULT_N2}, seed={args.seed + 2})",
        )
    x1 = load_batch(args.x1, "--x1")
    x2 = None if args.x2 is None else load_batch(args.x2, "--x2")
    return x1, x2, args.x1, args.x2 or "x1 (Gram matrix)"


def check_out_path(text: str) -> Path:
    """The output path, validated before any work: suffix .npy/.pt/.pth, existing directory."""
    path = Path(text)
    if path.suffix.lower() not in (".npy", ".pt", ".pth"):
        raise CLIError(f"--out {text}: unsupported file type {path.suffix or '(none)'!r}: use .npy or .pt")
    problem = file_place_problem(path)
    if problem:
        raise CLIError(f"--out {text}{problem}")
    return path


def save_kernel(kernel: torch.Tensor, path: Path) -> None:
    """Write the kernel as .npy (numpy) or .pt (a CPU tensor)."""
    kernel = kernel.detach().cpu()
    try:
        if path.suffix.lower() == ".npy":
            np.save(path, kernel.numpy())
        else:
            torch.save(kernel, path)
    except OSError as exc:
        raise CLIError(f"--out {path}: cannot write it: {exc}") from exc


# ---------------------------------------------------------------------------- compute


def gram_of_result(kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """The (N1, N1) Gram matrix over outputs from a kernel K(x1, x1) of any mode."""
    if mode == "full":
        return torch.diagonal(kernel, dim1=2, dim2=3).sum(-1)
    if mode == "diagonal":
        return kernel.sum(-1)
    return kernel


def run_compute(args: argparse.Namespace) -> int:
    """``fastntk compute``: load, compute, summarise, write."""
    import fastntk

    fastntk.keep_freed_memory()  # this process is ours: repeated kernels reuse freed memory (fastntk._heap)
    say: Callable[..., None] = (lambda *a, **k: None) if args.quiet else print
    out_path = check_out_path(args.out)
    model, model_label = load_model(args)
    x1, x2, x1_label, x2_label = load_inputs(args)
    device = model_device(model)
    options = {**ntk_options(args), "progress": not args.quiet}
    dtype = options["dtype"]
    x1, casts1 = fit_inputs(x1, device, None if dtype else model_dtype(model))
    x2, casts2 = (None, []) if x2 is None else fit_inputs(x2, device, None if dtype else model_dtype(model))
    fn = fastntk.ntk_fn(model, **options)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    plan = fn.plan(x1, x2)
    method, num_outputs = plan.chosen, plan.num_outputs
    say(f"fastntk {__version__}: empirical NTK")
    say(f"model     {model_label}: P = {count_parameters(model):,} parameters, O = {num_outputs if num_outputs is not None else '?'} outputs, "
        f"{'training' if model.training else 'eval'} mode, {device}")
    say(f"x1        {describe_batch(x1)}  from {x1_label}" + (f" (cast {', '.join(casts1)})" if casts1 else ""))
    say(f"x2        {describe_batch(x2) + '  from ' + x2_label if x2 is not None else 'None: the Gram matrix K(x1, x1)'}"
        + (f" (cast {', '.join(casts2)})" if casts2 else ""))
    say(f"mode      {args.mode}, max memory {args.max_memory} ({args.max_memory.bytes:,} bytes)")
    say(f"method    {method}" + (" (chosen by auto)" if args.method == "auto" else ""))
    if args.plan:
        say(textwrap.indent(str(plan), "          "))
    sys.stdout.flush()
    kernel = fn(x1, x2)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    say(f"result    {tuple(kernel.shape)} {str(kernel.dtype).removeprefix('torch.')}")
    say(f"time      {elapsed:.3f} s (wall, including input checks)")
    rss = peak_rss_mib()
    memory = f"peak RSS {rss:.1f} MiB (whole process)" if rss is not None else "peak RSS unavailable"
    if device.type == "cuda":
        memory += f", CUDA max allocated {torch.cuda.max_memory_allocated(device) / 1024**2:.1f} MiB"
    say(f"memory    {memory}")
    if not args.quiet and not args.no_spectrum:
        summarise_spectrum(fastntk, model, x1, x2, kernel, args, options)
    save_kernel(kernel, out_path)
    print(f"wrote     {out_path.resolve()}" if not args.quiet else str(out_path.resolve()))
    return 0


def summarise_spectrum(fastntk: Any, model: nn.Module, x1: Any, x2: Any, kernel: torch.Tensor,
                       args: argparse.Namespace, options: dict[str, Any]) -> None:
    """Print the eigenvalues of the Gram matrix of x1 summed (trace_mean: averaged) over outputs."""
    n1 = pytree.tree_leaves(x1)[0].shape[0]
    reduce = "mean" if args.mode == "trace_mean" else "sum"
    what = f"Gram K(x1, x1) = {reduce} over outputs o of Theta_oo, {n1}x{n1}"
    if n1 > SPECTRUM_MAX_N:
        print(f"spectrum  skipped: N1 = {n1} > {SPECTRUM_MAX_N} (use --no-spectrum to silence this)")
        return
    start = time.perf_counter()
    if x2 is None:
        gram, source = gram_of_result(kernel, args.mode), "from the result"
    else:
        mode = "trace_mean" if args.mode == "trace_mean" else "trace"
        gram = fastntk.ntk_fn(model, **{**options, "mode": mode})(x1)
        source = f"a second kernel, mode {mode}"
    try:
        s = fastntk.analysis.summary(gram)
    except fastntk.predict.KernelError as exc:  # the kernel is still written
        print(f"spectrum  skipped: {exc}")
        return
    took = time.perf_counter() - start
    print(f"gram      {what} ({source}; {took:.2f} s):")
    print_spectrum(s)
