"""The ``fastntk`` command line: ``fastntk compute [options]``.

``main(argv)`` parses the arguments, runs the command and returns the exit status:
0 on success, 2 for bad usage or input (missing files, wrong shapes, any
:class:`fastntk.FastNTKError`, a bad ``--model``), 1 for anything unexpected. Errors are
one line ``fastntk: error: <message>`` on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import textwrap
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from ._torch_private import pytree

from . import __version__, zoo
from ._api import method_names
from ._errors import FastNTKError
from .scale.store import file_place_problem

PROG = "fastntk"
MODES = ("full", "trace", "diagonal", "trace_mean")
DEFAULT_N1, DEFAULT_N2 = 20, 5
SPECTRUM_MAX_N = 4096
"""Largest N1 whose Gram spectrum is computed (eigvalsh is O(N1^3), and the Gram may cost a second kernel)."""


class CLIError(Exception):
    """Bad usage or bad input: reported on one line, exit status 2."""


def method_choices() -> tuple[str, ...]:
    """The valid ``--method`` values, as the library lists them."""
    return method_names()


# ---------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are CLIError (one line, exit 2) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see '{self.prog} --help')")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``fastntk`` argument parser with its subcommands."""
    parser = _Parser(
        prog=PROG,
        description="Exact empirical neural tangent kernels of PyTorch models.",
        epilog=f"Run '{PROG} compute --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

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
    how.add_argument(
        "--mode", choices=MODES, default="full",
        help="full: (N1, N2, O, O); trace: (N1, N2), sum over outputs; diagonal: (N1, N2, O); "
        "trace_mean: (N1, N2), mean over outputs (default: full)",
    )
    how.add_argument("--method", choices=method_choices(), default="auto", help="exact method (default: auto)")
    how.add_argument("--dtype", choices=("float32", "float64"), help="compute in this dtype (default: the model's)")
    how.add_argument("--device", help="cpu, cuda, cuda:1, ...: the model and inputs are moved there (default: where the model is)")
    how.add_argument("--chunk-size", type=positive_int, metavar="N", help="samples per block (bounds memory; default: chosen from the library's memory budget)")

    out = compute.add_argument_group("output")
    out.add_argument("--out", metavar="FILE", default="ntk.npy", help="where to write the kernel: .npy or .pt (default: ntk.npy)")
    out.add_argument("--no-spectrum", action="store_true", help="skip the spectrum summary of the Gram matrix of x1")
    out.add_argument("--plan", action="store_true", help="print the cost plan: estimated FLOPs and memory of every exact method")
    out.add_argument("--quiet", action="store_true", help="no progress bar and no summary: print only the path written")
    out.add_argument("--debug", action="store_true", help="print the traceback of errors")
    compute.set_defaults(func=run_compute)

    from .scale.command import add_parser as add_gram_parser  # `fastntk gram`: large kernels block by block

    add_gram_parser(commands)
    return parser


# ---------------------------------------------------------------------------- model


@contextmanager
def cwd_on_path() -> Iterator[None]:
    """Make modules in the current directory importable, as ``python -m`` does."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def import_target(spec: str) -> Any:
    """The object named by ``MODULE:ATTR`` (ATTR may be dotted; MODULE may be a .py path).

    Raises:
        CLIError: a malformed spec, a module that is missing or fails to import, a missing attribute.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"--model {spec!r}: expected MODULE:ATTR, e.g. mypkg.nets:make_model or nets.py:model")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise CLIError(f"--model {spec!r}: no such file {module_name!r}")
        name = f"_fastntk_cli_model_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise CLIError(f"--model {spec!r}: cannot import {module_name!r} as Python source")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise CLIError(f"--model {spec!r}: importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                raise CLIError(f"--model {spec!r}: no module named {module_name!r} (run from its directory, or give a path to the .py file)") from exc
            raise CLIError(f"--model {spec!r}: importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise CLIError(f"--model {spec!r}: importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CLIError(f"--model {spec!r}: {module_name} has no attribute {attr!r}") from None
    return target


def load_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The model of ``args`` (weights loaded, eval mode unless --train-mode) and a description."""
    if args.model is None:
        model: nn.Module = zoo.tutorial_cnn(seed=args.seed)
        label = f"tutorial_cnn(seed={args.seed}) from fastntk.zoo"
    else:
        with cwd_on_path():
            target = import_target(args.model)
            if isinstance(target, nn.Module):
                model = target
            elif callable(target):
                try:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(args.seed)
                        model = target()
                except Exception as exc:
                    raise CLIError(f"--model {args.model!r}: calling it failed: {type(exc).__name__}: {exc}") from exc
                if not isinstance(model, nn.Module):
                    raise CLIError(f"--model {args.model!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
            else:
                raise CLIError(f"--model {args.model!r} is a {type(target).__name__}: it must be an nn.Module or a callable returning one")
        label = args.model
    if args.weights is not None:
        load_weights(model, args.weights)
        label += f", weights {args.weights}"
    if not args.train_mode:
        model.eval()
    if args.device is not None:
        device = parse_device(args.device)
        try:
            model.to(device)
        except Exception as exc:
            raise CLIError(f"--device {args.device}: cannot move the model there: {type(exc).__name__}: {exc}") from exc
    return model, f"{label} ({type(model).__name__})"


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state_dict file into ``model`` strictly."""
    if not Path(path).is_file():
        raise CLIError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLIError(f"--weights {path}: cannot load it with torch.load(weights_only=True): {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(
            f"--weights {path} holds a {type(state).__name__}, not a state_dict (a dict of tensors); "
            "save model.state_dict(), not a checkpoint or the whole model"
        )
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise CLIError(f"--weights {path} does not fit the model: {exc}") from exc


def parse_device(text: str) -> torch.device:
    """A usable torch.device, or CLIError."""
    try:
        device = torch.device(text)
    except Exception:
        raise CLIError(f"--device {text!r} is not a device: use cpu, cuda, cuda:1, ...") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {text}: CUDA is not available here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {text}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The model's floating dtype, or None if it has none or several."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first tensor (CPU for a model without any)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def count_parameters(model: nn.Module) -> int:
    """P: scalar parameters with requires_grad, tied weights counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------- inputs


def split_key(spec: str) -> tuple[str, str | None]:
    """``FILE`` or ``FILE:KEY`` -> (file, key); an existing file name containing ':' wins."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, _, key = spec.rpartition(":")
    return path, key or None


def to_tensor(value: Any, what: str) -> torch.Tensor:
    """A numpy array or tensor as a tensor."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind not in "biufc":
            raise CLIError(f"{what} has numpy dtype {value.dtype}: inputs must be numeric arrays")
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        return torch.from_numpy(np.ascontiguousarray(value))
    raise CLIError(f"{what} holds a {type(value).__name__}: expected a tensor or array")


def load_batch(spec: str, flag: str) -> Any:
    """A batch from a .npy, .npz or .pt file: a tensor, or a tuple/list/dict of tensors."""
    path, key = split_key(spec)
    what = f"{flag} {spec}"
    if not Path(path).is_file():
        raise CLIError(f"{what}: no such file")
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".npy":
            if key is not None:
                raise CLIError(f"{what}: a .npy file holds one array; :KEY is for .npz and .pt files")
            return to_tensor(np.load(path, allow_pickle=False), what)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if not names:
                    raise CLIError(f"{what}: the .npz file holds no array")
                if key is not None and key not in names:
                    raise CLIError(f"{what}: no array {key!r} in {path}; it holds {', '.join(map(repr, names))}")
                return to_tensor(archive[key if key is not None else names[0]], what)
        if suffix in (".pt", ".pth"):
            value = torch.load(path, map_location="cpu", weights_only=True)
            if key is not None:
                if not isinstance(value, Mapping) or key not in value:
                    held = f"keys {', '.join(map(repr, value))}" if isinstance(value, Mapping) else f"a {type(value).__name__}"
                    raise CLIError(f"{what}: no entry {key!r} in {path}; it holds {held}")
                value = value[key]
            return check_batch_structure(value, what)
    except CLIError:
        raise
    except Exception as exc:
        raise CLIError(f"{what}: cannot read it: {type(exc).__name__}: {exc}") from exc
    raise CLIError(f"{what}: unsupported file type {suffix or '(none)'!r}: use .npy, .npz or .pt")


def check_batch_structure(value: Any, what: str) -> Any:
    """``value`` if it is a tensor or a tuple/list/dict of tensors, else CLIError."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    if isinstance(value, Mapping) and value and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        return dict(value)
    raise CLIError(f"{what} holds a {type(value).__name__}: expected a tensor, or a non-empty tuple/list/dict (str keys) of tensors")


def describe_batch(x: Any) -> str:
    """Shapes and dtypes of a batch, e.g. '(20, 3, 32, 32) float32'."""

    def one(t: torch.Tensor) -> str:
        return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"

    if isinstance(x, torch.Tensor):
        return one(x)
    if isinstance(x, Mapping):
        return "dict {" + ", ".join(f"{k}: {one(v)}" for k, v in x.items()) + "}"
    return f"{type(x).__name__} (" + ", ".join(one(v) for v in x) + ")"


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


def fit_inputs(x: Any, device: torch.device, dtype: torch.dtype | None) -> tuple[Any, list[str]]:
    """Move a batch to ``device`` and cast floating tensors to ``dtype``; also say which dtypes were cast."""
    casts: list[str] = []

    def fit(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            casts.append(f"{str(t.dtype).removeprefix('torch.')} -> {str(dtype).removeprefix('torch.')}")
            t = t.to(dtype)
        return t.to(device)

    return pytree.tree_map(fit, x), sorted(set(casts))


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


def spectrum(gram: torch.Tensor) -> dict[str, float]:
    """Eigenvalue summary of a symmetric PSD matrix, computed with eigvalsh in float64."""
    g = gram.detach().to("cpu", torch.float64)
    eig = torch.linalg.eigvalsh(0.5 * (g + g.T))
    largest, smallest = float(eig[-1]), float(eig[0])
    return {
        "largest": largest,
        "smallest": smallest,
        "condition": largest / smallest if smallest > 0 else float("inf"),
        "effective_rank": float(eig.sum()) / largest if largest > 0 else float("nan"),
    }


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process in MiB (ru_maxrss), or None where unavailable."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def run_compute(args: argparse.Namespace) -> int:
    """``fastntk compute``: load, compute, summarise, write."""
    import fastntk

    fastntk.keep_freed_memory()  # this process is ours: repeated kernels reuse freed memory (fastntk._heap)
    say: Callable[..., None] = (lambda *a, **k: None) if args.quiet else print
    out_path = check_out_path(args.out)
    model, model_label = load_model(args)
    x1, x2, x1_label, x2_label = load_inputs(args)
    device = model_device(model)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    x1, casts1 = fit_inputs(x1, device, None if dtype else model_dtype(model))
    x2, casts2 = (None, []) if x2 is None else fit_inputs(x2, device, None if dtype else model_dtype(model))
    progress = not args.quiet

    options = dict(mode=args.mode, method=args.method, chunk_size=args.chunk_size, dtype=dtype, progress=progress)
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
    say(f"mode      {args.mode}")
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
    s = spectrum(gram)
    took = time.perf_counter() - start
    print(f"spectrum  of the {what} ({source}; eigvalsh in float64, {took:.2f} s):")
    print(f"          largest eigenvalue {s['largest']:.6g}, smallest {s['smallest']:.6g}, "
          f"condition number largest/smallest {s['condition']:.6g}")
    print(f"          effective rank {s['effective_rank']:.4g} (= sum of eigenvalues / largest, i.e. trace / lambda_max; between 1 and {n1})")


# ---------------------------------------------------------------------------- entry point


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


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error of the host or the accelerator."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


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
    except FastNTKError as exc:
        report(exc, f"{type(exc).__name__}: {one_line(exc)}", debug)
        return 2
    except KeyboardInterrupt as exc:
        report(exc, f"interrupted{': ' + one_line(exc) if str(exc) else ''}", debug)
        return 130
    except Exception as exc:
        hint = "" if debug else " (run with --debug for the traceback)"
        if is_out_of_memory(exc):
            message = (f"out of memory ({type(exc).__name__}: {one_line(exc)}); try a smaller --chunk-size, "
                       f"--mode trace or diagonal, or --method vp{hint}")
        else:
            message = f"unexpected {type(exc).__name__}: {one_line(exc)}{hint}"
        report(exc, message, debug)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
