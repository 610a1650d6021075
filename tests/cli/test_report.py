"""``fastntk report`` end to end on kernels written by ``fastntk gram`` (the built-in default model),
and fastntk.predict / fastntk.analysis on the same files opened as memmaps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastntk
from fastntk import analysis, cli, predict, zoo
from conftest import assert_kernel_close

N = 6
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """``fastntk gram`` on the built-in default (tutorial_cnn, seed 0) in full, trace and diagonal modes."""
    root = tmp_path_factory.mktemp("report")
    x = zoo.cifar_like_inputs(N, seed=1)
    np.save(root / "x.npy", x.numpy())
    labels = torch.arange(N) % 3
    np.save(root / "onehot.npy", torch.nn.functional.one_hot(labels, 10).double().numpy())
    for mode in ("full", "trace", "diagonal"):
        assert cli.main(["gram", "--x1", str(root / "x.npy"), "--mode", mode, "--out", str(root / f"{mode}.npy"), "--quiet"]) == 0
    return {"root": root, "x": x}


def memmap(files: dict, mode: str) -> np.memmap:
    return np.load(files["root"] / f"{mode}.npy", mmap_mode="r")


def report(files: dict, *args: str) -> int:
    return cli.main(["report", *args])


def test_report_prints_the_summary_and_writes_a_png(files: dict, capsys) -> None:
    root = files["root"]
    assert report(files, str(root / "full.npy"), "--targets", str(root / "onehot.npy"), "--out", str(root / "full.png")) == 0
    printed = capsys.readouterr().out
    s = analysis.summary(memmap(files, "full"), np.load(root / "onehot.npy"))
    for line in (
        f"kernel    ({N}, {N}, 10, 10) float32",
        "mode      full (recorded by fastntk gram)",
        f"matrix    {N * 10} x {N * 10} (N·O, sample-major)",
        f"trace     {s.trace:.6g}",
        f"largest eigenvalue {float(s.eigenvalues[0]):.6g}, smallest {float(s.eigenvalues[-1]):.6g}",
        f"condition number {s.condition_number:.6g}",
        f"effective rank {s.effective_rank:.4g} (entropy, Roy & Vetterli 2007), participation ratio {s.participation_ratio:.4g}",
        f"alignment {s.alignment:.6g} (Cristianini et al. 2002), centred {s.centered_alignment:.6g}",
    ):
        assert line in printed, line
    assert (root / "full.png").read_bytes()[:8] == PNG


def test_report_of_traced_and_diagonal_kernels(files: dict, capsys) -> None:
    root = files["root"]
    assert report(files, str(root / "trace.npy"), "--no-plot") == 0
    traced = capsys.readouterr().out
    assert "mode      trace (recorded by fastntk gram)" in traced and "wrote" not in traced
    assert report(files, str(root / "diagonal.npy"), "--out", str(root / "diagonal.png")) == 0
    diagonal = capsys.readouterr().out
    assert "the sum over outputs, (N, N), which is the 'trace' kernel" in diagonal
    # the diagonal kernel summed over outputs is the trace kernel: the same numbers (float32 rounding aside)
    s = analysis.summary(memmap(files, "trace"))
    assert f"effective rank {s.effective_rank:.3g}"[:-1] in diagonal
    assert (root / "diagonal.png").read_bytes()[:8] == PNG
    np.save(root / "plain.npy", np.asarray(memmap(files, "trace")))  # no gram record: the shape tells
    assert report(files, str(root / "plain.npy"), "--no-plot") == 0
    assert "mode      trace or trace_mean (from the shape: traced)" in capsys.readouterr().out


def test_predict_and_analysis_accept_gram_memmaps(files: dict) -> None:
    """The kernels ``fastntk gram`` wrote are the library's, and memmaps give what tensors give."""
    model = zoo.tutorial_cnn(seed=0).eval()
    full, trace = memmap(files, "full"), memmap(files, "trace")
    assert isinstance(full, np.memmap) and isinstance(trace, np.memmap)
    expected = fastntk.ntk(model, files["x"])
    assert_kernel_close(torch.from_numpy(np.array(full)), expected, torch.float32)
    assert_kernel_close(torch.from_numpy(np.array(trace)), torch.diagonal(expected, dim1=2, dim2=3).sum(-1), torch.float32)
    y = torch.randn(N, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for kernel in (full, trace):
        in_memory = torch.from_numpy(np.array(kernel))
        ridge = 1e-3 * float(analysis.eigenvalues(kernel)[0])
        assert torch.equal(predict.kernel_ridge(kernel, y, ridge=ridge), predict.kernel_ridge(in_memory, y, ridge=ridge))
        f_train, _ = predict.gradient_descent_mse(kernel, y)(2.0)
        assert torch.equal(f_train, predict.gradient_descent_mse(in_memory, y)(2.0)[0])
        assert predict.max_learning_rate(kernel) == predict.max_learning_rate(in_memory)
        assert torch.equal(analysis.eigenvalues(kernel), analysis.eigenvalues(in_memory))
        assert analysis.summary(kernel, y).alignment == analysis.summary(in_memory, y).alignment
        assert analysis.centered_alignment(kernel, y) == analysis.centered_alignment(in_memory, y)
        assert analysis.kernel_distance(kernel, in_memory) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("make, args, message", [
    (lambda root: np.save(root / "cross.npy", np.ones((3, 4))), ["cross.npy"], "a cross kernel K(x1, x2) has no spectrum"),
    (lambda root: None, ["missing.npy"], "KERNEL missing.npy: no such file"),
    (lambda root: np.save(root / "five.npy", np.ones((2, 2, 2, 2, 2))), ["five.npy"], "give a kernel (N, N, O, O), (N, N) or (N, N, O)"),
    (lambda root: np.save(root / "bad.npy", np.diag([2.0, -1.0])), ["bad.npy"], "KernelError: kernel is not positive semi-definite"),
    (lambda root: np.save(root / "y.npy", np.ones(4)), ["full.npy", "--targets", "y.npy", "--no-plot"],
     "InputError: targets have shape (4,)"),
    (lambda root: None, ["full.npy", "--out", "nowhere/k.png"], "--out nowhere/k.png: cannot write it"),
])
def test_report_bad_input_exits_2(files: dict, capsys, monkeypatch, make, args, message) -> None:
    monkeypatch.chdir(files["root"])
    make(files["root"])
    assert report(files, *args) == 2
    assert message in capsys.readouterr().err


def test_report_is_listed_in_help(capsys) -> None:
    assert cli.main(["--help"]) == 0
    assert "report" in capsys.readouterr().out
    assert cli.main(["report", "--help"]) == 0
    assert "--targets" in capsys.readouterr().out


def test_report_trusts_a_gram_record_only_for_the_complete_kernel_it_describes(files: dict, tmp_path, capsys) -> None:
    """Regression: an interrupted ``fastntk gram`` (blocks never written: zeros) was reported like a
    finished one, and a record left next to a file written over since named the old mode."""
    x = str(files["root"] / "x.npy")
    for name in ("part", "over", "other"):
        assert cli.main(["gram", "--x1", x, "--mode", "trace", "--block-size", "2", "--out", str(tmp_path / f"{name}.npy"), "--quiet"]) == 0
    capsys.readouterr()
    journal = tmp_path / "part.npy.blocks" / "rank-0.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:-1]))  # the run stopped before its last block
    kernel = np.load(tmp_path / "part.npy", mmap_mode="r+")
    kernel[4:, 4:] = 0
    kernel.flush()
    del kernel
    assert report(files, str(tmp_path / "part.npy"), "--no-plot") == 2
    assert "is incomplete" in capsys.readouterr().err
    trace = np.load(tmp_path / "over.npy")
    np.save(tmp_path / "over.npy", trace / 10)  # e.g. fastntk compute --mode trace_mean --out over.npy: same shape
    np.save(tmp_path / "other.npy", np.ones((N, N, 2, 2), dtype=np.float32) + np.eye(N * 2).reshape(N, 2, N, 2).transpose(0, 2, 1, 3))
    for name in ("over", "other"):
        assert report(files, str(tmp_path / f"{name}.npy"), "--no-plot") == 0
        printed = capsys.readouterr().out
        assert "recorded by fastntk gram" not in printed and "(from the shape" in printed
