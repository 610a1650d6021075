"""The output's integrity: one writer at a time (the lock), and no journal line trusted unchecked (CRC-32)."""

from __future__ import annotations

import filecmp
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import zlib

import numpy as np
import pytest

from fastntk.blocks.schedule import all_blocks
from fastntk.scale import store
from fastntk.blocks.schedule import Block
from gram_helpers import env, inputs, mlp, save
from test_gram_resume import BLOCK, N, Stop, journaled, reference, run, stop_after  # noqa: F401 (reference: a fixture)


def test_a_second_writer_is_refused_while_the_first_holds_out(tmp_path, reference) -> None:
    """The race: two runs on one fresh out. The second is refused while the first writes; the first is undisturbed."""
    path = tmp_path / "k.npy"
    writing, go_on = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def hold(block) -> None:
        if not writing.is_set():
            writing.set()
            assert go_on.wait(60)

    def first() -> None:
        try:
            run(path, resume=True, on_block=hold)
        except BaseException as exc:  # reported below
            failures.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert writing.wait(60)  # the first run has created out and written a block, and goes on holding it
        before = path.read_bytes()
        for flags in (dict(resume=True), dict(overwrite=True)):
            with pytest.raises(store.LockedError, match=rf"is being written by another run \(pid {os.getpid()} on .*"
                                                          rf"lock file {re.escape(str(path))}\.lock\): wait for it"):
                run(path, **flags)
        assert path.read_bytes() == before and journaled(path) == 1
    finally:
        go_on.set()
        thread.join(60)
    assert not failures and not thread.is_alive()
    assert filecmp.cmp(path, reference, shallow=False)
    assert not store.lock_path(path).exists()  # released and removed
    run(path, resume=True)  # free again


HOLDER = textwrap.dedent(
    """
    import sys, fastntk
    from gram_helpers import mlp
    def hold(block):
        print("writing", flush=True)
        sys.stdin.readline()  # holds the lock until killed
    fastntk.gram(mlp(), sys.argv[1], out=sys.argv[2], block_size=5, progress=False, on_block=hold, mode="trace")
    """
)


@pytest.mark.slow
def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, reference) -> None:
    x = save(tmp_path / "x.npy", inputs(N, 1))
    path = tmp_path / "k.npy"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(x), str(path)], env=env(), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "writing\n", process.stderr.read()
        with pytest.raises(store.LockedError, match=rf"pid {process.pid} on .*python"):
            run(path, resume=True)
    finally:
        process.kill()
        process.wait(30)
    assert store.lock_path(path).exists()  # a SIGKILL leaves the file, but not the lock
    again = []
    run(path, resume=True, on_block=again.append)
    assert len(again) == 15 - 1 and filecmp.cmp(path, reference, shallow=False)


@pytest.mark.parametrize("error", [Stop, KeyboardInterrupt])
def test_the_lock_is_released_on_every_exit(tmp_path, reference, error) -> None:
    path = tmp_path / "k.npy"

    def fail(block) -> None:
        raise error

    with pytest.raises(error) as raised:
        run(path, on_block=fail)
    assert not store.lock_path(path).exists()
    if error is KeyboardInterrupt:
        assert "the same call with resume=True continues it" in "".join(getattr(raised.value, "__notes__", []))
    lock = store.OutLock(path)  # free: taken at once
    lock.acquire()
    lock.release()
    run(path, resume=True)
    assert filecmp.cmp(path, reference, shallow=False)


def block_rect(kernel: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    return kernel[rows[0]:rows[1], cols[0]:cols[1]]


def test_damaged_blocks_are_detected_and_recomputed(tmp_path, reference, caplog) -> None:
    path = tmp_path / "k.npy"
    hook, first = stop_after(8)
    with pytest.raises(Stop):
        run(path, on_block=hook)
    kernel = np.load(path, mmap_mode="r+")
    block_rect(kernel, (0, 5), (5, 10))[:] = 0  # block (0, 1) zeroed
    block_rect(kernel.view(np.uint32), (15, 20), (5, 10))[2, 3] ^= 1 << 4  # one bit of block (1, 3)'s mirror flipped
    kernel.flush()
    del kernel
    again = []
    with caplog.at_level(logging.WARNING, logger="fastntk.gram"):
        run(path, resume=True, on_block=again.append)
    assert "0 journal lines not trusted (malformed or unknown) and 2 journaled blocks whose bytes fail their CRC-32" in caplog.text
    assert sorted((b.i, b.j) for b in again) == sorted([(0, 1), (1, 3), *unfinished(first)])
    assert filecmp.cmp(path, reference, shallow=False)


def unfinished(first: list[Block]) -> list[tuple[int, int]]:
    """The 15 Gram blocks of 5 samples but ``first``, in order."""
    done = {(b.i, b.j) for b in first}
    return [(i, j) for i, j in ((b.i, b.j) for b in all_blocks(N, N, BLOCK, True)) if (i, j) not in done]


def test_forged_and_unknown_journal_lines_are_not_trusted(tmp_path, reference, caplog) -> None:
    path = tmp_path / "k.npy"
    hook, first = stop_after(4)
    with pytest.raises(Stop):
        run(path, on_block=hook)
    journal = store.journal_dir(path) / "rank-0.jsonl"
    real = json.loads(journal.read_text().splitlines()[0])
    zeros = zlib.crc32(bytes(2 * 5 * 5 * 4))
    lines = [
        {**real, "i": 3, "j": 4, "rows": [15, 20], "cols": [20, 23]},  # block (3, 4) never computed, another block's CRC
        {"i": 2, "j": 3, "rows": [10, 15], "cols": [15, 20], "crc32": zeros + 1},  # never computed, a CRC near zeros'
        {"i": 2, "j": 2, "rows": [10, 15], "cols": [10, 15]},  # the old format: no CRC
        {**real, "extra": 1},  # unknown key
        {**real, "crc32": True},  # not an integer
        {**real, "rows": [0, 50]},  # outside the kernel
        {**real, "rows": [5, 10], "cols": [0, 5]},  # below the diagonal
    ]
    with open(journal, "a") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in lines)
        fh.write("not json\n")
    again = []
    with caplog.at_level(logging.WARNING, logger="fastntk.gram"):
        run(path, resume=True, on_block=again.append)
    assert "6 journal lines not trusted (malformed or unknown) and 2 journaled blocks whose bytes fail their CRC-32" in caplog.text
    assert sorted((b.i, b.j) for b in again) == unfinished(first)
    assert filecmp.cmp(path, reference, shallow=False)
    entries, untrusted = store.read_journals(path)  # rewritten: the blocks kept, then this run's
    assert untrusted == 0 and sorted((e.block.i, e.block.j) for e in entries) == [(i, j) for i in range(5) for j in range(i, 5)]


def test_a_block_that_reads_back_wrong_is_not_journaled(tmp_path, monkeypatch) -> None:
    path = tmp_path / "k.npy"
    real = store.pwrite_all
    monkeypatch.setattr(store, "pwrite_all", lambda fd, data, offset: real(fd, memoryview(bytes(len(data))), offset))
    with pytest.raises(store.WriteError, match=r"block \(0, 0\) of .* reads back other bytes than were written"):
        run(path)
    assert journaled(path) == 0 and not store.lock_path(path).exists()


def test_covered_finds_blocks_of_one_grid_within_another() -> None:
    rects = [((0, 5), (0, 10)), ((5, 10), (0, 4)), ((5, 10), (4, 10))]
    blocks = [Block(0, 0, (0, 7), (0, 7)), Block(0, 1, (0, 7), (7, 10)), Block(1, 1, (7, 12), (7, 10))]
    assert store.covered(rects, blocks, (12, 10)) == blocks[:2]
    assert store.covered([], blocks, (12, 10)) == []


def test_a_lock_file_removed_as_it_is_opened_is_not_trusted(tmp_path) -> None:
    path = tmp_path / "k.npy"
    first, second, third = store.OutLock(path), store.OutLock(path), store.OutLock(path)
    first.acquire()
    fd = os.open(store.lock_path(path), os.O_RDWR)  # the second run opens the file just before the first releases it
    first.release()
    try:
        assert second.lock(fd) == "replaced" and second.fd is None  # it locked a removed file: not the lock
    finally:
        os.close(fd)
    second.acquire()
    with pytest.raises(store.LockedError, match=f"pid {os.getpid()}"):
        third.acquire()
    second.release()
    assert not store.lock_path(path).exists()
