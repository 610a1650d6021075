"""fastntk.NTKOperator and its solvers against the formed float64 reference kernel."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fastntk
from cases import CASES_BY_NAME, Case, normal
from conftest import DTYPES, RTOL64, rtol
from fastntk.operator import ConvergenceError, NTKOperator, solve, top_eigenvalues, trace_estimate


class Recurrent(nn.Module):
    """A recurrent layer on (N, T, F) and a Linear head on its mean over steps."""

    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn, self.head = cell(3, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0].mean(1))


class Bag(nn.Module):
    """EmbeddingBag: no forward-mode AD and no double backward (the Jacobian-rows path)."""

    def __init__(self) -> None:
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(10, 4, mode="mean"), nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bag(ids)))


class NormedAttention(nn.Module):
    """weight_norm (no forward mode) before attention, whose CPU kernel (flash attention) has no
    double backward, which torch reports as a RuntimeError, not a NotImplementedError: the
    Jacobian-rows path (found by the fuzzer)."""

    def __init__(self) -> None:
        from torch.nn.utils.parametrizations import weight_norm

        super().__init__()
        self.proj, self.attention, self.head = weight_norm(nn.Linear(4, 4)), nn.MultiheadAttention(4, 1, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.head(self.attention(h, h, h, need_weights=False)[0].mean(1))


def weight_normed() -> nn.Module:
    from torch.nn.utils.parametrizations import weight_norm

    return nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 2))


FALLBACK_CASES = {
    "lstm": Case("lstm", lambda: Recurrent(nn.LSTM), normal(4, 3)),
    "gru": Case("gru", lambda: Recurrent(nn.GRU), normal(4, 3)),
    "weight_norm": Case("weight_norm", weight_normed, normal(4)),
    "embedding_bag": Case("embedding_bag", Bag, lambda n, g: torch.randint(0, 10, (n, 3), generator=g)),
    "normed_attention": Case("normed_attention", NormedAttention, normal(3, 4)),
}
OPERATOR_CASES = {**{name: CASES_BY_NAME[name] for name in ("mlp", "tutorial_cnn", "token_dict", "tuple_output")}, **FALLBACK_CASES}
PUSHES = {"weight_norm": "double", "embedding_bag": "rows", "normed_attention": "rows"}
"""How J(x1) g is computed where forward mode is missing (every other case: "forward")."""

N1, N2 = 5, 4


def matrix(kernel: torch.Tensor) -> torch.Tensor:
    """A full kernel (N1, N2, O, O) as the 2-D (N1·O, N2·O) sample-major matrix."""
    n1, n2, o, _ = kernel.shape
    return kernel.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o)


def assert_product_close(actual: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> None:
    """|Θv − (Θv)_ref| <= rtol(dtype)·(|Θ| |v|) entrywise-max: each entry is a sum of products
    |Θ_ij v_j|, each rounded to the dtype's ulps (the kernel tolerance applied to the sum's terms)."""
    expected = theta @ v.double()
    bound = rtol(dtype) * (theta.abs() @ v.double().abs()).max().item()
    error = (actual.double() - expected).abs().max().item()
    assert actual.shape == expected.shape
    assert error <= bound, f"max error {error:.3g} vs bound {bound:.3g}"


def built(name: str, dtype: torch.dtype, gram: bool) -> tuple[nn.Module, object, object, torch.Tensor]:
    case = OPERATOR_CASES[name]
    model = case.build(dtype).eval()
    x1, x2 = case.draw(N1, dtype, seed=1), None if gram else case.draw(N2, dtype, seed=2)
    return model, x1, x2, matrix(fastntk.reference_ntk(model, x1, x2, mode="full"))


@pytest.mark.parametrize("gram", [True, False], ids=["gram", "x1-x2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(OPERATOR_CASES))
def test_products_match_the_formed_kernel(name: str, dtype: torch.dtype, gram: bool) -> None:
    """Θv and ΘV (3 columns) in blocks of 2 samples (several blocks of x1 and x2, one ragged)."""
    model, x1, x2, theta = built(name, dtype, gram)
    op = NTKOperator(model, x1, x2, block_size=2)
    assert op.shape == theta.shape and op.dtype == dtype
    g = torch.Generator().manual_seed(0)
    v = torch.randn(theta.shape[1], dtype=torch.float64, generator=g).to(dtype)
    vs = torch.randn(theta.shape[1], 3, dtype=torch.float64, generator=g).to(dtype)
    product, products = op @ v, op @ vs
    assert product.dtype == dtype and product.shape == (theta.shape[0],)
    assert_product_close(product, theta, v, dtype)
    assert_product_close(products, theta, vs, dtype)
    assert op._pushes.how == PUSHES.get(name, "forward")


@pytest.mark.parametrize("name", ["mlp", "weight_norm", "embedding_bag"])
def test_columns_one_by_one_where_vmap_fails(name: str) -> None:
    """The path taken should vmap fail on a model's columns: the same products, column by column."""
    model, x1, x2, theta = built(name, torch.float64, False)
    op = NTKOperator(model, x1, x2, block_size=3)
    op._pushes.batched = False
    vs = torch.randn(theta.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_product_close(op @ vs, theta, vs, torch.float64)


def test_max_memory_cuts_blocks() -> None:
    """A budget of a few samples' working sets: several blocks, the same product; too small: a
    clear error with the bytes needed."""
    model, x1, _, theta = built("mlp", torch.float64, True)
    one = NTKOperator(model, x1, max_memory=10**9)._block(N1, 2)
    assert one == N1
    small = NTKOperator(model, x1, max_memory=int(3 * 8 * 2 * sum(p.numel() for p in model.parameters()) * 1.6))
    assert 1 <= small._block(N1, 2) < N1
    v = torch.randn(theta.shape[1], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_product_close(small @ v, theta, v, torch.float64)
    with pytest.raises(fastntk.OptionError, match=r"max_memory=.* is too small.*pass max_memory=\d+"):
        NTKOperator(model, x1, max_memory=1000) @ v


@pytest.mark.parametrize("name", ["mlp", "weight_norm"])
def test_adjoint_is_the_transpose(name: str) -> None:
    model, x1, x2, theta = built(name, torch.float64, False)
    op = NTKOperator(model, x1, x2)
    u = torch.randn(theta.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    adjoint = op.adjoint()
    assert adjoint.shape == (theta.shape[1], theta.shape[0])
    assert_product_close(adjoint @ u, theta.T, u, torch.float64)
    assert_product_close((u.T @ op).T, theta.T, u, torch.float64)  # UᵀΘ = (ΘᵀU)ᵀ, (K, N2·O)


def test_gram_operator_is_self_adjoint() -> None:
    model, x1, _, _ = built("mlp", torch.float64, True)
    op = NTKOperator(model, x1)
    assert op.symmetric and op.adjoint() is op


def test_to_scipy_products_and_eigsh_match_the_formed_kernel() -> None:
    from scipy.sparse.linalg import eigsh

    model, x1, _, theta = built("tutorial_cnn", torch.float64, True)
    op = NTKOperator(model, x1, block_size=2)
    linear = op.to_scipy()
    assert linear.shape == theta.shape and linear.dtype == np.float64
    v = np.random.default_rng(0).standard_normal((theta.shape[1], 2))
    assert_product_close(torch.from_numpy(linear.matvec(v[:, 0])), theta, torch.from_numpy(v[:, 0]), torch.float64)
    assert_product_close(torch.from_numpy(linear.matmat(v)), theta, torch.from_numpy(v), torch.float64)
    assert_product_close(torch.from_numpy(linear.rmatvec(v[:, 0])), theta.T, torch.from_numpy(v[:, 0]), torch.float64)
    expected = torch.linalg.eigvalsh(theta).flip(0)[:4]
    scale = expected[0].item()
    values = np.sort(eigsh(linear, k=4, which="LA", v0=np.ones(theta.shape[0]), return_eigenvectors=False))[::-1]
    assert np.abs(values - expected.numpy()).max() <= RTOL64 * scale
    ours, vectors = top_eigenvalues(op, 4, eigenvectors=True)
    assert (ours - expected).abs().max().item() <= RTOL64 * scale
    assert vectors.shape == (theta.shape[0], 4)
    assert (theta @ vectors - vectors * ours).abs().max().item() <= 1e-8 * scale  # eigsh's tol=0: machine precision


def test_top_eigenvalues_float32_operator() -> None:
    """Products in float32: eigenvalues within float32's tolerance of the float64 ones."""
    model, x1, _, theta = built("mlp", torch.float32, True)
    values = top_eigenvalues(NTKOperator(model, x1), 3)
    expected = torch.linalg.eigvalsh(theta).flip(0)[:3]
    assert values.dtype == torch.float64
    assert (values - expected).abs().max().item() <= rtol(torch.float32) * expected[0].item()


def regression_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    case = CASES_BY_NAME["mlp"]
    model = case.build(torch.float64)
    x_train, x_test = case.draw(12, torch.float64, seed=1), case.draw(5, torch.float64, seed=2)
    y = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    return model, x_train, x_test, y


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_cg_agrees_with_a_direct_solve(ridge: float) -> None:
    """CG stops at relative residual r <= rtol, so ‖α − α*‖ <= ‖A⁻¹‖·rtol·‖y‖ (A = Θ + ridge·I)
    and the test predictions differ from kernel_ridge's by at most ‖Θ(x_test, X)‖·‖A⁻¹‖·rtol·‖y‖
    (plus float64 rounding of the direct solve, RTOL64 relative)."""
    model, x_train, x_test, y = regression_problem()
    tol = 1e-9
    op = NTKOperator(model, x_train)
    solution = solve(op, y, ridge=ridge, rtol=tol)
    assert solution.alpha.shape == y.shape and solution.alpha.dtype == torch.float64
    assert solution.residual <= tol and solution.iterations >= 1
    predictions = (NTKOperator(model, x_test, x_train) @ solution.alpha.reshape(-1)).reshape(5, 3)
    k_train = fastntk.ntk(model, x_train)
    k_test = fastntk.ntk(model, x_test, x_train)
    expected = fastntk.predict.kernel_ridge(k_train, y, k_test, ridge=ridge)
    a = matrix(k_train) + ridge * torch.eye(36, dtype=torch.float64)
    bound = torch.linalg.matrix_norm(matrix(k_test), 2) / torch.linalg.eigvalsh(a)[0] * tol * y.norm()
    error = (predictions - expected).abs().max().item()
    assert error <= bound.item() + RTOL64 * expected.abs().max().item(), (error, bound.item())


def test_cg_flat_targets_and_zero_targets() -> None:
    model, x_train, _, y = regression_problem()
    op = NTKOperator(model, x_train)
    flat = solve(op, y.reshape(-1), ridge=1e-2, rtol=1e-8)
    assert flat.alpha.shape == (36,)
    assert torch.allclose(flat.alpha, solve(op, y, ridge=1e-2, rtol=1e-8).alpha.reshape(-1), rtol=1e-6, atol=0)
    zero = solve(op, torch.zeros(12, 3, dtype=torch.float64))
    assert zero.iterations == 0 and not zero.alpha.any()


def test_cg_takes_numpy_scalars() -> None:
    """ridge and rtol as numpy scalars (e.g. from np.logspace) are numbers, as in fastntk.predict."""
    model, x_train, _, y = regression_problem()
    op = NTKOperator(model, x_train)
    given = solve(op, y, ridge=np.float32(1e-2), rtol=np.float64(1e-8))
    assert torch.allclose(given.alpha, solve(op, y, ridge=float(np.float32(1e-2)), rtol=1e-8).alpha, rtol=0, atol=0)


def test_cg_that_does_not_converge_raises_with_its_progress() -> None:
    model, x_train, _, y = regression_problem()
    with pytest.raises(ConvergenceError, match=r"stopped after 2 iterations at relative residual .* raise maxiter=") as info:
        solve(NTKOperator(model, x_train), y, rtol=1e-12, maxiter=2)
    assert info.value.iterations == 2 and info.value.residual > 1e-12
    assert isinstance(info.value, fastntk.FastNTKError)


def test_solvers_refuse_what_they_cannot_use() -> None:
    model, x_train, x_test, y = regression_problem()
    cross = NTKOperator(model, x_test, x_train)
    with pytest.raises(fastntk.InputError, match=r"NTKOperator\(model, x_train\)"):
        solve(cross, y)
    with pytest.raises(fastntk.InputError, match=r"y has shape \(12, 2\)"):
        solve(NTKOperator(model, x_train), y[:, :2])
    with pytest.raises(fastntk.InputError, match="ridge=-1"):
        solve(NTKOperator(model, x_train), y, ridge=-1)
    with pytest.raises(fastntk.InputError, match="symmetric"):
        top_eigenvalues(cross, 2)
    with pytest.raises(fastntk.InputError, match=r"k=36: give 1 <= k < N·O = 36"):
        top_eigenvalues(NTKOperator(model, x_train), 36)
    with pytest.raises(fastntk.InputError, match="square"):
        trace_estimate(cross, 9)
    with pytest.raises(fastntk.InputError, match="method='hutch'"):
        trace_estimate(NTKOperator(model, x_train), 9, method="hutch")
    with pytest.raises(fastntk.InputError, match="at least 3"):
        trace_estimate(NTKOperator(model, x_train), 2)


@pytest.mark.parametrize("v", [torch.ones(7), torch.ones(15, 2, 1), torch.ones(14, 2)], ids=["short", "3-d", "rows"])
def test_wrong_vector_shape_is_refused(v: torch.Tensor) -> None:
    model, x1, _, _ = built("mlp", torch.float32, True)
    with pytest.raises(fastntk.InputError, match=r"give \(15,\) or \(15, K\)"):
        NTKOperator(model, x1) @ v


def test_non_tensor_vector_is_refused() -> None:
    model, x1, _, _ = built("mlp", torch.float32, True)
    with pytest.raises(fastntk.InputError, match="to_scipy"):
        NTKOperator(model, x1) @ np.ones(15)


def tiny() -> tuple[nn.Module, torch.Tensor]:
    """P = 3·2 + 3 = 9 parameters, N·O = 30 rows: Θ = JJᵀ has rank <= 9."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    return model, torch.randn(30, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_hutchpp_is_exact_for_an_operator_of_rank_at_most_a_third_of_the_products() -> None:
    """rank Θ <= P = 9 = 27 // 3: the sketch Q spans Θ's range, tr(QᵀΘQ) = tr Θ and the
    remainder (I − QQᵀ)Θ(I − QQᵀ) is 0, so Hutch++ is exact up to float64 rounding."""
    model, x = tiny()
    exact = fastntk.self_ntk(model, x, mode="trace").sum().item()
    estimate = trace_estimate(NTKOperator(model, x), 27, method="hutch++", seed=3)
    assert abs(estimate - exact) <= RTOL64 * exact


def test_hutchinson_is_within_its_standard_deviation() -> None:
    """zᵀΘz with Rademacher z has mean tr Θ and variance 2(‖Θ‖_F² − Σ Θ_ii²); the mean of m
    has σ = sqrt(that/m). By Chebyshev, |estimate − tr Θ| > 5σ for at most 1/25 of the seeds;
    seed 0 is fixed, so the test is deterministic. Hutch++ on the same budget must do at
    least as well here (a decaying eNTK spectrum)."""
    model, x, _, theta = built("mlp", torch.float64, True)
    exact = fastntk.self_ntk(model, x, mode="trace").sum().item()
    assert abs(exact - theta.trace().item()) <= RTOL64 * exact
    m = 12
    sigma = math.sqrt(2 * (theta.square().sum() - theta.diagonal().square().sum()).item() / m)
    op = NTKOperator(model, x)
    estimate = trace_estimate(op, m, method="hutchinson", seed=0)
    assert abs(estimate - exact) <= 5 * sigma
    assert abs(trace_estimate(op, m, method="hutch++", seed=0) - exact) <= 5 * sigma


def test_trace_estimates_are_seeded_and_leave_the_global_rng_alone() -> None:
    model, x = tiny()
    op = NTKOperator(model, x)
    state = torch.random.get_rng_state()
    first = trace_estimate(op, 6, method="hutchinson", seed=7)
    assert trace_estimate(op, 6, method="hutchinson", seed=7) == first
    assert trace_estimate(op, 6, method="hutchinson", seed=8) != first
    assert torch.equal(torch.random.get_rng_state(), state)


def test_products_leave_the_process_as_they_found_it() -> None:
    """Grad mode, oneDNN (switched off for a float32 LSTM's forward mode) and gradients untouched."""
    model, x1, x2, theta = built("lstm", torch.float32, False)
    v = torch.ones(theta.shape[1])
    with torch.no_grad():
        NTKOperator(model, x1, x2) @ v
    assert torch.is_grad_enabled() and torch.backends.mkldnn.enabled
    assert all(p.grad is None for p in model.parameters())


def test_to_scipy_without_scipy_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x1, _, _ = built("mlp", torch.float32, True)
    op = NTKOperator(model, x1)
    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'fastntk[scipy]'")):
        op.to_scipy()


def test_the_guide_example_runs() -> None:
    """The example of docs/guide/operator.md, as written."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "operator.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks
    namespace: dict[str, object] = {}
    exec(compile("\n".join(blocks), "operator.md", "exec"), namespace)  # noqa: S102 - our own docs


def test_a_vector_with_nan_or_inf_is_refused_as_such() -> None:
    """The product of a non-finite v is not the model's overflow: the error names v."""
    model, x1, _, _ = built("mlp", torch.float64, True)
    op = NTKOperator(model, x1)
    for bad in (float("nan"), float("inf")):
        v = torch.ones(15, dtype=torch.float64)
        v[3] = bad
        with pytest.raises(fastntk.NonFiniteError, match=r"v holds NaN or inf"):
            op @ v
    assert (NTKOperator(model, x1, check=False) @ v).isnan().any()


def test_numpy_integers_are_whole_numbers_for_the_solvers() -> None:
    """k, matvecs and maxiter from numpy (e.g. np.arange, a config array) count as the ints they are."""
    model, x = tiny()
    op = NTKOperator(model, x[:6])
    assert torch.equal(top_eigenvalues(op, np.int64(2)), top_eigenvalues(op, 2))
    assert trace_estimate(op, np.int64(6), seed=1) == trace_estimate(op, 6, seed=1)
    y = torch.ones(6, 1, dtype=torch.float64)
    assert torch.equal(solve(op, y, ridge=1e-2, maxiter=np.int64(50)).alpha, solve(op, y, ridge=1e-2, maxiter=50).alpha)
