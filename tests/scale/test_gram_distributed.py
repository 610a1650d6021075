"""fastntk.gram under torchrun: 2 ranks (gloo) give the single-process result, bit for bit."""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastntk
from fastntk.scale import store
from gram_helpers import env, free_port, inputs, mlp, save

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow


def torchrun(*args: str, restarts: int = 0, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "--max-restarts", str(restarts), str(HERE / "gram_rank_script.py"), *map(str, args),
    ]
    e = env()
    e["OMP_NUM_THREADS"] = "1"
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=e, cwd=HERE)


def blocks_per_rank(output: str, restart: int = 0) -> dict[int, int]:
    return {int(r): int(n) for r, n in re.findall(rf"rank (\d) computed (\d+) blocks \(restart {restart}\)", output)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranks")
    x, y = save(folder / "x.npy", inputs(23, 1)), save(folder / "y.npy", inputs(17, 2))
    single = folder / "single.npy"
    fastntk.gram(mlp(), str(x), out=single, block_size=5, progress=False, mode="trace")
    single_xy = folder / "single_xy.npy"
    fastntk.gram(mlp(), str(x), str(y), out=single_xy, block_size=5, progress=False, mode="trace")
    return folder, x, y, single, single_xy


def test_two_ranks_write_the_single_rank_file(data) -> None:
    folder, x, _, single, _ = data
    out = folder / "two.npy"
    done = torchrun(x, out)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = blocks_per_rank(done.stdout)
    assert set(counts) == {0, 1} and sum(counts.values()) == 15 and min(counts.values()) >= 6  # balanced
    assert filecmp.cmp(out, single, shallow=False)
    assert len(list(store.journal_dir(out).glob("rank-*.jsonl"))) == 2


def test_two_ranks_gather_an_in_memory_result_to_rank_0(data) -> None:
    folder, x, y, _, single_xy = data
    out = folder / "gathered.npy"
    done = torchrun(x, out, "--x2", y, "--memory")
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.array_equal(np.load(out), np.load(single_xy))


def test_a_dead_rank_is_restarted_and_resumes(data) -> None:
    folder, x, _, single, _ = data
    out = folder / "crash.npy"
    crashed = torchrun(x, out, "--die-after", "3")  # rank 1 dies abruptly; torchrun stops rank 0
    assert crashed.returncode != 0
    finished = len(store.read_journals(out)[0])
    assert 3 <= finished < 15
    done = torchrun(x, out)  # the job started again: the script always passes resume=True
    assert done.returncode == 0, done.stderr[-3000:]
    assert sum(blocks_per_rank(done.stdout).values()) == 15 - finished  # finished blocks are not recomputed
    assert filecmp.cmp(out, single, shallow=False)
