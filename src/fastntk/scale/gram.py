"""``fastntk.gram``: a kernel over whole datasets, block by block, on disk, resumable, over many ranks.

The pipeline, per call:

1. the inputs become :class:`~fastntk.sources.Source`\\ s (read by row range, never whole), the
   model is validated and probed on the first samples, as for :func:`fastntk.ntk` (one set-up);
2. in memory on one rank, the kernel is :func:`fastntk.ntk`'s, computed the same way; else
3. the exact method is chosen by the cost model (``method="auto"``), calibrated once on the
   first two samples (the same on every rank and run), and the block size follows from
   ``max_memory`` (:mod:`~fastntk.blocks.budget`);
4. with ``out``, rank 0 takes the output's lock, then creates (or, with ``resume``, checks
   and reopens) the .npy file and its journal (:mod:`~fastntk.scale.store`), fingerprints
   included (:mod:`~fastntk.scale.fingerprint`), every journaled block checked by its CRC;
5. the blocks still to compute are split between ranks (:mod:`~fastntk.blocks.schedule`);
   each rank computes them with the block engine (:mod:`~fastntk.blocks.engine`), writes each
   block (and its mirror for a Gram matrix), reads it back and journals it.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .._api import NTKFunction
from .._errors import OptionError
from .._functional import ParamSelection
from ..reduction import block_shape, transpose_block
from .._options import options_of
from .._problem import Problem
from ..blocks.budget import DEFAULT_MAX_MEMORY, Sizing, format_bytes
from ..blocks.engine import place, progress_bar, run
from ..blocks.schedule import Block, all_blocks, in_bands, split
from ..methods import KernelMethod
from ..sources import Select
from . import store
from .._version import __version__
from .distributed import Group, join
from .fingerprint import differences, fingerprint
from .store import ResumeError

log = logging.getLogger("fastntk.gram")

HASH_CHUNK = 64 * 2**20
"""Bytes of input read at a time while fingerprinting."""


def gram(
    model: nn.Module,
    x1: Any = None,
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
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    select: Select = None,
    durable: bool = True,
    on_block: Callable[[Block], None] | None = None,
    **renamed: Any,
) -> torch.Tensor | np.memmap | None:
    r"""The empirical NTK between two datasets, or the Gram matrix of one, block by block.

    :func:`fastntk.ntk` (the same options and engine) for inputs and results that need not fit in memory: the
    kernel is cut into blocks that fit ``max_memory``, per-sample factors are computed once
    per block and reused by every block they meet (as far as the budget keeps them), for a
    Gram matrix only blocks on or above the diagonal are computed (the rest mirrored), and
    with ``out`` each block goes to a .npy file as soon as it is done, with a journal that
    lets an interrupted run continue (``resume=True``). Under ``torchrun`` (or an
    initialised ``torch.distributed``) the blocks are shared between the ranks.

    What a resume guarantees: the kernel's values are fixed by the fingerprint (model and
    weights, parameter selection, train/eval flags, inputs as the model receives them, mode,
    dtype, fastntk's version), and a resume that differs in any of them is refused, naming
    it. Everything else may change: ``max_memory``, ``progress``, ``durable``, the number of
    ranks, and the plan. When the plan is kept (the default: ``method="auto"`` keeps the
    stored method, ``block_size=None`` the stored block size while it fits ``max_memory``),
    the finished file is bit-identical to an uninterrupted run (same hardware and
    software). When it changes (a ``max_memory`` the stored blocks do not fit, another
    ``block_size`` or ``method``), finished blocks are kept where they cover blocks of the
    new size and the rest is computed with the new plan: each entry then equals the
    uninterrupted run's up to float rounding (the methods are exact; other block sizes sum
    in another order), as a warning says.

    Args:
        model: any ``nn.Module``, used as it is (see :func:`fastntk.ntk`).
        x1: N1 samples: a tensor or numpy array (memmaps included) batched on dim 0, a
            tuple/dict of them (``model(*x)``/``model(**x)``), a path to a .npy file (read
            by row range), or a map-style ``torch.utils.data.Dataset`` or a ``DataLoader``
            over one without shuffling (items collated by its ``collate_fn``).
        x2: N2 samples of the same kind, or None for the Gram matrix K(x1, x1).
        mode: as in :func:`fastntk.ntk`.
        method: as in :func:`fastntk.ntk`.
        params: as in :func:`fastntk.ntk`.
        dtype: as in :func:`fastntk.ntk`; floating inputs are cast to it block by block.
        block_size: samples per block (default: the largest that fits ``max_memory``, cut to at
            least 8 block rows of at least 64 samples when written to ``out`` or shared by ranks;
            a resume keeps the stored one while it fits).
        max_memory: bytes (int) or a size such as "4GB", "512MiB", bounding the live factors,
            one output block with its copies, and the input blocks, beyond the process's
            baseline (torch, the model, inputs already in memory). Without ``out`` it also
            holds the result, which must fit it.
        check: as in :func:`fastntk.ntk`.
        progress: a progress bar (blocks done/total, rate, ETA) on rank 0.
        out: a .npy path: the kernel is written there block by block (returned as a
            read-only ``np.memmap``), with a journal in ``<out>.blocks/``. None: in memory.
            One run at a time writes it: ``<out>.lock`` holds an OS lock (``flock``) while a
            run (under torchrun, rank 0 for all ranks) works on it, released on any exit and
            by the OS when the process dies, so a killed run leaves no stale lock.
        resume: continue the computation in ``out``: the journaled blocks whose bytes pass
            their CRC-32 are kept, the rest (and any block damaged, zeroed or journaled but
            never written) computed; refused unless the model, its weights, the inputs and
            the settings are the ones it was started with (see above). Without an existing
            ``out`` it simply starts.
        overwrite: replace an existing ``out`` (otherwise an existing file is refused).
        select: for Datasets and DataLoaders: which part of each collated batch the model
            takes, an index or key (e.g. 0 for (inputs, labels) items) or a function.
        durable: flush each block to the disk (fdatasync) before journaling it, so finished
            blocks survive a power loss too, not only a crash or kill of the process.
        on_block: called with each :class:`~fastntk.blocks.schedule.Block` this rank finished
            (after it is written and journaled).

    Returns:
        The kernel, shaped like :func:`fastntk.ntk`'s: with ``out``, a read-only ``np.memmap``
        of the file (every rank); without, a tensor on the model's device on rank 0 and
        None on the other ranks.

    Raises:
        OptionError: bad options, a budget too small for one sample, an in-memory result
            larger than ``max_memory``.
        ResumeError: an existing ``out`` without ``resume``/``overwrite``, or one computed
            from another model, other weights, inputs or settings.
        LockedError: (a ResumeError) ``out`` is being written by another run, named.
        InputError, ModelError, SelectionError, NonFiniteError: as :func:`fastntk.ntk`.

    Example:
        >>> import torch, fastntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> fastntk.gram(net, torch.randn(50, 3), mode="trace", block_size=16).shape
        torch.Size([50, 50])
    """
    for old, new in (("data1", "x1"), ("data2", "x2")):  # fastntk 0.1's names of the inputs
        if old in renamed:
            warnings.warn(f"fastntk.gram: {old}= is deprecated, use {new}=", DeprecationWarning, stacklevel=2)
            x1, x2 = (renamed.pop(old), x2) if new == "x1" else (x1, renamed.pop(old))
    if x1 is None:
        raise OptionError("fastntk.gram needs x1, the samples: a tensor, array, .npy path, Dataset or DataLoader")
    given = dict(mode=mode, method=method, params=params, dtype=dtype, block_size=block_size, max_memory=max_memory, check=check, progress=progress)
    extra = ("out", "resume", "overwrite", "select", "durable", "on_block")
    options = options_of({**given, **renamed}, stacklevel=2, extra=extra)
    for name, flag in (("resume", resume), ("overwrite", overwrite), ("durable", durable)):
        if not isinstance(flag, bool):
            raise OptionError(f"{name}={flag!r}: pass True or False")
    if resume and overwrite:
        raise OptionError("resume=True and overwrite=True contradict each other: resume keeps the finished blocks, overwrite discards them")
    path = None if out is None else store.check_out_path(out)
    if path is None and resume:
        raise OptionError("resume=True needs out=: only a kernel written to disk can be resumed")
    if on_block is not None and not callable(on_block):
        raise OptionError(f"on_block={on_block!r} is not callable")

    fn = NTKFunction(model, options)
    problem = fn._problem(x1, x2, select)
    group = join(problem.f.device)
    if path is None and not group.distributed:  # in memory on one rank: ntk's kernel
        return fn._in_memory(problem, on_block=on_block)
    lock = store.OutLock(path) if path is not None and group.rank == 0 else None  # rank 0 holds it for every rank
    try:
        return compute(fn, problem, group, path, lock, resume, overwrite, durable, on_block)
    except KeyboardInterrupt as exc:
        if path is not None and hasattr(exc, "add_note"):
            exc.add_note(f"fastntk.gram: the finished blocks of {path} are kept: the same call with resume=True continues it")
        raise
    finally:
        if lock is not None:
            lock.release()


def compute(fn: NTKFunction, problem: Problem, group: Group, path: Path | None, lock: store.OutLock | None, resume: bool,
            overwrite: bool, durable: bool, on_block: Callable[[Block], None] | None) -> torch.Tensor | np.memmap | None:
    """The body of :func:`gram` on disk or over ranks; rank 0 takes the output's ``lock`` before touching the output."""
    options = problem.options
    budget = options.max_memory
    reserved = 0
    if path is None:  # in memory over ranks: the result on rank 0 counts
        reserved = fn._in_memory_sizing(problem).reserved
    else:
        numpy_dtype(problem.f.dtype)  # refuse dtypes a .npy file cannot hold before any work
    working = budget - reserved
    sizing = problem.sizing(working, partitioned=True, reserved=reserved)

    settings = {
        "mode": options.mode_name, "dtype": str(problem.f.dtype).removeprefix("torch."), "n1": problem.n1,
        "n2": None if problem.symmetric else problem.n2, "outputs": problem.num_outputs, "fastntk": version(),
    }
    started = time.perf_counter()
    prints = fingerprint(problem.f, problem.x1, problem.x2, settings, min(HASH_CHUNK, max(2**20, budget // 8)))
    log.debug("fingerprint in %.2f s: %s", time.perf_counter() - started, prints)

    # Rank 0 decides the plan (or reads it back) and prepares the file; every rank gets its answer.
    methods: dict[str, KernelMethod] = {}
    decision: Any = None
    if group.rank == 0:
        try:
            if lock is not None:
                lock.acquire()
            decision = decide(fn, problem, methods, path, prints, resume, overwrite, sizing)
        except Exception as exc:  # every rank raises it
            if not group.distributed:
                raise
            decision = exc
    plan, done_keys, reference = group.broadcast(decision)
    if group.rank != 0:
        diffs = differences(reference, prints)
        if diffs:
            raise ResumeError(f"rank {group.rank} has other values than rank 0 of {', '.join(diffs)}: every rank must run the same call")
    method = calibrated(fn, problem, methods, plan["method"])
    if layout_of(method) != plan["layout"]:
        raise ResumeError(
            f"rank {group.rank}'s calibration of the structured method differs from rank 0's ({plan['layout']} there, "
            f"{layout_of(method)} here): every rank must run the same model and call"
        )
    block = plan["block"]
    sizing.check(method, block)
    need = sizing.working(method, block)

    blocks = all_blocks(problem.n1, problem.n2, block, problem.symmetric)
    remaining = [b for b in blocks if (b.i, b.j) not in done_keys]
    parts = split(remaining, group.world)
    capacity = sizing.cache_capacity(method, block)
    band = max(1, capacity // max(1, block * method.bytes_per_sample()))  # block rows whose factors the cache holds
    mine = in_bands(parts[group.rank], band)
    log.info(
        "gram %s, mode %s, method %s, O=%d: blocks of %d samples, %d blocks (%d done before, %d for this run%s), "
        "working set %s, factor cache %s (bands of %d block rows), %s",
        f"{problem.n1}x{problem.n2}" + (" (Gram, blocks on and above the diagonal)" if problem.symmetric else ""),
        options.mode_name, method.name, problem.num_outputs, block, len(blocks), len(done_keys), len(remaining),
        f"; rank {group.rank} of {group.world}: {len(mine)}" if group.distributed else "",
        format_bytes(need), format_bytes(capacity), band, f"out {path}" if path is not None else "in memory",
    )

    result: torch.Tensor | None = None
    writer = None
    if path is not None:
        writer = store.Writer(path, problem.shape, numpy_dtype(problem.f.dtype), group.rank, problem.symmetric, durable)
    elif group.rank == 0:
        result = torch.empty(problem.shape, device=problem.f.device, dtype=problem.f.dtype)
    kept: list[tuple[Block, torch.Tensor]] = []

    def sink(b: Block, value: torch.Tensor) -> None:
        if writer is not None:
            crc = writer.write(b.rows, b.cols, value.detach().cpu().numpy())
            if problem.symmetric and b.i != b.j:
                crc = writer.write(b.cols, b.rows, transpose_block(value, options.mode).detach().cpu().numpy(), crc)
            writer.record(b, crc)
        elif result is not None:
            place(result, b, value, problem.symmetric, options.mode)
        else:
            kept.append((b, value))

    bar = progress_bar(
        options.progress and group.rank == 0,
        total=len(blocks) if not group.distributed else len(mine),
        initial=len(blocks) - len(remaining) if not group.distributed else 0,
        desc="gram blocks" if not group.distributed else f"gram blocks (rank 0 of {group.world})",
    )
    try:
        run(problem.kernel(method), mine, block, capacity, sink, bar=bar, on_block=on_block)
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    if path is None:
        gather(group, parts, kept, result, problem)
        return result
    group.barrier()
    status = None
    if group.rank == 0:
        missing = store.missing(path, blocks)
        if missing:
            status = ResumeError(f"{len(missing)} blocks of {path} are not finished (a rank failed?): run again with resume=True")
    group.broadcast(status)  # raises it on every rank
    return np.load(path, mmap_mode="r", allow_pickle=False)


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype, for the .npy file.

    Raises:
        OptionError: a dtype numpy lacks (bfloat16).
    """
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        raise OptionError(f"a .npy file cannot hold {dtype}: pass dtype=torch.float32 (or compute in memory without out=)") from None


def version() -> str:
    return __version__


def calibrated(fn: NTKFunction, problem: Problem, methods: dict[str, KernelMethod], name: str) -> KernelMethod:
    """Method ``name`` calibrated on the first two samples, the same on every rank and every run
    whatever the block size (once per call)."""
    if name not in methods:
        sizing = problem.sizing(problem.options.max_memory, partitioned=True)  # unused: the block is given
        methods[name] = fn._calibrated(problem, fn._bound(name, problem), sizing, keep=False, samples=2)[0]
    return methods[name]


def layout_of(kernel: KernelMethod) -> Any:
    """A JSON-able summary of what the method's calibration decided (the structured groups)."""
    layout = getattr(kernel, "calibration", None)
    if layout is None or not hasattr(layout, "groups"):
        return None
    return {"groups": sorted(sorted(g) for g in layout.groups), "fallback": sorted(layout.fallback)}


def choose(fn: NTKFunction, problem: Problem, methods: dict[str, KernelMethod], sizing: Sizing) -> dict[str, Any]:
    """The plan of a fresh run: the method (auto: the cheapest estimate) and the block size."""
    name = problem.options.method
    if name == "auto":
        plan, _ = fn._plan(problem, sizing)
        name = plan.chosen
        log.info("method auto: estimated GFLOP %s -> %s", {n: round(v / 1e9, 3) for n, v in plan.flops.items()}, name)
    method = calibrated(fn, problem, methods, name)
    block = problem.options.block_size or sizing.block(method)
    return {"method": name, "block": int(block), "layout": layout_of(method)}


def decide(fn: NTKFunction, problem: Problem, methods: dict[str, KernelMethod], path: Path | None, prints: dict[str, Any],
           resume: bool, overwrite: bool, sizing: Sizing) -> tuple[dict[str, Any], set[tuple[int, int]], dict[str, Any]]:
    """Rank 0: the plan, the blocks already finished, and the fingerprint every rank must match.

    Creates the output (or checks it for resuming) when ``path`` is given.
    """
    if path is None:
        return choose(fn, problem, methods, sizing), set(), prints
    folder = store.journal_dir(path)
    meta = None if overwrite else store.read_meta(path)
    if overwrite:
        store.remove(path)
    elif meta is None and path.exists():
        raise ResumeError(
            f"{path} exists and is not a fastntk Gram output (no {folder}/meta.json): pass overwrite=True to replace it, or choose another out"
        )
    elif meta is not None and not resume:
        finished = len(store.read_journals(path)[0])
        raise ResumeError(
            f"{path} already holds a Gram computation ({finished} blocks finished): pass resume=True to continue it, "
            "or overwrite=True to start afresh"
        )
    shape, dtype = problem.shape, numpy_dtype(problem.f.dtype)
    if meta is None:
        plan = choose(fn, problem, methods, sizing)
        store.create(path, shape, dtype, {"fingerprint": prints, "plan": plan, "shape": list(shape), "dtype": dtype.str,
                                          "symmetric": problem.symmetric})
        return plan, set(), prints
    diffs = differences(meta.get("fingerprint", {}), prints)
    if diffs:
        raise ResumeError(
            f"cannot resume {path}: it was started with other values of {', '.join(diffs)}; resume with the same ones, "
            "or pass overwrite=True to start afresh (or choose another out)"
        )
    plan = replan(fn, problem, methods, meta["plan"], sizing)
    changes = [f"{what} {meta['plan'][key]!r} then, {plan[key]!r} now" if key != "layout" else f"another {what}"
               for key, what in PLAN_PARTS.items() if plan[key] != meta["plan"][key]]
    if changes:  # the journal is rewritten to the new plan's blocks below: the record must say which
        meta = {**meta, "plan": plan, "earlier_plans": [*meta.get("earlier_plans", []), meta["plan"]]}
        store.write_meta(path, meta)
    if not store.npy_matches(path, shape, dtype):
        log.warning("%s is missing or incomplete: starting it again", path)
        store.create(path, shape, dtype, {k: v for k, v in meta.items() if k != "earlier_plans"})
        return plan, set(), prints
    blocks = all_blocks(problem.n1, problem.n2, plan["block"], problem.symmetric)
    found = store.finished(path, blocks)
    if found.untrusted or found.failed:
        log.warning(
            "%s: %d journal lines not trusted (malformed or unknown) and %d journaled blocks whose bytes fail their CRC-32 "
            "(zeroed, altered or never written): what they claimed is computed again", path, found.untrusted, found.failed,
        )
    log.info("resuming %s: %d of %d blocks finished and checked", path, len(found.blocks), len(blocks))
    if changes and len(found.blocks) < len(blocks):
        log.warning("resuming %s with %s: the blocks computed now agree with the finished ones up to float rounding, not bit for bit",
                    path, "; ".join(changes))
    return plan, {(b.i, b.j) for b in found.blocks}, prints


PLAN_PARTS = {"method": "method", "block": "block size", "layout": "calibration of the structured method"}


def replan(fn: NTKFunction, problem: Problem, methods: dict[str, KernelMethod], stored: dict[str, Any], sizing: Sizing) -> dict[str, Any]:
    """The plan of a resumed run: the stored method and block size unless the call asks otherwise.

    ``method="auto"`` keeps the stored method, another names the one to use; ``block_size=None``
    keeps the stored block size while it fits the budget, else takes the largest that fits.
    The plan never changes the kernel's values beyond float rounding (the methods are exact;
    another block size sums the same terms in another order), so a resume accepts any.
    """
    options = problem.options
    name = stored["method"] if options.method == "auto" else options.method
    method = calibrated(fn, problem, methods, name)
    block = options.block_size or stored["block"]
    if options.block_size is None and sizing.working(method, block) > sizing.budget:
        block = sizing.block(method)
    return {"method": name, "block": int(block), "layout": layout_of(method)}


def gather(group: Group, parts: list[list[Block]], kept: list[tuple[Block, torch.Tensor]], result: torch.Tensor | None, problem: Problem) -> None:
    """Send every rank's blocks to rank 0 (in schedule order) for an in-memory result."""
    if not group.distributed:
        return
    if group.rank != 0:
        for _, value in sorted(kept, key=lambda item: (item[0].i, item[0].j)):  # the order of parts[rank]
            group.send(value.contiguous(), 0)
        return
    assert result is not None
    for rank in range(1, group.world):
        for b in parts[rank]:
            shape = block_shape(problem.options.mode, b.rows[1] - b.rows[0], b.cols[1] - b.cols[0], problem.num_outputs)
            buffer = torch.empty(shape, dtype=result.dtype, device=result.device)
            group.recv(buffer, rank)
            place(result, b, buffer, problem.symmetric, problem.options.mode)
