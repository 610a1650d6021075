"""``fastntk gram``: the command line of :func:`fastntk.gram`, a large kernel computed block by
block into a .npy file, resumable, shared between torchrun ranks."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from .._torch_private import pytree

from .._errors import FastNTKError
from ..scale import store
from ..blocks.budget import limit_heap_retention
from .errors import PROG, CLIError
from .loading import load_batch, load_model, model_device, split_key
from .options import add_kernel_options, gram_options, in_cli_terms
from .summary import count_parameters, describe_batch, peak_rss_mib


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``gram`` subcommand to the ``fastntk`` parser's subcommands."""
    gram = commands.add_parser(
        "gram",
        help="compute a large kernel block by block into a .npy file (resumable, multi-process)",
        description=textwrap.fill(
            "Compute the empirical NTK K(x1, x2), or the Gram matrix K(x1, x1) without --x2, block by "
            "block within a memory budget, writing each block to --out (.npy) as it finishes, with a "
            "journal in OUT.blocks/. After a crash, a kill or Ctrl-C, the same command with --resume "
            "continues where it stopped (finished blocks are checked and kept; the result is bit-identical "
            "to an uninterrupted run, or equal up to float rounding where --max-memory, --block-size or "
            "--method changed the blocks or the method); a different model, weights, inputs or settings are "
            "refused, and so is a second run while one writes --out. Under torchrun the ranks share the "
            "blocks. Inputs in .npy files are read by row ranges, never loaded whole.",
            width=79,
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} gram --model fastntk.zoo:mlp --x1 train.npy --out k.npy --max-memory 2GB\n"
            f"  {PROG} gram --model nets.py:make --weights w.pt --x1 a.npy --x2 b.npy --out k.npy --resume\n"
            f"  torchrun --nproc-per-node 2 -m fastntk gram --model fastntk.zoo:mlp --x1 train.npy --out k.npy --resume\n"
            "\n"
            "Floating inputs are cast to the model's dtype (or to --dtype) block by block.\n"
            "Exit status: 0 success, 2 bad usage or input (refused resume included), 1 unexpected error."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = gram.add_argument_group("model and inputs")
    what.add_argument("--model", metavar="MODULE:ATTR", help="the model, as for 'compute' (default: fastntk.zoo.tutorial_cnn)")
    what.add_argument("--weights", metavar="FILE", help="a state_dict loaded into the model, strictly (weights_only=True)")
    what.add_argument(
        "--x1", metavar="FILE", required=True,
        help="N1 samples: a .npy file (read by row ranges, never whole), or .npz (FILE:KEY) / .pt as for 'compute' (loaded in memory)",
    )
    what.add_argument("--x2", metavar="FILE", help="N2 samples, same formats; default: none, the Gram matrix K(x1, x1)")
    what.add_argument("--train-mode", action="store_true", help="keep the model's train/eval mode (default: model.eval())")
    what.add_argument("--seed", type=int, default=0, help="seed of a --model factory and of the default model (default 0)")

    how = gram.add_argument_group("kernel")
    add_kernel_options(
        how,
        device_help="cpu, cuda, cuda:1, ...: where to compute; under torchrun 'cuda' means cuda:LOCAL_RANK (default: where the model is)",
    )

    out = gram.add_argument_group("output")
    out.add_argument("--out", metavar="FILE", default="gram.npy", help="the .npy file to write (default: gram.npy)")
    out.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (starts afresh if there is none)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    out.add_argument("--no-fsync", action="store_true", help="do not fdatasync each block before journaling it (faster; safe against kills, not power loss)")
    out.add_argument("--quiet", action="store_true", help="no progress bar, no log, no summary: print only the path written")
    out.add_argument("--verbose", action="store_true", help="log every block (logging level DEBUG)")
    out.add_argument("--debug", action="store_true", help="print the traceback of errors")
    gram.set_defaults(func=run_gram)
    return gram


def load_input(spec: str, flag: str) -> Any:
    """A .npy path (read lazily by fastntk.gram) or a batch loaded by the 'compute' loaders."""
    path, key = split_key(spec)
    if Path(path).suffix.lower() == ".npy":
        if key is not None:
            raise CLIError(f"{flag} {spec}: a .npy file holds one array; :KEY is for .npz and .pt files")
        if not Path(path).is_file():
            raise CLIError(f"{flag} {spec}: no such file")
        return path
    return load_batch(spec, flag)


def describe_input(x: Any) -> str:
    """Shape, dtype and source of an input: a .npy path (read by its header) or a loaded batch."""
    if isinstance(x, str):
        array = np.load(x, mmap_mode="r", allow_pickle=False)
        text = f"{tuple(array.shape)} {array.dtype}  from {x} (read by row ranges)"
        del array
        return text
    return describe_batch(x)


def configure_logging(args: argparse.Namespace, rank: int) -> None:
    """Log fastntk.gram to stderr: INFO, DEBUG with --verbose, WARNING with --quiet."""
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logger = logging.getLogger("fastntk")
    for old in [h for h in logger.handlers if getattr(h, "_fastntk_cli", False)]:
        logger.removeHandler(old)  # main() may run several times in one process (tests): use today's stderr
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(name)s: %(message)s", "%H:%M:%S"))
    handler._fastntk_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)


def run_gram(args: argparse.Namespace) -> int:
    """``fastntk gram``: load, compute block by block into --out, summarise."""
    import fastntk

    rank = int(os.environ.get("RANK", "0"))
    configure_logging(args, rank)
    limit_heap_retention()  # this process is ours: keep its RSS near --max-memory
    say: Callable[..., None] = (lambda *a, **k: None) if args.quiet or rank != 0 else print
    try:
        out_path = store.check_out_path(args.out)
    except FastNTKError as exc:
        raise CLIError(in_cli_terms(str(exc))) from None
    if args.device == "cuda" and "LOCAL_RANK" in os.environ:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    model, model_label = load_model(args)
    x1 = load_input(args.x1, "--x1")
    x2 = None if args.x2 is None else load_input(args.x2, "--x2")
    device = model_device(model)
    if not isinstance(x1, str):
        x1 = move(x1, device)
    if x2 is not None and not isinstance(x2, str):
        x2 = move(x2, device)

    say(f"fastntk {fastntk.__version__}: kernel block by block")
    say(f"model     {model_label}: P = {count_parameters(model):,} parameters, {'training' if model.training else 'eval'} mode, {device}")
    say(f"x1        {describe_input(x1)}")
    say(f"x2        {describe_input(x2) if x2 is not None else 'None: the Gram matrix K(x1, x1)'}")
    say(f"mode      {args.mode}, max memory {args.max_memory} ({args.max_memory.bytes:,} bytes)")
    sys.stdout.flush()
    start = time.perf_counter()
    try:
        kernel = fastntk.gram(
            model, x1, x2, **gram_options(args), out=out_path, resume=args.resume, overwrite=args.overwrite,
            progress=not args.quiet and rank == 0, durable=not args.no_fsync,
        )
    except KeyboardInterrupt:
        under = "the same torchrun options and " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        raise KeyboardInterrupt(
            f"the finished blocks of {out_path} are kept; to continue, run {under}{resume_command(args.argv)}"
        ) from None
    elapsed = time.perf_counter() - start
    meta = store.read_meta(out_path) or {}
    plan = meta.get("plan", {})
    say(f"method    {plan.get('method', '?')}" + (" (chosen by auto)" if args.method == "auto" else ""))
    say(f"blocks    {plan.get('block', '?')} samples per block")
    say(f"result    {tuple(kernel.shape)} {kernel.dtype}")
    say(f"time      {elapsed:.3f} s (wall, this run{', rank 0' if int(os.environ.get('WORLD_SIZE', '1')) > 1 else ''})")
    rss = peak_rss_mib()
    say(f"memory    {'peak RSS %.1f MiB (whole process)' % rss if rss is not None else 'peak RSS unavailable'}")
    del kernel
    if rank == 0:
        print(f"wrote     {out_path.resolve()}" if not args.quiet else str(out_path.resolve()))
    return 0


def resume_command(argv: list[str]) -> str:
    """The command line that continues a run of ``fastntk gram`` with these arguments: --resume
    instead of --overwrite (and of their abbreviations), quoted for a POSIX shell."""

    def resume_or_overwrite(arg: str) -> bool:
        return len(arg) > 2 and arg.startswith("--") and ("--resume".startswith(arg) or "--overwrite".startswith(arg))

    return shlex.join([PROG, *(a for a in argv if not resume_or_overwrite(a)), "--resume"])


def move(x: Any, device: torch.device) -> Any:
    """A batch moved to ``device``."""
    return pytree.tree_map(lambda t: t.to(device), x)
