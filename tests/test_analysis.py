"""fastntk.analysis against hand-computed cases and direct float64 formulas; fastntk.plots rendered to PNG files."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastntk
from fastntk import analysis, layout, plots, predict
from conftest import rtol


def test_kernel_distance_hand_cases():
    k = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    assert analysis.kernel_distance(k, 3 * k) == pytest.approx(0.0, abs=1e-15)
    assert analysis.kernel_distance(torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])) == pytest.approx(1.0)
    # <I, K>_F = 4, |I| = sqrt 2, |K| = sqrt 10: 1 - 4 / sqrt 20
    assert analysis.kernel_distance(np.eye(2), k.numpy()) == pytest.approx(1 - 4 / np.sqrt(20))


def test_kernel_distance_refuses_mismatched_shapes():
    with pytest.raises(fastntk.InputError, match="same samples"):  # fastntk's error class (a ValueError)
        analysis.kernel_distance(torch.eye(2), torch.eye(3))
    with pytest.raises(fastntk.InputError, match="a kernel is zero"):
        analysis.kernel_distance(torch.eye(2), torch.zeros(2, 2))


# ---------------------------------------------------------------------------- spectra and ranks

TOL = rtol(torch.float64)


def gram(n: int, o: int | None = None, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    """A random PSD Gram kernel: (n, n) or full (n, n, o, o), from random features of the given rank."""
    rows = n * (o or 1)
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, rank or rows + 3, generator=g, dtype=torch.float64)
    matrix = features @ features.T
    return matrix if o is None else layout.from_matrix(matrix, o).contiguous()


def test_eigenvalues_descending_of_the_sample_major_matrix(tmp_path) -> None:
    assert torch.equal(analysis.eigenvalues(torch.diag(torch.tensor([1.0, 3.0, 2.0]))), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    k = gram(4, 3)
    expected = torch.linalg.eigvalsh(layout.to_matrix(k)).flip(0)
    torch.testing.assert_close(analysis.eigenvalues(k), expected, rtol=TOL, atol=0)
    np.save(tmp_path / "k.npy", k.float().numpy())
    on_disk = np.load(tmp_path / "k.npy", mmap_mode="r")
    torch.testing.assert_close(analysis.eigenvalues(on_disk), torch.linalg.eigvalsh(layout.to_matrix(k.float()).double()).flip(0), rtol=TOL, atol=0)
    # a non-PSD symmetric kernel keeps its negative eigenvalues
    assert analysis.eigenvalues(torch.diag(torch.tensor([1.0, -2.0])))[-1] == -2.0


def test_condition_number_hand_cases() -> None:
    assert analysis.condition_number(torch.diag(torch.tensor([4.0, 1.0]))) == 4.0
    assert analysis.condition_number(torch.tensor([[2.0, 1.0], [1.0, 2.0]])) == pytest.approx(3.0, rel=TOL)  # eigenvalues 3, 1
    assert analysis.condition_number(torch.diag(torch.tensor([1.0, 0.0]))) == math.inf
    assert math.isnan(analysis.condition_number(torch.zeros(2, 2)))


def test_effective_rank_hand_cases() -> None:
    k = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert analysis.effective_rank(k) == pytest.approx(2.0, rel=TOL)
    assert analysis.effective_rank(k, definition="participation_ratio") == pytest.approx(2.0, rel=TOL)
    assert analysis.effective_rank(5 * torch.eye(6)) == pytest.approx(6.0, rel=TOL)
    k = torch.diag(torch.tensor([3.0, 1.0]))  # p = (3/4, 1/4)
    assert analysis.effective_rank(k) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=TOL)
    assert analysis.effective_rank(k, definition="participation_ratio") == pytest.approx(16 / 10, rel=TOL)
    assert analysis.effective_rank(torch.zeros(3, 3)) == 0.0
    # rank r features: both between 1 and r, full kernel as its (N·O) matrix
    low = gram(5, 2, rank=3)
    for definition in analysis.EFFECTIVE_RANKS:
        assert 1.0 <= analysis.effective_rank(low, definition=definition) <= 3.0 + 1e-6


# ---------------------------------------------------------------------------- alignments


def test_alignment_hand_cases() -> None:
    y = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    assert analysis.alignment(torch.outer(y, y), y) == pytest.approx(1.0, rel=TOL)
    assert analysis.alignment(torch.eye(3), y) == pytest.approx(1 / math.sqrt(3), rel=TOL)  # yᵀy / (√3 ‖y‖²)
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert analysis.alignment(one_hot @ one_hot.T, one_hot) == pytest.approx(1.0, rel=TOL)  # traced: Y Yᵀ
    full = layout.from_matrix(torch.outer(layout.to_vector(one_hot), layout.to_vector(one_hot)), 2)
    assert analysis.alignment(full, one_hot) == pytest.approx(1.0, rel=TOL)  # full: y = vec(Y) sample-major
    swapped = layout.from_matrix(torch.outer(one_hot.T.reshape(-1), one_hot.T.reshape(-1)), 2)  # output-major: not aligned as well
    assert analysis.alignment(swapped, one_hot) < 0.9
    assert analysis.alignment(-torch.outer(y, y), y) == pytest.approx(-1.0, rel=TOL)


def centred_direct(k: torch.Tensor, y: torch.Tensor, outputs: int | None) -> float:
    """Cortes et al.'s centred alignment with explicit H = (I − 11ᵀ/N) ⊗ I_O matrices."""
    matrix = layout.to_matrix(k).double()
    o = outputs or 1
    n = matrix.shape[0] // o
    h = torch.kron(torch.eye(n, dtype=torch.float64) - 1 / n, torch.eye(o, dtype=torch.float64))
    target = layout.to_vector(y).double()[:, None] if outputs else y.double().reshape(n, -1)
    l = target @ target.T
    kc, lc = h @ matrix @ h, h @ l @ h
    return float((kc * lc).sum() / (kc.norm() * lc.norm()))


@pytest.mark.parametrize("outputs", [None, 3])
def test_centred_alignment_is_cortes_and_ignores_constant_offsets(outputs: int | None) -> None:
    k = gram(6, outputs, seed=1)
    g = torch.Generator().manual_seed(2)
    y = torch.randn(6, outputs or 2, generator=g, dtype=torch.float64)
    value = analysis.centered_alignment(k, y)
    assert value == pytest.approx(centred_direct(k, y, outputs), rel=1e-12)
    if outputs is None:
        offset = k + 70.0  # a constant added to every entry
    else:
        block = torch.randn(outputs, outputs, generator=g, dtype=torch.float64)
        offset = k + 10 * (block + block.T)[None, None]  # the same O x O block added to every pair of samples
    assert analysis.centered_alignment(offset, y) == pytest.approx(value, rel=1e-10)
    assert analysis.centered_alignment(k, y + 5.0) == pytest.approx(value, rel=1e-10)
    assert abs(analysis.alignment(offset, y) - analysis.alignment(k, y)) > 1e-3  # the uncentred one moves
    # by hand: K = I, y = (1, −1): H I H = H = yyᵀ / 2, so the centred alignment is 1 (the plain one 1/√2)
    assert analysis.centered_alignment(torch.eye(2), torch.tensor([1.0, -1.0])) == pytest.approx(1.0, rel=TOL)
    assert analysis.alignment(torch.eye(2), torch.tensor([1.0, -1.0])) == pytest.approx(1 / math.sqrt(2), rel=TOL)


def test_summary_is_the_functions(tmp_path) -> None:
    k = gram(5, 2, seed=4)
    y = torch.randn(5, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    s = analysis.summary(k, y)
    assert s.shape == (5, 5, 2, 2) and s.mode == "full"
    assert s.trace == pytest.approx(float(layout.to_matrix(k).trace()), rel=TOL)
    assert torch.equal(s.eigenvalues, analysis.eigenvalues(k))
    assert s.condition_number == analysis.condition_number(k)
    assert s.effective_rank == analysis.effective_rank(k)
    assert s.participation_ratio == analysis.effective_rank(k, definition="participation_ratio")
    assert s.alignment == analysis.alignment(k, y) and s.centered_alignment == analysis.centered_alignment(k, y)
    traced = analysis.summary(gram(4), None)
    assert traced.mode == "traced" and traced.alignment is None and traced.centered_alignment is None
    assert analysis.summary(gram(4), torch.full((4,), 0.1)).centered_alignment is None  # constant targets


def test_refusals_say_what_is_wrong() -> None:
    with pytest.raises(fastntk.InputError, match=r"\(3, 4\): it must be square.*cross kernel"):
        analysis.eigenvalues(torch.ones(3, 4))
    with pytest.raises(fastntk.InputError, match="must be square"):
        analysis.effective_rank(torch.ones(3, 2, 2, 2))
    with pytest.raises(predict.KernelError, match="not symmetric"):
        analysis.condition_number(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(analysis.KernelError, match=r"not positive semi-definite: smallest eigenvalue -1.*largest 2"):
        analysis.condition_number(torch.diag(torch.tensor([2.0, -1.0])))
    with pytest.raises(analysis.KernelError, match="not positive semi-definite"):
        analysis.effective_rank(torch.diag(torch.tensor([2.0, -1.0])))
    with pytest.raises(fastntk.InputError, match="'diagonal' kernels"):
        analysis.eigenvalues(torch.ones(3, 3, 2))
    with pytest.raises(fastntk.InputError, match="definition='stable'"):
        analysis.effective_rank(torch.eye(2), definition="stable")
    with pytest.raises(fastntk.InputError, match=r"N = 3, the kernel's samples"):
        analysis.alignment(torch.eye(3), torch.ones(4))
    with pytest.raises(fastntk.InputError, match=r"O = 2 outputs needs targets \(2, 2\)"):
        analysis.alignment(gram(2, 2), torch.ones(2, 3))
    with pytest.raises(fastntk.InputError, match="zero"):
        analysis.alignment(torch.eye(2), torch.zeros(2))
    with pytest.raises(fastntk.InputError, match="the same for every sample"):
        analysis.centered_alignment(torch.eye(3), torch.full((3, 2), 0.1))  # the mean of 0.1s rounds: still refused
    with pytest.raises(fastntk.InputError, match="centred kernel is zero"):
        analysis.centered_alignment(torch.ones(3, 3), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(fastntk.NonFiniteError):
        analysis.eigenvalues(torch.full((2, 2), float("nan")))


# ---------------------------------------------------------------------------- plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_render_to_png_files_without_a_display(tmp_path) -> None:
    from matplotlib.figure import Figure

    k = gram(5, 2, seed=6)
    written = {
        "heatmap": plots.heatmap(k, path=tmp_path / "heatmap.png", title="full"),
        "heatmap_cross": plots.heatmap(torch.randn(4, 3), path=tmp_path / "heatmap_cross.png"),
        "spectrum": plots.spectrum(gram(6, rank=3), path=tmp_path / "spectrum.png"),  # eigenvalues 0 up to rounding
        "overview": plots.overview(k, path=tmp_path / "overview.png"),
        "over_training": plots.over_training(
            [0, 10, 20], {"distance from init": [0.0, 0.1, 0.15], "alignment": [0.2, 0.3, float("nan")]},
            path=tmp_path / "over_training.png", log_y=False,
        ),
    }
    for name, figure in written.items():
        assert isinstance(figure, Figure)
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG, name
    assert plots.spectrum(k).get_axes()[0].get_yscale() == "log"
    line = plots.spectrum(k).get_axes()[0].get_lines()[0]
    assert np.allclose(line.get_ydata(), analysis.eigenvalues(k).numpy(), rtol=1e-12)  # what is drawn is the spectrum
    assert not (tmp_path / "unsaved.png").exists() and plots.heatmap(k) is not None


def test_over_training_refusals() -> None:
    with pytest.raises(fastntk.InputError, match="series is empty"):
        plots.over_training([0, 1], {})
    with pytest.raises(fastntk.InputError, match="'distance' has 3 values but there are 2 steps"):
        plots.over_training([0, 1], {"distance": [0.0, 1.0, 2.0]})


def test_plots_without_matplotlib_say_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'fastntk\[plot\]'"):
        plots.heatmap(torch.eye(2))


def test_importing_the_library_imports_no_optional_dependency() -> None:
    probe = ("import sys, fastntk\nfrom fastntk import analysis, layout, plots, predict\n"
             "print(sorted(m for m in ('matplotlib', 'sklearn', 'scipy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_the_guide_examples_run(tmp_path, monkeypatch) -> None:
    """The examples of docs/guide/analysis.md, as written (they build on each other)."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "analysis.md").read_text()
    monkeypatch.chdir(tmp_path)  # the examples write PNG files to the current directory
    namespace: dict = {}
    with torch.random.fork_rng():
        for code in re.findall(r"```python\n(.*?)```", page, re.S):
            exec(compile(code, "analysis.md", "exec"), namespace)  # noqa: S102
    for name in ("kernel.png", "spectrum.png", "training.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert namespace["values"].shape == (90,) and len(namespace["distance"]) == 4
    assert namespace["distance"][0] == 0.0 and namespace["distance"][-1] > 0
    assert namespace["predicted"].shape == (5, 3) and namespace["nt_image"].shape == (2, 2, 2, 2, 2, 2)
