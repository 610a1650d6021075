"""The kernel on disk: a .npy file written block by block, and a journal of finished blocks.

Layout, for ``out="k.npy"``::

    k.npy                 the kernel, a standard .npy file (np.load(path, mmap_mode="r") reads it)
    k.npy.blocks/
        meta.json         fingerprint, plan (method, block size), shape and dtype; written first, atomically
        rank-<r>.jsonl    one line per block rank r finished: {"i":..,"j":..,"rows":[..],"cols":[..]}

The .npy file is created with numpy's own ``open_memmap`` (header and a sparse file of the
full size), then written with positioned writes (``os.pwrite``) of each block's rows, so
blocks written by several processes touch disjoint bytes and written data do not count in
this process's resident memory. A block's journal line is appended only after its data
(and, for a Gram matrix, its mirror below the diagonal) reached the disk (``fdatasync``):
a block interrupted halfway is never recorded, so a resumed run recomputes it. A torn
last journal line (a kill during the append) is ignored and cut off before appending.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .._errors import FastNTKError, OptionError
from .schedule import Block

FORMAT = "fastntk-gram/1"


class ResumeError(FastNTKError, ValueError):
    """An output that cannot be resumed or written: different model, inputs or settings; not ours."""


def journal_dir(path: Path) -> Path:
    return path.with_name(path.name + ".blocks")


def check_out_path(out: str | os.PathLike) -> Path:
    """A usable output path: a .npy file in an existing directory.

    Raises:
        OptionError: another suffix, a missing directory, a directory.
    """
    path = Path(out)
    if path.suffix.lower() != ".npy":
        raise OptionError(f"out={str(out)!r}: the kernel is written as a .npy file; give a path ending in .npy")
    problem = file_place_problem(path)
    if problem:
        raise OptionError(f"out={str(out)!r}{problem}")
    return path


def file_place_problem(path: Path) -> str:
    """Why a file cannot be written at ``path`` ("" if it can be): its directory is missing,
    or the path is a directory. Phrased to follow the path in an error message."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f": the directory {str(parent)!r} does not exist"
    if path.is_dir():
        return " is a directory: give a file name"
    return ""


def read_meta(path: Path) -> dict[str, Any] | None:
    """The meta record next to ``path``, or None."""
    meta = journal_dir(path) / "meta.json"
    if not meta.is_file():
        return None
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{meta} is unreadable ({exc}): delete {journal_dir(path)} and {path}, or pass overwrite=True") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ResumeError(f"{meta} is not a fastntk Gram record ({FORMAT}): pass overwrite=True to replace it")
    return record


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a part."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)


def sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def npy_matches(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether ``path`` is a complete .npy file of this shape and dtype (C order)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:
        return False
    ok = array.shape == shape and array.dtype == dtype and (array.ndim < 2 or array.flags.c_contiguous)
    del array
    return ok


def remove(path: Path) -> None:
    """Delete the kernel file and its journal directory."""
    shutil.rmtree(journal_dir(path), ignore_errors=True)
    if path.exists():
        path.unlink()


def create(path: Path, shape: tuple[int, ...], dtype: np.dtype, meta: dict[str, Any]) -> None:
    """Start a fresh output: the record first (so the kernel file is always ours), then the file."""
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    free = shutil.disk_usage(path.parent if str(path.parent) else ".").free
    if need > free:
        raise OptionError(f"out={str(path)!r}: the kernel takes {need / 2**30:.2f} GiB but its disk has {free / 2**30:.2f} GiB free")
    folder = journal_dir(path)
    folder.mkdir(exist_ok=True)
    for journal in glob.glob(str(folder / "rank-*.jsonl")):
        os.unlink(journal)
    write_atomic(folder / "meta.json", json.dumps({"format": FORMAT, **meta}, indent=1, sort_keys=True))
    create_npy(path, shape, dtype)


def create_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """A .npy file of zeros (sparse where the file system allows), header by numpy."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
    del array
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)


def read_journals(path: Path) -> dict[tuple[int, int], Block]:
    """Every finished block recorded by any rank; torn or malformed lines are skipped."""
    done: dict[tuple[int, int], Block] = {}
    for journal in sorted(glob.glob(str(journal_dir(path) / "rank-*.jsonl"))):
        with open(journal, "rb") as fh:
            data = fh.read()
        for line in data.split(b"\n")[:-1]:  # the part after the last newline is torn
            try:
                entry = json.loads(line)
                record = Block(int(entry["i"]), int(entry["j"]), tuple(entry["rows"]), tuple(entry["cols"]))  # type: ignore[arg-type]
            except (ValueError, KeyError, TypeError):
                continue
            done[(record.i, record.j)] = record
    return done


class Writer:
    """Writes blocks of one rank into the .npy file and records them in its journal."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, rank: int, durable: bool = True) -> None:
        self.path, self.shape, self.dtype, self.durable = path, shape, np.dtype(dtype), durable
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        self.offset = int(array.offset)
        del array
        self.row_items = int(np.prod(shape[1:], dtype=np.int64))  # items per kernel row (N2 x tail)
        self.pair_items = int(np.prod(shape[2:], dtype=np.int64))
        self.fd = os.open(path, os.O_WRONLY)
        journal = journal_dir(path) / f"rank-{rank}.jsonl"
        self.journal = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        cut_torn_tail(journal, self.journal)

    def write(self, rows: tuple[int, int], cols: tuple[int, int], block: np.ndarray) -> None:
        """Put ``block`` (rows x cols x tail, C order) at [rows, cols] of the kernel."""
        block = np.ascontiguousarray(block, dtype=self.dtype)
        item = self.dtype.itemsize
        width = (cols[1] - cols[0]) * self.pair_items * item
        if cols[0] == 0 and cols[1] == self.shape[1]:  # whole rows: one contiguous range
            pwrite_all(self.fd, memoryview(block).cast("B"), self.offset + rows[0] * self.row_items * item)
            return
        flat = memoryview(block.reshape(block.shape[0], -1)).cast("B")
        for k in range(rows[1] - rows[0]):
            start = self.offset + ((rows[0] + k) * self.row_items + cols[0] * self.pair_items) * item
            pwrite_all(self.fd, flat[k * width:(k + 1) * width], start)

    def record(self, i: int, j: int, rows: tuple[int, int], cols: tuple[int, int]) -> None:
        """Make the written data durable, then journal block (i, j) as finished."""
        if self.durable:
            os.fdatasync(self.fd) if hasattr(os, "fdatasync") else os.fsync(self.fd)
        line = json.dumps({"i": i, "j": j, "rows": list(rows), "cols": list(cols)}) + "\n"
        os.write(self.journal, line.encode())

    def close(self) -> None:
        for fd in (self.fd, self.journal):
            try:
                os.fsync(fd)
            except OSError:  # pragma: no cover
                pass
            os.close(fd)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite until every byte is written (a single call may write fewer)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def cut_torn_tail(journal: Path, fd: int) -> None:
    """Cut a torn last line (no newline: a kill during the append) so the next line starts clean."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    with open(journal, "rb") as fh:
        data = fh.read()
    if not data.endswith(b"\n"):
        os.ftruncate(fd, data.rfind(b"\n") + 1)


def finished_all(done: Iterable[tuple[int, int]], expected: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The expected blocks that are not finished."""
    have = set(done)
    return [b for b in expected if b not in have]
