"""The kernel on disk: a .npy file written block by block, a journal of verified blocks, a lock.

Layout, for ``out="k.npy"``::

    k.npy                 the kernel, a standard .npy file (np.load(path, mmap_mode="r") reads it)
    k.npy.lock            while a run writes k.npy: its lock, naming the holder (pid, host, command)
    k.npy.blocks/
        meta.json         fingerprint, plan (method, block size), shape and dtype; written first, atomically
        rank-<r>.jsonl    one line per block rank r finished:
                          {"i":..,"j":..,"rows":[..],"cols":[..],"crc32":..}

**One writer at a time.** A run takes an exclusive ``flock`` on ``k.npy.lock`` before it
creates or checks the output and keeps it until it returns, whatever the exit (an exception,
KeyboardInterrupt); a second run is refused with :class:`LockedError`. The kernel drops the
lock when its process dies, even by SIGKILL, so a lock is never stale (a lock file left by a
killed run is simply taken over). Under torchrun rank 0 holds it for the whole job, the other
ranks write under it.

**Blocks.** The .npy file is created with numpy's own ``open_memmap`` (header and a sparse file
of the full size), then written with positioned writes (``os.pwrite``) of each block's rows, so
blocks written by several processes touch disjoint bytes and written data do not count in this
process's resident memory. A block's journal line is appended only after its data (and, for a
Gram matrix, its mirror below the diagonal) reached the disk (``fdatasync``) and were read back
with the CRC-32 they were written with; the line records that CRC. A block interrupted halfway
is never recorded. A torn last journal line (a kill during the append) is cut off.

**Trust on resume** (:func:`finished`): a journal line counts only if it is well formed, lies
within the kernel, and the bytes of its rectangle (and mirror) in the file still have its CRC;
anything else (a zeroed or altered block, a line for a block never written, a malformed or
unknown line) is recomputed. The journal is then rewritten to exactly the blocks kept.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import socket
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .._errors import FastNTKError, OptionError
from ..blocks.schedule import Block

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("fastntk.gram")

FORMAT = "fastntk-gram/2"
"""/2: journal lines carry a CRC-32 and input digests do not depend on the chunk size (/1 did)."""

READ_CHUNK = 4 * 2**20
"""Bytes read at a time when checking a block."""

Span = tuple[int, int]
Rect = tuple[Span, Span]


class ResumeError(FastNTKError, ValueError):
    """An output that cannot be resumed or written: different model, inputs or settings; not ours; in use."""


class LockedError(ResumeError):
    """The output is being written by another run (its lock is held)."""


def journal_dir(path: Path) -> Path:
    return path.with_name(path.name + ".blocks")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


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


class OutLock:
    """The exclusive lock of one output (``<out>.lock``, ``flock``): one writing run at a time.

    The lock file is removed on release while still locked; a run that opened it just before
    then finds another file (or none) at the path and tries again, so two runs never hold
    locks on different files.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.file = path, lock_path(path)
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`LockedError` naming its holder."""
        if fcntl is None:  # pragma: no cover
            log.warning("no file locks on this platform: nothing stops a second run from writing %s at the same time", self.path)
            return
        while self.fd is None:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                outcome = self.lock(fd)
            except BaseException:  # refused, or interrupted: the descriptor (and any lock on it) goes
                os.close(fd)
                raise
            if outcome != "held":
                os.close(fd)
            if outcome == "no locks":
                return

    def lock(self, fd: int) -> str:
        """Lock the open lock file ``fd``: "held" (``self.fd`` set), "replaced" (the holder removed
        the file as it was opened: try the one at the path now), or "no locks" (the file system has none)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(
                f"{self.path} is being written by another run ({read_holder(fd)}; lock file {self.file}): wait for it to "
                "finish or stop it, then run again (resume=True keeps its finished blocks). The lock is released when its "
                "process ends, even if killed: the lock file never needs deleting"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning("the file system of %s offers no locks (%s): nothing stops a second run from writing it at the same time",
                        self.path, exc.strerror)
            return "no locks"
        try:
            current = os.stat(self.file)
        except FileNotFoundError:
            current = None
        if current is None or not os.path.samestat(os.fstat(fd), current):
            return "replaced"
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "command": " ".join(getattr(sys, "orig_argv", sys.argv))[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        return "held"

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing if not held)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.file)
        except OSError:  # pragma: no cover
            pass
        os.close(self.fd)
        self.fd = None


def read_holder(fd: int) -> str:
    """Who holds a lock, from what it wrote into the lock file."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}, command: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it is starting"


def read_meta(path: Path) -> dict[str, Any] | None:
    """The meta record next to ``path``, or None."""
    meta = journal_dir(path) / "meta.json"
    if not meta.is_file():
        return None
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{meta} is unreadable ({exc}): delete {journal_dir(path)} and {path}, or pass overwrite=True") from exc
    if isinstance(record, dict) and str(record.get("format", "")).startswith("fastntk-gram/") and record["format"] != FORMAT:
        raise ResumeError(
            f"{path} was written by another version of fastntk (format {record['format']}, this one reads {FORMAT}): "
            "pass overwrite=True to compute it afresh"
        )
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ResumeError(f"{meta} is not a fastntk Gram record ({FORMAT}): pass overwrite=True to replace it")
    return record


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write the meta record (atomically)."""
    write_atomic(journal_dir(path) / "meta.json", json.dumps({**meta, "format": FORMAT}, indent=1, sort_keys=True))


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
    write_meta(path, meta)
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


class Layout:
    """Where the rectangle [rows, cols] of a C-ordered kernel (N1, N2, *tail) lies in its .npy file."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        self.offset = int(array.offset)
        del array
        self.n2, self.dtype = shape[1], np.dtype(dtype)
        self.pair_bytes = int(np.prod(shape[2:], dtype=np.int64)) * self.dtype.itemsize
        self.row_bytes = self.n2 * self.pair_bytes

    def pieces(self, rows: Span, cols: Span) -> Iterator[tuple[int, int]]:
        """(file offset, bytes) of the rectangle's contiguous pieces, in its C order."""
        if cols == (0, self.n2):  # whole rows: one contiguous range
            yield self.offset + rows[0] * self.row_bytes, (rows[1] - rows[0]) * self.row_bytes
            return
        width = (cols[1] - cols[0]) * self.pair_bytes
        for r in range(rows[0], rows[1]):
            yield self.offset + r * self.row_bytes + cols[0] * self.pair_bytes, width

    def crc(self, fd: int, rects: list[Rect]) -> int:
        """CRC-32 of the rectangles' bytes in the file, one after the other."""
        crc = 0
        for rows, cols in rects:
            for offset, size in self.pieces(rows, cols):
                for start in range(0, size, READ_CHUNK):
                    crc = zlib.crc32(pread_all(fd, min(READ_CHUNK, size - start), offset + start), crc)
        return crc


def rects_of(rows: Span, cols: Span, symmetric: bool) -> list[Rect]:
    """The rectangles a block occupies: itself, and for a Gram matrix off the diagonal its mirror."""
    return [(rows, cols), (cols, rows)] if symmetric and rows != cols else [(rows, cols)]


@dataclass(frozen=True)
class Entry:
    """A journal line: block ``block`` was written with CRC-32 ``crc`` (of it, then its mirror)."""

    block: Block
    crc: int

    @property
    def rect(self) -> Rect:
        return self.block.rows, self.block.cols


def parse_line(line: bytes, shape: tuple[int, ...], symmetric: bool) -> Entry | None:
    """The entry of a journal line, or None unless it is exactly the format and lies within the kernel."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or set(entry) != {"i", "j", "rows", "cols", "crc32"}:
        return None
    spans = [entry["rows"], entry["cols"]]
    numbers = [entry["i"], entry["j"], entry["crc32"], *[v for s in spans if isinstance(s, list) for v in s]]
    if any(not isinstance(s, list) or len(s) != 2 for s in spans) or any(type(v) is not int for v in numbers):
        return None
    (r0, r1), (c0, c1) = spans
    if not (0 <= r0 < r1 <= shape[0] and 0 <= c0 < c1 <= shape[1] and 0 <= entry["crc32"] < 2**32):
        return None
    if symmetric and (r0, r1) != (c0, c1) and c0 < r1:  # a Gram block lies on or above the diagonal
        return None
    return Entry(Block(entry["i"], entry["j"], (r0, r1), (c0, c1)), entry["crc32"])


def read_journals(path: Path) -> tuple[list[Entry], int]:
    """Every journal line of every rank as entries, and how many lines were not trusted
    (malformed, unknown, outside the kernel). A torn last line is neither."""
    meta = read_meta(path) or {}
    shape, symmetric = tuple(meta.get("shape", (0, 0))), bool(meta.get("symmetric"))
    entries, untrusted = [], 0
    for journal in sorted(glob.glob(str(journal_dir(path) / "rank-*.jsonl"))):
        with open(journal, "rb") as fh:
            data = fh.read()
        for line in data.split(b"\n")[:-1]:  # the part after the last newline is torn
            entry = parse_line(line, shape, symmetric)
            if entry is None:
                untrusted += 1
            else:
                entries.append(entry)
    return entries, untrusted


def covered(rects: list[Rect], blocks: list[Block], shape: tuple[int, ...]) -> list[Block]:
    """The blocks that lie wholly within the union of ``rects`` (any grid: coordinates compressed)."""
    rows = sorted({0, shape[0], *(x for r, _ in rects for x in r), *(x for b in blocks for x in b.rows)})
    cols = sorted({0, shape[1], *(x for _, c in rects for x in c), *(x for b in blocks for x in b.cols)})
    at_row, at_col = {x: k for k, x in enumerate(rows)}, {x: k for k, x in enumerate(cols)}
    grid = np.zeros((len(rows) - 1, len(cols) - 1), dtype=bool)
    for r, c in rects:
        grid[at_row[r[0]]:at_row[r[1]], at_col[c[0]]:at_col[c[1]]] = True
    return [b for b in blocks if grid[at_row[b.rows[0]]:at_row[b.rows[1]], at_col[b.cols[0]]:at_col[b.cols[1]]].all()]


@dataclass
class Finished:
    """What a resume found: the blocks of this run's grid already in the file, and what it distrusted."""

    blocks: list[Block]
    untrusted: int
    """Journal lines malformed, unknown or outside the kernel."""
    failed: int
    """Journaled blocks whose bytes no longer have their CRC (zeroed, altered, never written)."""
    rewritten: bool
    """Whether the journal was rewritten (to exactly ``blocks``)."""


def finished(path: Path, blocks: list[Block]) -> Finished:
    """Which of ``blocks`` (the grid of this run) the file holds, every journaled block checked.

    A block counts when it lies within blocks whose lines are trusted and whose bytes still
    have their CRC: blocks of another grid (a resume with another block size) count where they
    cover it. Unless the journal lists exactly those blocks, it is rewritten to them (CRCs read
    from the file), so later runs see one grid and no line whose bytes a recomputed block changes.
    Run under the lock, before any block of this run is written.
    """
    meta = read_meta(path) or {}
    shape, symmetric = tuple(meta["shape"]), bool(meta.get("symmetric"))
    entries, untrusted = read_journals(path)
    layout = Layout(path, shape, np.dtype(meta["dtype"]))
    fd = os.open(path, os.O_RDONLY)
    try:
        checked: dict[Rect, int] = {}
        for e in sorted(set(entries), key=lambda e: (e.rect, e.crc)):  # each distinct line once
            if e.rect not in checked and layout.crc(fd, rects_of(*e.rect, symmetric)) == e.crc:
                checked[e.rect] = e.crc
        failed = len({e.rect for e in entries} - set(checked))
        done = covered([m for rect in checked for m in rects_of(*rect, symmetric)], blocks, shape)
        rewrite = untrusted > 0 or failed > 0 or set(checked) != {(b.rows, b.cols) for b in done}
        if rewrite:
            lines = []
            for b in done:
                crc = checked.get((b.rows, b.cols))
                crc = layout.crc(fd, rects_of(b.rows, b.cols, symmetric)) if crc is None else crc
                lines.append(journal_line(b, crc))
            write_atomic(journal_dir(path) / "rank-0.jsonl", "".join(lines))
            for journal in glob.glob(str(journal_dir(path) / "rank-*.jsonl")):
                if Path(journal).name != "rank-0.jsonl":
                    os.unlink(journal)
    finally:
        os.close(fd)
    return Finished(done, untrusted, failed, rewrite)


def journal_line(b: Block, crc: int) -> str:
    return json.dumps({"i": b.i, "j": b.j, "rows": list(b.rows), "cols": list(b.cols), "crc32": crc}) + "\n"


class WriteError(FastNTKError, OSError):
    """A block read back from the kernel file differs from what was written."""


class Writer:
    """Writes blocks of one rank into the .npy file and records them, checked, in its journal."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, rank: int, symmetric: bool, durable: bool = True) -> None:
        self.path, self.symmetric, self.durable = path, symmetric, durable
        self.layout = Layout(path, shape, dtype)
        self.fd = os.open(path, os.O_RDWR)
        journal = journal_dir(path) / f"rank-{rank}.jsonl"
        self.journal = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        cut_torn_tail(journal, self.journal)

    def write(self, rows: Span, cols: Span, block: np.ndarray, crc: int = 0) -> int:
        """Put ``block`` (rows x cols x tail) at [rows, cols] of the kernel; the CRC-32 of its bytes, continuing ``crc``."""
        data = memoryview(np.ascontiguousarray(block, dtype=self.layout.dtype)).cast("B")
        at = 0
        for offset, size in self.layout.pieces(rows, cols):
            pwrite_all(self.fd, data[at:at + size], offset)
            at += size
        return zlib.crc32(data, crc)

    def record(self, b: Block, crc: int) -> None:
        """Make block b's written data (and mirror) durable, check them against ``crc``, then journal it."""
        if self.durable:
            os.fdatasync(self.fd) if hasattr(os, "fdatasync") else os.fsync(self.fd)
        if self.layout.crc(self.fd, rects_of(b.rows, b.cols, self.symmetric)) != crc:
            raise WriteError(f"block ({b.i}, {b.j}) of {self.path} reads back other bytes than were written: check the disk and file system")
        os.write(self.journal, journal_line(b, crc).encode())

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


def pread_all(fd: int, size: int, offset: int) -> bytes:
    """os.pread of exactly ``size`` bytes (a single call may read fewer)."""
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise WriteError(f"the kernel file ends before byte {offset + size}: it was truncated")
        data += more
    return data


def cut_torn_tail(journal: Path, fd: int) -> None:
    """Cut a torn last line (no newline: a kill during the append) so the next line starts clean."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    with open(journal, "rb") as fh:
        data = fh.read()
    if not data.endswith(b"\n"):
        os.ftruncate(fd, data.rfind(b"\n") + 1)


def missing(path: Path, blocks: list[Block]) -> list[Block]:
    """The blocks that no trusted journal line records (the check at the end of a run)."""
    have = {e.rect for e in read_journals(path)[0]}
    return [b for b in blocks if (b.rows, b.cols) not in have]
