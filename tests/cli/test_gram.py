"""``fastntk gram``: the command line end to end (in process), its resume and its refusals."""

from __future__ import annotations

import filecmp
import shlex
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fastntk
from fastntk import cli
from fastntk.scale import store

NETS = textwrap.dedent(
    """
    import torch
    from torch import nn


    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    """
)


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(NETS)
    save(tmp_path / "x.npy", inputs(23, 1))
    save(tmp_path / "y.npy", inputs(17, 2))
    return tmp_path


def inputs(n: int, seed: int, dim: int = 5) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def save(path: Path, x: torch.Tensor) -> Path:
    np.save(path, x.numpy())
    return path


def gram(*args: str) -> int:
    return cli.main(["gram", "--model", "nets.py:make", "--x1", "x.npy", "--block-size", "5", *args])


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).eval()


def test_gram_writes_the_library_result(files, capsys) -> None:
    assert gram("--out", "k.npy", "--mode", "full") == 0
    printed = capsys.readouterr().out
    assert "method    structured (chosen by auto)" in printed and "wrote" in printed
    expected = fastntk.gram(model(), "x.npy", mode="full", block_size=5, out=files / "lib.npy", progress=False)
    assert filecmp.cmp(files / "k.npy", files / "lib.npy", shallow=False)
    assert expected.shape == (23, 23, 3, 3)
    assert gram("--x2", "y.npy", "--out", "xy.npy", "--mode", "trace", "--quiet") == 0
    assert capsys.readouterr().out.strip() == str((files / "xy.npy").resolve())
    assert np.load(files / "xy.npy").shape == (23, 17)


def test_gram_resume_and_refusals(files, capsys) -> None:
    assert gram("--out", "k.npy", "--quiet") == 0
    assert gram("--out", "k.npy", "--quiet") == 2
    assert "pass --resume to continue it, or --overwrite to start afresh" in capsys.readouterr().err
    assert gram("--out", "k.npy", "--resume", "--quiet") == 0
    torch.save({k: v + 1 for k, v in model().state_dict().items()}, files / "w.pt")
    capsys.readouterr()
    assert gram("--out", "k.npy", "--resume", "--weights", "w.pt") == 2
    err = capsys.readouterr().err
    assert "ResumeError: cannot resume" in err and "the model" in err
    assert gram("--out", "k.npy", "--overwrite", "--weights", "w.pt", "--quiet") == 0


@pytest.mark.parametrize("args, message", [
    (["--out", "k.txt"], "--out 'k.txt': the kernel is written as a .npy file"),
    (["--max-memory", "lots"], "--max-memory"),
    (["--x2", "missing.npy"], "no such file"),
    (["--out", "k.npy", "--max-memory", "300"], "raise --max-memory, or pass a smaller --block-size"),
])
def test_gram_bad_usage_exits_2(files, capsys, args, message) -> None:
    assert gram(*args) == 2
    assert message in capsys.readouterr().err


def test_gram_is_listed_in_help(capsys) -> None:
    assert cli.main(["--help"]) == 0
    assert "gram" in capsys.readouterr().out
    assert cli.main(["gram", "--help"]) == 0
    assert "--resume" in capsys.readouterr().out


def test_gram_interrupted_says_how_to_resume(files, capsys, monkeypatch) -> None:
    record, calls = store.Writer.record, []

    def interrupted_after_three(writer, block, crc):
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C does
        calls.append(block)
        record(writer, block, crc)

    monkeypatch.setattr(store.Writer, "record", interrupted_after_three)
    assert gram("--out", "k.npy", "--overwrite", "--quiet") == 130
    err = capsys.readouterr().err
    command = "fastntk gram --model nets.py:make --x1 x.npy --block-size 5 --out k.npy --quiet --resume"
    assert f"error: interrupted: the finished blocks of k.npy are kept; to continue, run {command}" in err
    assert len(store.read_journals(files / "k.npy")[0]) == 3
    monkeypatch.setattr(store.Writer, "record", record)
    assert cli.main(shlex.split(command)[1:]) == 0  # the command it names continues the run
    fastntk.gram(model(), "x.npy", mode="full", block_size=5, out=files / "lib.npy", progress=False)  # the CLI's default mode
    assert filecmp.cmp(files / "k.npy", files / "lib.npy", shallow=False)


def test_gram_default_mode_is_full_and_passed_explicitly(files, capsys, monkeypatch) -> None:
    """The CLI's vocabulary is the library's: --mode full by default (as for compute), handed to
    fastntk.gram by name whatever the library's own default, and --max-memory in bytes."""
    calls, library = [], fastntk.gram

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return library(*args, **kwargs)

    monkeypatch.setattr(fastntk, "gram", spy)
    assert gram("--out", "k.npy", "--max-memory", "1000000") == 0
    assert "mode      full, max memory 1000000 (1,000,000 bytes)" in capsys.readouterr().out
    assert np.load(files / "k.npy").shape == (23, 23, 3, 3)
    assert calls[0]["mode"] == "full" and calls[0]["max_memory"] == 1_000_000 and calls[0]["block_size"] == 5
