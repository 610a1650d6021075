"""``fastntk.gram``: a kernel over whole datasets, block by block, on disk, resumable, over many ranks.

The pipeline, per call:

1. the inputs become :class:`~fastntk.scale.data.Source`\\ s (read by row range, never whole);
2. the model is validated and probed on the first samples, as :func:`fastntk.ntk` does
   (:class:`~fastntk.NTKFunction`), and the exact method is chosen by the cost model at the
   real N1, N2 (``method="auto"``) and calibrated once on the first two samples;
3. the block size follows from ``max_memory`` (:mod:`~fastntk.scale.budget`);
4. with ``out``, rank 0 takes the output's lock, then creates (or, with ``resume``, checks
   and reopens) the .npy file and its journal (:mod:`~fastntk.scale.store`), fingerprints
   included (:mod:`~fastntk.scale.fingerprint`), every journaled block checked by its CRC;
5. the blocks still to compute are split between ranks (:mod:`~fastntk.scale.schedule`);
   each rank computes its blocks' factors once where the budget keeps them, contracts,
   writes each block (and its mirror for a Gram matrix), reads it back and journals it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from .._torch_private import pytree
from tqdm.auto import tqdm

from .._api import PROBE, NTKFunction, is_positive_int, kernel_context
from .._engine import DEFAULT_MEMORY_BUDGET, calibrate_on_first_block, ranges
from .._errors import ModelError, NonFiniteError, OptionError
from .._functional import FunctionalModel, ParamSelection
from .._inputs import Batch, all_finite, batch_size, check_finite, first_samples, leaves
from .._modes import block_shape, transpose_block
from ..methods import METHODS, KernelMethod
from ..methods.per_sample import vmap_failure
from ..plan import cheapest_usable, estimate, make_plan
from . import store
from .budget import block_for_budget, format_bytes, parse_memory, working_bytes
from .data import DatasetSource, Select, Source, as_source
from .distributed import Group, join
from .fingerprint import differences, fingerprint
from .schedule import Block, FactorCache, all_blocks, in_bands, split
from .store import ResumeError

log = logging.getLogger("fastntk.gram")

HASH_CHUNK = 64 * 2**20
"""Bytes of input read at a time while fingerprinting."""


@dataclass
class Problem:
    """What is computed: the model as a function, the inputs, the result's shape and dtype."""

    fn: NTKFunction
    f: FunctionalModel
    x1: Source
    x2: Source | None
    num_outputs: int
    probe1: Batch
    probe2: Batch | None
    check: bool
    methods: dict[str, KernelMethod] = field(default_factory=dict)

    @property
    def symmetric(self) -> bool:
        return self.x2 is None

    @property
    def n1(self) -> int:
        return len(self.x1)

    @property
    def n2(self) -> int:
        return len(self.x1 if self.x2 is None else self.x2)

    @property
    def shape(self) -> tuple[int, ...]:
        return block_shape(self.fn.mode, self.n1, self.n2, self.num_outputs)

    @property
    def pair_bytes(self) -> int:
        return int(np.prod(self.shape[2:], dtype=np.int64)) * self.f.dtype.itemsize

    @property
    def result_bytes(self) -> int:
        return self.n1 * self.n2 * self.pair_bytes

    @property
    def input_bytes(self) -> int:
        """Bytes of one sample's inputs, as the model receives them."""
        probe = self.probe1
        return -(-sum(t.numel() * t.element_size() for t in leaves(probe)) // batch_size(probe))

    def load(self, source: Source, start: int, stop: int) -> Batch:
        """Samples start:stop of a source on the model's device, floating ones in its dtype; checked finite.

        Every tensor is copied into a fresh allocation of torch's: kernels such as GEMMs may round
        differently depending on the alignment of their operands, and a block's bits must not
        depend on where its inputs happened to lie (an array's offset, a malloc'ed buffer).
        """
        f = self.f

        def fresh(t: torch.Tensor) -> torch.Tensor:
            out = torch.empty(t.shape, dtype=f.dtype if t.is_floating_point() else t.dtype, device=f.device)
            return out.copy_(t)

        x = pytree.tree_map(fresh, source.take(start, stop))
        if self.check:
            check_finite(x, source.name, first=start)
        return x


def gram(
    model: nn.Module,
    data1: Any,
    data2: Any = None,
    *,
    mode: str = "trace",
    method: str = "auto",
    max_memory: int | str = "4GB",
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    block_size: int | None = None,
    params: ParamSelection = None,
    dtype: torch.dtype | None = None,
    select: Select = None,
    check: bool = True,
    progress: bool = True,
    durable: bool = True,
    on_block: Callable[[Block], None] | None = None,
) -> torch.Tensor | np.memmap | None:
    r"""The empirical NTK between two datasets, or the Gram matrix of one, block by block.

    Like :func:`fastntk.ntk`, for inputs and results that need not fit in memory: the
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
        data1: N1 samples: a tensor or numpy array (memmaps included) batched on dim 0, a
            tuple/dict of them (``model(*x)``/``model(**x)``), a path to a .npy file (read
            by row range), or a map-style ``torch.utils.data.Dataset`` or a ``DataLoader``
            over one without shuffling (items collated by its ``collate_fn``).
        data2: N2 samples of the same kind, or None for the Gram matrix K(data1, data1).
        mode: "trace" (default here: (N1, N2), the sum over the O outputs), "trace_mean",
            "diagonal" (N1, N2, O) or "full" (N1, N2, O, O).
        method: "auto" (the cheapest by the cost model at these N1, N2), "jacobian", "vp", "structured".
        max_memory: bytes (int) or a size such as "4GB", "512MiB", bounding the live factors,
            one output block with its copies, and the input blocks, beyond the process's
            baseline (torch, the model, inputs already in memory). Without ``out`` it also
            holds the result, which must fit it.
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
        block_size: samples per block (default: the largest that fits ``max_memory``, at most
            ⌈N/8⌉ but at least 64; a resume keeps the stored one while it fits).
        params, dtype, check: as in :func:`fastntk.ntk`. Floating inputs are cast to the
            model's dtype (or ``dtype``) block by block.
        select: for Datasets and DataLoaders: which part of each collated batch the model
            takes, an index or key (e.g. 0 for (inputs, labels) items) or a function.
        progress: a progress bar (blocks done/total, rate, ETA) on rank 0; False for scripts.
        durable: flush each block to the disk (fdatasync) before journaling it, so finished
            blocks survive a power loss too, not only a crash or kill of the process.
        on_block: called with each :class:`~fastntk.scale.schedule.Block` this rank finished
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
        >>> fastntk.gram(net, torch.randn(50, 3), block_size=16, progress=False).shape
        torch.Size([50, 50])
    """
    budget = parse_memory(max_memory)
    if block_size is not None and not is_positive_int(block_size):
        raise OptionError(f"block_size={block_size!r}: give a positive number of samples per block, or None")
    for name, flag in (("resume", resume), ("overwrite", overwrite), ("progress", progress), ("durable", durable), ("check", check)):
        if not isinstance(flag, bool):
            raise OptionError(f"{name}={flag!r}: pass True or False")
    if resume and overwrite:
        raise OptionError("resume=True and overwrite=True contradict each other: resume keeps the finished blocks, overwrite discards them")
    path = None if out is None else store.check_out_path(out)
    if path is None and resume:
        raise OptionError("resume=True needs out=: only a kernel written to disk can be resumed")
    if on_block is not None and not callable(on_block):
        raise OptionError(f"on_block={on_block!r} is not callable")

    problem = set_up(model, data1, data2, mode=mode, method=method, params=params, dtype=dtype, select=select, check=check, budget=budget)
    group = join(problem.f.device)
    lock = store.OutLock(path) if path is not None and group.rank == 0 else None  # rank 0 holds it for every rank
    try:
        return compute(problem, group, path, lock, mode, budget, resume, overwrite, block_size, progress, durable, on_block)
    except KeyboardInterrupt as exc:
        if path is not None and hasattr(exc, "add_note"):
            exc.add_note(f"fastntk.gram: the finished blocks of {path} are kept: the same call with resume=True continues it")
        raise
    finally:
        if lock is not None:
            lock.release()


def compute(problem: Problem, group: Group, path: Path | None, lock: store.OutLock | None, mode: str, budget: int, resume: bool,
            overwrite: bool, block_size: int | None, progress: bool, durable: bool,
            on_block: Callable[[Block], None] | None) -> torch.Tensor | np.memmap | None:
    """The body of :func:`gram` after validation; rank 0 takes the output's ``lock`` before touching the output."""
    working = budget
    if path is None:
        if problem.result_bytes >= budget:
            raise OptionError(
                f"the kernel alone takes {format_bytes(problem.result_bytes)}, more than max_memory={format_bytes(budget)}: "
                "pass out='kernel.npy' to write it to disk block by block, or raise max_memory"
            )
        working = budget - problem.result_bytes
    if path is not None:
        numpy_dtype(problem.f.dtype)  # refuse dtypes a .npy file cannot hold before any work

    settings = {
        "mode": mode, "dtype": str(problem.f.dtype).removeprefix("torch."), "n1": problem.n1,
        "n2": None if problem.symmetric else problem.n2, "outputs": problem.num_outputs, "fastntk": version(),
    }
    prints = None
    if path is not None or group.distributed:
        started = time.perf_counter()
        prints = fingerprint(problem.f, problem.x1, problem.x2, settings, min(HASH_CHUNK, max(2**20, budget // 8)))
        log.debug("fingerprint in %.2f s: %s", time.perf_counter() - started, prints)

    # Rank 0 decides the plan (or reads it back) and prepares the file; every rank gets its answer.
    decision: Any = None
    if group.rank == 0:
        try:
            if lock is not None:
                lock.acquire()
            decision = decide(problem, path, prints, resume, overwrite, block_size, working)
        except Exception as exc:  # every rank raises it
            if not group.distributed:
                raise
            decision = exc
    plan, done_keys, reference = group.broadcast(decision)
    if prints is not None and group.rank != 0:
        diffs = differences(reference, prints)
        if diffs:
            raise ResumeError(f"rank {group.rank} has other values than rank 0 of {', '.join(diffs)}: every rank must run the same call")
    kernel = build_method(problem, plan["method"])
    if layout_of(kernel) != plan["layout"]:
        raise ResumeError(
            f"rank {group.rank}'s calibration of the structured method differs from rank 0's ({plan['layout']} there, "
            f"{layout_of(kernel)} here): every rank must run the same model and call"
        )
    block = plan["block"]
    need = block_bytes(problem, kernel, block)
    if need > working:
        raise OptionError(
            f"blocks of {block} samples need {format_bytes(need)} but max_memory leaves {format_bytes(working)} for them: "
            "raise max_memory, or pass a smaller block_size"
        )

    blocks = all_blocks(problem.n1, problem.n2, block, problem.symmetric)
    remaining = [b for b in blocks if (b.i, b.j) not in done_keys]
    parts = split(remaining, group.world)
    band = max(1, (working - need) // max(1, block * kernel.bytes_per_sample()))  # block rows whose factors the cache holds
    mine = in_bands(parts[group.rank], band)
    log.info(
        "gram %s, mode %s, method %s, O=%d: blocks of %d samples, %d blocks (%d done before, %d for this run%s), "
        "working set %s, factor cache %s (bands of %d block rows), %s",
        f"{problem.n1}x{problem.n2}" + (" (Gram, blocks on and above the diagonal)" if problem.symmetric else ""),
        mode, kernel.name, problem.num_outputs, block, len(blocks), len(done_keys), len(remaining),
        f"; rank {group.rank} of {group.world}: {len(mine)}" if group.distributed else "",
        format_bytes(need), format_bytes(working - need), band, f"out {path}" if path is not None else "in memory",
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
                crc = writer.write(b.cols, b.rows, transpose_block(value, problem.fn.mode).detach().cpu().numpy(), crc)
            writer.record(b, crc)
        elif result is not None:
            place(result, b, value, problem)
        else:
            kept.append((b, value))

    bar = tqdm(
        total=len(blocks) if not group.distributed else len(mine),
        initial=len(blocks) - len(remaining) if not group.distributed else 0,
        desc="gram blocks" if not group.distributed else f"gram blocks (rank 0 of {group.world})",
        unit="block", disable=not progress or group.rank != 0, dynamic_ncols=True,
    )
    started = time.perf_counter()
    try:
        cache = run_blocks(problem, kernel, mine, block, working - need, sink, on_block, bar)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - started
    pairs = sum(b.cost for b in mine)
    log.info(
        "rank %d: %d blocks, %.3g sample pairs in %.1f s (%.3g pairs/s); factors of %d blocks computed",
        group.rank, len(mine), pairs, elapsed, pairs / elapsed if elapsed else float("nan"), cache.computed,
    )

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
    from .. import __version__

    return __version__


def set_up(model: nn.Module, data1: Any, data2: Any, *, mode: str, method: str, params: ParamSelection, dtype: torch.dtype | None,
           select: Select, check: bool, budget: int) -> Problem:
    """Validate the options, the model and the inputs (probed on their first samples)."""
    fn = NTKFunction(model, mode=mode, method=method, params=params, dtype=dtype, memory_budget=budget, check=check)
    x1 = as_source(data1, "data1", select)
    x2 = None if data2 is None else as_source(data2, "data2", select)
    f = fn.functional()
    problem = Problem(fn, f, x1, x2, 0, None, None, check)  # type: ignore[arg-type]
    problem.probe1 = problem.load(x1, 0, min(PROBE, len(x1)))
    problem.probe2 = None if x2 is None else problem.load(x2, 0, min(PROBE, len(x2)))
    try:
        problem.f, _, _, problem.num_outputs = fn.prepare(problem.probe1, problem.probe2)
    except ModelError as exc:
        if select is None and isinstance(x1, DatasetSource) and isinstance(problem.probe1, (tuple, list)):
            raise ModelError(f"{exc}; the dataset's items are tuples, all passed to the model: for (inputs, labels) items pass select=0") from exc
        raise
    return problem


def calibration_samples(problem: Problem) -> Batch:
    """The samples every method is calibrated on, on every rank and every run: the first two."""
    return first_samples(problem.probe1, problem.probe2, 2)


def build_method(problem: Problem, name: str) -> KernelMethod:
    """Method ``name``, bound to the model and calibrated on the first samples (once per call)."""
    if name not in problem.methods:
        kernel = METHODS[name](problem.f, problem.fn.mode, problem.num_outputs)
        samples = calibration_samples(problem)
        with kernel_context(keep_memory=False):  # (the budget goes unused: the block is given)
            calibrate_on_first_block(kernel, samples, None, batch_size(samples), DEFAULT_MEMORY_BUDGET, keep=False)
        problem.methods[name] = kernel
    return problem.methods[name]


def layout_of(kernel: KernelMethod) -> Any:
    """A JSON-able summary of what the method's calibration decided (the structured groups)."""
    layout = getattr(kernel, "calibration", None)
    if layout is None or not hasattr(layout, "groups"):
        return None
    return {"groups": sorted(sorted(g) for g in layout.groups), "fallback": sorted(layout.fallback)}


def choose(problem: Problem, block_size: int | None, working: int) -> dict[str, Any]:
    """The plan of a fresh run: the method (auto: cheapest estimate at N1, N2) and the block size."""
    name = problem.fn.method
    if name == "auto":
        with kernel_context(keep_memory=False):
            problem.f.batchable = vmap_failure(problem.f, first_samples(problem.probe1, problem.probe2, 1)) is None  # as ntk's auto: the costs differ when looped
            plan, methods = make_plan(problem.f, problem.probe1, problem.probe2, problem.fn.mode, problem.num_outputs, working)
        flops = {
            n: estimate(m, problem.n1, None if problem.symmetric else problem.n2, plan.forward_flops, working) for n, m in methods.items()
        }
        name, _ = cheapest_usable(methods, flops, problem.probe1, working)
        log.info("method auto: estimated GFLOP %s -> %s", {n: round(v / 1e9, 3) for n, v in flops.items()}, name)
    kernel = build_method(problem, name)
    # The largest block that fits: what a block's working set holds (its row factors) is what
    # makes factors reusable, so a separate cache would only shrink it. When the block is capped
    # below what the budget allows (N/8), the rest of the budget caches factors for reuse.
    block = block_size or largest_block(problem, kernel, working)
    return {"method": name, "block": int(block), "layout": layout_of(kernel)}


def block_bytes(problem: Problem, kernel: KernelMethod, block: int) -> int:
    """The working set of blocks of ``block`` samples (:func:`~fastntk.scale.budget.working_bytes`)."""
    return working_bytes(block, block, kernel.bytes_per_sample(), problem.input_bytes, problem.pair_bytes)


def largest_block(problem: Problem, kernel: KernelMethod, working: int) -> int:
    """The block size of a fresh plan: the largest whose working set fits ``working`` bytes."""
    return block_for_budget(problem.n1, problem.n2, kernel.bytes_per_sample(), problem.input_bytes, problem.pair_bytes, working)


def decide(problem: Problem, path: Path | None, prints: dict[str, Any] | None, resume: bool, overwrite: bool,
           block_size: int | None, working: int) -> tuple[dict[str, Any], set[tuple[int, int]], dict[str, Any] | None]:
    """Rank 0: the plan, the blocks already finished, and the fingerprint every rank must match.

    Creates the output (or checks it for resuming) when ``path`` is given.
    """
    if path is None:
        return choose(problem, block_size, working), set(), prints
    assert prints is not None
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
        plan = choose(problem, block_size, working)
        store.create(path, shape, dtype, {"fingerprint": prints, "plan": plan, "shape": list(shape), "dtype": dtype.str,
                                          "symmetric": problem.symmetric})
        return plan, set(), prints
    diffs = differences(meta.get("fingerprint", {}), prints)
    if diffs:
        raise ResumeError(
            f"cannot resume {path}: it was started with other values of {', '.join(diffs)}; resume with the same ones, "
            "or pass overwrite=True to start afresh (or choose another out)"
        )
    plan = replan(problem, meta["plan"], block_size, working)
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


def replan(problem: Problem, stored: dict[str, Any], block_size: int | None, working: int) -> dict[str, Any]:
    """The plan of a resumed run: the stored method and block size unless the call asks otherwise.

    ``method="auto"`` keeps the stored method, another names the one to use; ``block_size=None``
    keeps the stored block size while it fits ``working`` bytes, else takes the largest that fits.
    The plan never changes the kernel's values beyond float rounding (the methods are exact;
    another block size sums the same terms in another order), so a resume accepts any.
    """
    name = stored["method"] if problem.fn.method == "auto" else problem.fn.method
    kernel = build_method(problem, name)
    block = block_size or stored["block"]
    if block_size is None and block_bytes(problem, kernel, block) > working:
        block = largest_block(problem, kernel, working)
    return {"method": name, "block": int(block), "layout": layout_of(kernel)}


def run_blocks(problem: Problem, kernel: KernelMethod, mine: list[Block], block: int, capacity: int,
               sink: Callable[[Block, torch.Tensor], None], on_block: Callable[[Block], None] | None, bar: tqdm) -> FactorCache:
    """Compute this rank's blocks in order, reusing factors through a cache of ``capacity`` bytes."""
    shared = problem.symmetric and kernel.symmetric_factors  # a block's left factors serve as its right ones
    other = problem.x1 if problem.x2 is None else problem.x2
    rows_of, cols_of = ranges(problem.n1, block), ranges(problem.n2, block)
    per_sample = kernel.bytes_per_sample()

    def left_key(b: Block) -> tuple[str, int]:
        return ("right", b.i) if shared else ("left", b.i)

    def right_key(b: Block) -> tuple[str, int]:
        return ("right", b.j)

    # A block fetches its row (column) factors when they differ from those the previous block held.
    fetch_left = [k == 0 or left_key(b) != left_key(mine[k - 1]) for k, b in enumerate(mine)]
    fetch_right = []
    held = None
    for b in mine:
        diagonal = shared and b.i == b.j
        fetch_right.append(not diagonal and right_key(b) != held)
        held = held if diagonal else right_key(b)
    uses: list[tuple[str, int]] = []
    for k, b in enumerate(mine):
        uses += [left_key(b)] if fetch_left[k] else []
        uses += [right_key(b)] if fetch_right[k] else []
    cache = FactorCache(capacity, uses)

    def factors(key: tuple[str, int]) -> Callable[[], Any]:
        side, index = key
        if side == "left":
            rows = rows_of[index]
            return lambda: kernel.left(problem.load(problem.x1, *rows))
        cols = cols_of[index]
        return lambda: kernel.right(problem.load(other, *cols))

    def size(key: tuple[str, int]) -> int:
        side, index = key
        span = (rows_of if side == "left" else cols_of)[index]
        return (span[1] - span[0]) * per_sample

    t = -1
    left: Any = None
    right: Any = None
    started, pairs = time.perf_counter(), 0
    for k, b in enumerate(mine):
        with torch.no_grad(), kernel_context(keep_memory=False):
            if fetch_left[k]:
                t += 1
                left = cache.get(left_key(b), t, size(left_key(b)), factors(left_key(b)))
            if fetch_right[k]:
                t += 1
                right = cache.get(right_key(b), t, size(right_key(b)), factors(right_key(b)))
            current = left if shared and b.i == b.j else right
            value = kernel.contracted(left, current)
        if problem.fn.mean:
            value = value / problem.num_outputs
        if problem.check and not all_finite(value):
            bad = (~torch.isfinite(value)).nonzero()[0]
            raise NonFiniteError(
                f"the kernel contains NaN or inf (first at pair data1[{b.rows[0] + int(bad[0])}], "
                f"{'data1' if problem.symmetric else 'data2'}[{b.cols[0] + int(bad[1])}]) although inputs and parameters are "
                "finite: the model's derivatives overflow or are undefined there; try dtype=torch.float64, or fix the model"
            )
        sink(b, value)
        pairs += b.cost
        log.debug("block (%d, %d) rows %s cols %s done", b.i, b.j, b.rows, b.cols)
        if on_block is not None:
            on_block(b)
        elapsed = time.perf_counter() - started
        bar.set_postfix_str(f"{pairs / max(elapsed, 1e-9):.3g} pairs/s", refresh=False)
        bar.update()
    return cache


def place(result: torch.Tensor, b: Block, value: torch.Tensor, problem: Problem) -> None:
    """Put a block (and its mirror, for a Gram matrix) into the in-memory result."""
    result[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = value
    if problem.symmetric and b.i != b.j:
        result[b.cols[0]:b.cols[1], b.rows[0]:b.rows[1]] = transpose_block(value, problem.fn.mode)


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
            shape = block_shape(problem.fn.mode, b.rows[1] - b.rows[0], b.cols[1] - b.cols[0], problem.num_outputs)
            buffer = torch.empty(shape, dtype=result.dtype, device=result.device)
            group.recv(buffer, rank)
            place(result, b, buffer, problem)
