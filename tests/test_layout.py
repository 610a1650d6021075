"""fastntk.layout: the sample-major 2-D layout (entry by entry, round trips), scikit-learn's
KernelRidge on it reproducing fastntk.predict, and neural-tangents' interleaved layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.kernel_ridge import KernelRidge
from torch import nn

import fastntk
from fastntk import layout, predict
from conftest import rtol


def random_full(n1: int, n2: int, o: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n1, n2, o, o, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_to_matrix_is_sample_major_entry_by_entry() -> None:
    k = random_full(3, 4, 2)
    m = layout.to_matrix(k)
    assert m.shape == (6, 8)
    for n in range(3):
        for j in range(4):
            for a in range(2):
                for b in range(2):
                    assert m[n * 2 + a, j * 2 + b] == k[n, j, a, b]
    y = torch.arange(6.0).reshape(3, 2)
    v = layout.to_vector(y)
    assert [float(v[n * 2 + a]) for n in range(3) for a in range(2)] == [float(y[n, a]) for n in range(3) for a in range(2)]


@pytest.mark.parametrize("kind", ["torch", "numpy", "memmap"])
def test_round_trips_keep_kind_and_dtype(kind: str, tmp_path) -> None:
    k = random_full(3, 4, 2).float()
    y = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    if kind != "torch":
        k, y = k.numpy(), y.numpy()
    if kind == "memmap":
        np.save(tmp_path / "k.npy", k)
        k = np.load(tmp_path / "k.npy", mmap_mode="r")
    m = layout.to_matrix(k)
    assert isinstance(m, torch.Tensor if kind == "torch" else np.ndarray) and m.dtype == k.dtype
    back = layout.from_matrix(m, 2)
    assert back.shape == k.shape and bool((np.asarray(back) == np.asarray(k)).all())
    v = layout.to_vector(y)
    assert v.shape == (6,) and bool((np.asarray(layout.from_vector(v, 2)) == np.asarray(y)).all())
    traced = k[:, :, 0, 0]
    assert layout.to_matrix(traced) is not None and bool((np.asarray(layout.to_matrix(traced)) == np.asarray(traced)).all())


def test_refusals_name_the_shape_and_the_fix() -> None:
    with pytest.raises(fastntk.InputError, match=r"\(3, 3, 2\).*'diagonal' kernels.*sum a diagonal kernel"):
        layout.to_matrix(torch.ones(3, 3, 2))
    with pytest.raises(fastntk.InputError, match=r"\(3, 3, 2, 4\)"):
        layout.to_matrix(torch.ones(3, 3, 2, 4))
    with pytest.raises(fastntk.InputError, match=r"\(N1·O, N2·O\) with O = 4"):
        layout.from_matrix(torch.ones(6, 6), 4)
    with pytest.raises(fastntk.InputError, match="outputs=0"):
        layout.from_vector(torch.ones(6), 0)
    with pytest.raises(fastntk.InputError, match=r"\(N·O,\) with O = 4"):
        layout.from_vector(torch.ones(6), 4)
    with pytest.raises(fastntk.InputError, match=r"\(N, O\) or \(N,\)"):
        layout.to_vector(torch.ones(2, 2, 2))
    with pytest.raises(fastntk.InputError, match="a list"):
        layout.to_matrix([[1.0]])


@pytest.fixture(scope="module")
def kernels() -> dict:
    """A small MLP's eNTKs in float64: 12 train and 5 test samples, O = 3, full and trace_mean."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, x_test = torch.randn(12, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    return {
        "y": torch.randn(12, 3, dtype=torch.float64),
        "full": (fastntk.ntk(net, x), fastntk.ntk(net, x_test, x)),
        "trace_mean": (fastntk.ntk(net, x, mode="trace_mean"), fastntk.ntk(net, x_test, x, mode="trace_mean")),
    }


@pytest.mark.parametrize("mode", ["full", "trace_mean"])
@pytest.mark.parametrize("ridge", [1e-3, 0.5])
def test_scikit_learn_kernel_ridge_on_the_matrix_is_predict_kernel_ridge(kernels: dict, mode: str, ridge: float) -> None:
    """KernelRidge(kernel="precomputed") fitted on to_matrix(K) and the targets in the same order
    (to_vector for a full kernel; the (N, O) columns for a traced one) is fastntk's kernel_ridge."""
    k, k_test = kernels[mode]
    y = kernels["y"]
    ours = predict.kernel_ridge(k, y, k_test, ridge=ridge)
    if mode == "full":
        model = KernelRidge(kernel="precomputed", alpha=ridge).fit(layout.to_matrix(k).numpy(), layout.to_vector(y).numpy())
        theirs = layout.from_vector(torch.from_numpy(model.predict(layout.to_matrix(k_test).numpy())), 3)
    else:
        model = KernelRidge(kernel="precomputed", alpha=ridge).fit(k.numpy(), y.numpy())
        theirs = torch.from_numpy(model.predict(k_test.numpy()))
    matrix = layout.to_matrix(k) + ridge * torch.eye(layout.to_matrix(k).shape[0], dtype=torch.float64)
    condition = float(torch.linalg.cond(matrix))  # both solve (K + ridge I) z = y in float64
    error = float((ours - theirs).abs().max())
    assert theirs.shape == ours.shape and error <= rtol(torch.float64) * condition * float(ours.abs().max()), error


def neural_tangents_kernels(n1: int, n2: int, output_shape: tuple[int, ...], p: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Θ from per-sample Jacobians J (N, *S, P): neural-tangents' trace_axes=() layout
    (N1, N2, S1, S1, ..., Sd, Sd) and fastntk's full (N1, N2, O, O) with O = prod(S) in C order."""
    g = torch.Generator().manual_seed(3)
    j1 = torch.randn(n1, *output_shape, p, generator=g, dtype=torch.float64)
    j2 = torch.randn(n2, *output_shape, p, generator=g, dtype=torch.float64)
    d = len(output_shape)
    letters, capitals = "abcd"[:d], "ABCD"[:d]
    interleaved = "".join(x + y for x, y in zip(letters, capitals))
    nt = torch.einsum(f"n{letters}p,m{capitals}p->nm{interleaved}", j1, j2)
    o = int(np.prod(output_shape))
    full = torch.einsum("nap,mbp->nmab", j1.reshape(n1, o, p), j2.reshape(n2, o, p))
    return nt, full


@pytest.mark.parametrize("output_shape", [(3,), (2, 3), (2, 3, 2)])
def test_neural_tangents_layout_both_ways(output_shape: tuple[int, ...]) -> None:
    nt, full = neural_tangents_kernels(4, 3, output_shape)
    assert torch.equal(layout.from_neural_tangents(nt), full)
    assert torch.equal(layout.to_neural_tangents(full, output_shape if len(output_shape) > 1 else None), nt)
    assert np.array_equal(layout.from_neural_tangents(nt.numpy()), full.numpy())


def test_neural_tangents_default_trace_is_trace_mean() -> None:
    """neural-tangents' default trace_axes=(-1,) averages over the outputs: fastntk's trace_mean."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    full = fastntk.ntk(net, x)
    nt_default = torch.diagonal(layout.to_neural_tangents(full), dim1=2, dim2=3).mean(-1)  # what NT's trace_axes=(-1,) does
    assert torch.equal(layout.from_neural_tangents(nt_default), nt_default)
    torch.testing.assert_close(nt_default, fastntk.ntk(net, x, mode="trace_mean"), rtol=rtol(torch.float64), atol=0)
    with pytest.raises(fastntk.InputError, match=r"\(N1, N2, S1, S1, ..., Sd, Sd\)"):
        layout.from_neural_tangents(torch.ones(2, 2, 3, 4))
    with pytest.raises(fastntk.InputError, match="has 4 entries but the kernel O = 3"):
        layout.to_neural_tangents(full, (2, 2))


def test_numpy_integers_are_output_counts() -> None:
    """Regression: O as a numpy integer (e.g. from an array of shapes) was refused as not an integer."""
    k = torch.arange(36.0).reshape(3, 3, 2, 2)
    matrix = layout.to_matrix(k)
    assert torch.equal(layout.from_matrix(matrix, np.int64(2)), k)
    assert torch.equal(layout.from_vector(layout.to_vector(k[0, 0]), np.int64(2)), k[0, 0])
    with pytest.raises(fastntk.InputError, match="an integer >= 1"):
        layout.from_vector(layout.to_vector(k[0, 0]), 2.0)
