"""Blocks on disk: the journal, resuming after an interruption or a SIGKILL, fingerprints, refusals."""

from __future__ import annotations

import filecmp
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastntk
from conftest import assert_kernel_close
from fastntk import ResumeError
from fastntk.blocks.schedule import all_blocks
from fastntk.scale import store
from gram_helpers import env, inputs, mlp, save

N, BLOCK = 23, 5  # 15 blocks on and above the diagonal, ragged


class Stop(Exception):
    pass


def stop_after(k: int):
    seen = []

    def hook(block):
        seen.append(block)
        if len(seen) == k:
            raise Stop
    return hook, seen


def run(path: Path, **kwargs):
    kwargs.setdefault("block_size", BLOCK)
    kwargs.setdefault("mode", "trace")
    return fastntk.gram(kwargs.pop("model", mlp()), kwargs.pop("data", inputs(N, 1)), out=path, progress=False, **kwargs)


@pytest.fixture
def reference(tmp_path) -> Path:
    path = tmp_path / "reference.npy"
    run(path)
    return path


def journaled(path: Path) -> int:
    return len(store.read_journals(path)[0])


def test_interrupted_run_resumes_to_identical_bytes(tmp_path, reference) -> None:
    path = tmp_path / "k.npy"
    hook, _ = stop_after(6)
    with pytest.raises(Stop):
        run(path, on_block=hook)
    assert journaled(path) == 6
    again = []
    result = run(path, resume=True, on_block=again.append)
    assert len(again) == 15 - 6  # finished blocks are never recomputed
    assert filecmp.cmp(path, reference, shallow=False)
    assert np.array_equal(result, np.load(reference))


def test_resume_of_a_finished_run_computes_nothing(tmp_path, reference) -> None:
    again = []
    run(reference, resume=True, on_block=again.append)
    assert again == []


def test_resume_without_a_file_starts(tmp_path, reference) -> None:
    path = tmp_path / "fresh.npy"
    run(path, resume=True)
    assert filecmp.cmp(path, reference, shallow=False)


def test_unjournaled_block_is_recomputed_and_torn_line_ignored(tmp_path, reference) -> None:
    path = tmp_path / "k.npy"
    hook, seen = stop_after(4)
    with pytest.raises(Stop):
        run(path, on_block=hook)
    # a half-written fifth block: garbage in its rows, no journal line; a torn journal line
    kernel = np.load(path, mmap_mode="r+")
    kernel[10:15, 15:20] = 12345.0
    kernel.flush()
    del kernel
    journal = store.journal_dir(path) / "rank-0.jsonl"
    with open(journal, "a") as fh:
        fh.write('{"i": 2, "j": 3, "ro')
    assert journaled(path) == 4
    run(path, resume=True)
    assert filecmp.cmp(path, reference, shallow=False)
    assert all(json.loads(line) for line in journal.read_text().splitlines())  # the torn line was cut


def test_lost_kernel_file_is_started_again(tmp_path, reference) -> None:
    path = tmp_path / "k.npy"
    hook, _ = stop_after(3)
    with pytest.raises(Stop):
        run(path, on_block=hook)
    path.unlink()
    again = []
    run(path, resume=True, on_block=again.append)
    assert len(again) == 15 and filecmp.cmp(path, reference, shallow=False)


@pytest.mark.parametrize("change, match", [
    (dict(model=mlp(seed=1)), "the model"),
    (dict(data=inputs(N, 2)), "the inputs x1"),
    (dict(data=inputs(N + 1, 1)), "n1: 23 then, 24 now"),
    (dict(mode="full"), "mode: 'trace' then, 'full' now"),
    (dict(dtype=torch.float64), "dtype"),
    (dict(params=["2.weight"]), "the model"),
    (dict(data=inputs(N, 2), mode="diagonal", max_memory="32MB"), r"the inputs x1, the settings \(mode: 'trace' then, 'diagonal'"),
])
def test_a_changed_fingerprint_is_refused(tmp_path, reference, change, match) -> None:
    before = reference.read_bytes()
    with pytest.raises(ResumeError, match=match):
        run(reference, resume=True, **change)
    assert reference.read_bytes() == before


def finished_mask(blocks, n: int) -> np.ndarray:
    """The kernel entries that finished Gram blocks (and their mirrors) hold, brute force."""
    mask = np.zeros((n, n), dtype=bool)
    for b in blocks:
        mask[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = mask[b.cols[0]:b.cols[1], b.rows[0]:b.rows[1]] = True
    return mask


def unfinished(first, n: int, block: int) -> list:
    """(rows, cols) of the Gram blocks of ``block`` samples not wholly within the ``first`` blocks."""
    before = finished_mask(first, n)
    return [(r, c) for r, c in ((b.rows, b.cols) for b in all_blocks(n, n, block, True)) if not before[r[0]:r[1], c[0]:c[1]].all()]


@pytest.mark.parametrize("change", [dict(block_size=7), dict(block_size=3), dict(method="jacobian"), dict(block_size=4, method="vp")])
def test_resume_accepts_another_block_size_or_method(tmp_path, reference, change, caplog) -> None:
    path = tmp_path / "k.npy"
    hook, first = stop_after(6)
    with pytest.raises(Stop):
        run(path, on_block=hook)
    again = []
    with caplog.at_level(logging.WARNING, logger="fastntk.gram"):
        result = run(path, resume=True, on_block=again.append, **change)
    assert "up to float rounding" in caplog.text
    expected = np.load(reference)
    assert_kernel_close(torch.from_numpy(np.array(result)), torch.from_numpy(expected), torch.float32)
    # Only the new blocks not wholly finished before are computed; the finished entries they do not cover keep their bits.
    block = change.get("block_size", BLOCK)
    assert sorted((b.rows, b.cols) for b in again) == unfinished(first, N, block)
    kept = finished_mask(first, N) & ~finished_mask(again, N)
    assert kept.any() and np.array_equal(np.asarray(result)[kept], expected[kept])
    assert json.loads((store.journal_dir(path) / "meta.json").read_text())["plan"]["block"] == block
    later = []
    run(path, resume=True, on_block=later.append)  # back to blocks of 5: the finished file covers them all
    assert later == [] and np.array_equal(np.load(path), np.asarray(result))


def wide_mlp() -> torch.nn.Module:
    """An MLP 5-300-300-3 (P = 93k): its Jacobian's blocks are 14 samples within 64 MB, 7 within 32 MB."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 300), torch.nn.Tanh(), torch.nn.Linear(300, 300), torch.nn.Tanh(),
                                   torch.nn.Linear(300, 3))


def test_resume_with_half_the_memory_after_running_out(tmp_path) -> None:
    x = save(tmp_path / "x.npy", inputs(30, 1))
    kwargs = dict(method="jacobian", progress=False)
    seen = []
    uninterrupted = fastntk.gram(wide_mlp(), x, out=tmp_path / "ref.npy", max_memory="64MB", on_block=seen.append, **kwargs, mode="trace")
    big = seen[0].rows[1]
    path = tmp_path / "k.npy"
    hook, first = stop_after(2)
    with pytest.raises(Stop):
        fastntk.gram(wide_mlp(), x, out=path, max_memory="64MB", on_block=hook, **kwargs, mode="trace")
    again = []
    # The natural retry after running out of memory: the inputs now as a tensor, half the budget.
    result = fastntk.gram(wide_mlp(), inputs(30, 1), out=path, max_memory="32MB", resume=True, on_block=again.append, **kwargs, mode="trace")
    small = again[0].rows[1] - again[0].rows[0]
    assert small < big  # the 64 MB blocks do not fit 32 MB: smaller ones
    assert sorted((b.rows, b.cols) for b in again) == unfinished(first, 30, small)
    kept = finished_mask(first, 30) & ~finished_mask(again, 30)
    assert kept.any() and np.array_equal(np.asarray(result)[kept], np.asarray(uninterrupted)[kept])
    assert_kernel_close(torch.from_numpy(np.array(result)), torch.from_numpy(np.array(uninterrupted)), torch.float32)


def test_train_mode_is_part_of_the_fingerprint(reference) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model.load_state_dict(mlp().state_dict())
    run(reference, resume=True, model=model.train())
    with pytest.raises(ResumeError, match="train/eval"):
        run(reference, resume=True, model=model.eval())


def test_existing_outputs_are_not_clobbered(tmp_path, reference) -> None:
    with pytest.raises(ResumeError, match="resume=True"):
        run(reference)
    foreign = tmp_path / "foreign.npy"
    np.save(foreign, np.ones(3))
    for resume in (False, True):
        with pytest.raises(ResumeError, match="not a fastntk Gram output"):
            run(foreign, resume=resume)
    run(foreign, overwrite=True)
    assert filecmp.cmp(foreign, reference, shallow=False)
    run(reference, overwrite=True, mode="full")
    assert np.load(reference).shape == (N, N, 3, 3)


SCRIPT = textwrap.dedent(
    """
    import sys, time, fastntk
    from gram_helpers import mlp
    fastntk.gram(mlp(), sys.argv[1], out=sys.argv[2], block_size=5, progress=False,
                 on_block=lambda block: time.sleep(0.15), resume=True, mode="trace")
    """
)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path, reference) -> None:
    x = save(tmp_path / "x.npy", inputs(N, 1))
    path = tmp_path / "k.npy"
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(x), str(path)], env=env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and store.journal_dir(path).is_dir() and journaled(path) >= 4:
            break
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    done = journaled(path)
    assert 4 <= done < 15
    again = []
    fastntk.gram(mlp(), str(x), out=path, block_size=BLOCK, progress=False, resume=True, on_block=again.append, mode="trace")
    assert len(again) == 15 - done
    assert filecmp.cmp(path, reference, shallow=False)
