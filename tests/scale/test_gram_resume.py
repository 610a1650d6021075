"""Blocks on disk: the journal, resuming after an interruption or a SIGKILL, fingerprints, refusals."""

from __future__ import annotations

import filecmp
import json
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
from fastntk import ResumeError
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
    return fastntk.gram(kwargs.pop("model", mlp()), kwargs.pop("data", inputs(N, 1)), out=path, progress=False, **kwargs)


@pytest.fixture
def reference(tmp_path) -> Path:
    path = tmp_path / "reference.npy"
    run(path)
    return path


def journaled(path: Path) -> int:
    return len(store.read_journals(path))


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
    (dict(data=inputs(N, 2)), "the inputs data1"),
    (dict(data=inputs(N + 1, 1)), "n1: 23 then, 24 now"),
    (dict(mode="full"), "mode: 'trace' then, 'full' now"),
    (dict(dtype=torch.float64), "dtype"),
    (dict(params=["2.weight"]), "the model"),
    (dict(method="jacobian"), "method='jacobian'"),
    (dict(block_size=6), "block_size=6"),
])
def test_a_changed_fingerprint_is_refused(tmp_path, reference, change, match) -> None:
    before = reference.read_bytes()
    with pytest.raises(ResumeError, match=match):
        run(reference, resume=True, **change)
    assert reference.read_bytes() == before


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
                 on_block=lambda block: time.sleep(0.15), resume=True)
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
    fastntk.gram(mlp(), str(x), out=path, block_size=BLOCK, progress=False, resume=True, on_block=again.append)
    assert len(again) == 15 - done
    assert filecmp.cmp(path, reference, shallow=False)
