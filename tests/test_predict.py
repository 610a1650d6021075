"""fastntk.predict: closed forms against float64 ODE integration and direct solves, on real eNTKs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import fastntk
from fastntk import predict

TOL = 1e-8  # float64 solves of well-conditioned 12-24 dimensional systems


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


@pytest.fixture(scope="module")
def problem() -> dict:
    """A small MLP's eNTKs in float64: train 8 samples, test 5, O = 3, full and trace_mean."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, x_test = torch.randn(8, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    y = torch.randn(8, 3, dtype=torch.float64)
    with torch.no_grad():
        f0, f0_test = net(x), net(x_test)
    return {
        "k": fastntk.ntk(net, x), "k_test": fastntk.ntk(net, x_test, x), "k_test_test": fastntk.ntk(net, x_test),
        "kt": fastntk.ntk(net, x, mode="trace_mean"), "kt_test": fastntk.ntk(net, x_test, x, mode="trace_mean"),
        "y": y, "f0": f0, "f0_test": f0_test,
    }


def flat(k: torch.Tensor) -> torch.Tensor:
    n1, n2, o, _ = k.shape
    return k.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o)


def integrate(k: torch.Tensor, k_test: torch.Tensor, y: torch.Tensor, f0: torch.Tensor, f0_test: torch.Tensor, rate: float, t: float):
    """Gradient flow df/dt = -rate·Θ(f − y) (and the test points driven by the same residual), RK4."""
    theta, cross = flat(k), flat(k_test)
    f, g = f0.reshape(-1).clone(), f0_test.reshape(-1).clone()
    steps = 4000
    h = t / steps
    for _ in range(steps):
        def rhs(f_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            r = f_ - y.reshape(-1)
            return -rate * theta @ r, -rate * cross @ r
        k1 = rhs(f)
        k2 = rhs(f + h / 2 * k1[0])
        k3 = rhs(f + h / 2 * k2[0])
        k4 = rhs(f + h * k3[0])
        f, g = f + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0]), g + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return f.reshape(f0.shape), g.reshape(f0_test.shape)


@pytest.mark.parametrize("t", [0.0, 0.3, 2.0])
def test_gradient_descent_mse_equals_the_integrated_flow(problem: dict, t: float) -> None:
    p = problem
    rate = 0.7 / p["y"].numel()  # the loss ‖f − Y‖² / (2|Y|), learning rate 0.7
    predict_fn = predict.gradient_descent_mse(p["k"], p["y"], learning_rate=0.7)
    f_train, f_test = predict_fn(t, p["f0"], p["f0_test"], p["k_test"])
    expected_train, expected_test = integrate(p["k"], p["k_test"], p["y"], p["f0"], p["f0_test"], rate, t)
    assert close(f_train, expected_train, 1e-9) and close(f_test, expected_test, 1e-9)


def test_the_end_of_training_is_kernel_regression(problem: dict) -> None:
    p = problem
    f_train, f_test = predict.gradient_descent_mse(p["k"], p["y"])(math.inf, p["f0"], p["f0_test"], p["k_test"])
    assert close(f_train, p["y"])
    theta, cross = flat(p["k"]), flat(p["k_test"])
    direct = p["f0_test"].reshape(-1) + cross @ torch.linalg.solve(theta, (p["y"] - p["f0"]).reshape(-1))
    assert close(f_test, direct.reshape(5, 3), 1e-7)
    from_zero = predict.gradient_descent_mse(p["k"], p["y"])(math.inf, k_test_train=p["k_test"])[1]
    assert close(from_zero, predict.kernel_ridge(p["k"], p["y"], p["k_test"]), 1e-7)


@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_kernel_ridge_is_a_direct_solve(problem: dict, ridge: float) -> None:
    p = problem
    theta, cross = flat(p["k"]), flat(p["k_test"])
    direct = cross @ torch.linalg.solve(theta + ridge * torch.eye(24, dtype=torch.float64), p["y"].reshape(-1))
    assert close(predict.kernel_ridge(p["k"], p["y"], p["k_test"], ridge=ridge), direct.reshape(5, 3), 1e-7)
    on_train = predict.kernel_ridge(p["k"], p["y"], ridge=ridge)
    assert close(on_train, (theta @ torch.linalg.solve(theta + ridge * torch.eye(24, dtype=torch.float64), p["y"].reshape(-1))).reshape(8, 3), 1e-7)


def test_traced_kernels_predict_every_output_with_the_same_kernel(problem: dict) -> None:
    """A traced kernel acts as K ⊗ I: the same as the full kernel K[:, :, None, None]·δ_ab."""
    p = problem
    kt, kt_test = p["kt"], p["kt_test"]
    eye = torch.eye(3, dtype=torch.float64)
    as_full = kt[:, :, None, None] * eye, kt_test[:, :, None, None] * eye
    for t in (0.5, math.inf):
        traced = predict.gradient_descent_mse(kt, p["y"])(t, p["f0"], p["f0_test"], kt_test)
        full = predict.gradient_descent_mse(as_full[0], p["y"])(t, p["f0"], p["f0_test"], as_full[1])
        assert close(traced[0], full[0], 1e-7) and close(traced[1], full[1], 1e-7)
    single = predict.kernel_ridge(kt, p["y"][:, 0], kt_test)
    assert single.shape == (5,) and close(single, predict.kernel_ridge(kt, p["y"], kt_test)[:, 0], 1e-9)


def test_gp_inference_mean_and_covariance(problem: dict) -> None:
    p = problem
    posterior = predict.gp_inference(p["k"], p["y"], p["k_test"], p["k_test_test"], ridge=1e-3)
    theta = flat(p["k"]) + 1e-3 * torch.eye(24, dtype=torch.float64)
    cross, prior = flat(p["k_test"]), flat(p["k_test_test"])
    expected = prior - cross @ torch.linalg.solve(theta, cross.T)
    assert close(posterior.mean, (cross @ torch.linalg.solve(theta, p["y"].reshape(-1))).reshape(5, 3), 1e-7)
    assert posterior.covariance.shape == (5, 5, 3, 3)
    assert close(flat(posterior.covariance), expected, 1e-7)
    assert float(torch.linalg.eigvalsh(flat(posterior.covariance))[0]) > -1e-8  # a covariance


def test_max_learning_rate_separates_convergence_from_divergence(problem: dict) -> None:
    p = problem
    eta = predict.max_learning_rate(p["k"], y_train_size=p["y"].numel())
    theta, y = flat(p["k"]), p["y"].reshape(-1)

    def final_loss(lr: float) -> float:
        f = torch.zeros_like(y)
        for _ in range(3000):
            f = f - lr / y.numel() * theta @ (f - y)
        return float((f - y).norm())

    start = float(y.norm())  # from f = 0: below the limit every eigen-direction contracts, above the top one grows
    assert final_loss(0.95 * eta) < start and final_loss(1.05 * eta) > 1e3 * start


def test_kernels_written_by_gram_are_accepted(problem: dict, tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(10, 4)
    on_disk = fastntk.gram(net, x, mode="trace", out=tmp_path / "k.npy")
    assert isinstance(on_disk, np.memmap)
    y = torch.randn(10)
    assert close(predict.kernel_ridge(on_disk, y, ridge=1e-4), predict.kernel_ridge(fastntk.ntk(net, x, mode="trace"), y, ridge=1e-4), 1e-6)


def test_bad_kernels_are_refused_with_what_is_wrong() -> None:
    y = torch.randn(3)
    with pytest.raises(predict.KernelError, match=r"not positive semi-definite: smallest eigenvalue -1.*a ridge larger than minus"):
        predict.gradient_descent_mse(torch.diag(torch.tensor([1.0, 2.0, -1.0])), y)
    with pytest.raises(predict.KernelError, match=r"singular .*smallest eigenvalue 0.*condition number inf.*ridge"):
        predict.kernel_ridge(torch.diag(torch.tensor([1.0, 2.0, 0.0])), y)
    with pytest.raises(predict.KernelError, match="not symmetric"):
        predict.kernel_ridge(torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), y)
    with pytest.raises(fastntk.InputError, match="must be square"):
        predict.kernel_ridge(torch.ones(3, 4), y)
    with pytest.raises(fastntk.InputError, match="diagonal"):
        predict.kernel_ridge(torch.ones(3, 3, 2), y)
    with pytest.raises(fastntk.InputError, match=r"needs targets \(3, 2\)"):
        predict.kernel_ridge(torch.eye(6).reshape(3, 2, 3, 2).permute(0, 2, 1, 3), torch.randn(3))
    with pytest.raises(fastntk.NonFiniteError):
        predict.kernel_ridge(torch.full((3, 3), float("nan")), y)
    assert isinstance(predict.KernelError("x"), fastntk.FastNTKError)


def test_the_guide_example_runs() -> None:
    """The example of docs/guide/predict.md, as written."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "predict.md").read_text()
    namespace: dict = {}
    for code in re.findall(r"```python\n(.*?)```", page, re.S):  # the examples build on each other
        exec(compile(code, "predict.md", "exec"), namespace)  # noqa: S102
    assert namespace["f_test"].shape == (5, 3) and namespace["mean"].shape == (5, 3)
    assert isinstance(namespace["lin"], fastntk.Linearized) and namespace["variances"].shape == (5,)


@pytest.mark.parametrize("t", [1e3, 1e9, 1e11])
def test_gradient_descent_mse_is_exact_for_small_eigenvalues_at_any_time(t: float) -> None:
    """Regression: eigenvalues below √eps·λ_max used the small-t limit η·t/|Y| of (1 − e^{−ηλt/|Y|})/λ
    at every t, so test predictions grew without bound once ηλt/|Y| was no longer small."""
    from scipy.linalg import expm

    generator = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=generator))[0]
    theta = q @ torch.diag(torch.tensor([1.0, 0.5, 1e-9], dtype=torch.float64)) @ q.T  # condition number 2e9
    cross = torch.randn(2, 3, dtype=torch.float64, generator=generator)
    y = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    decay = expm(-theta.numpy() * t / 3)  # learning rate 1, |Y| = 3
    expected_train = y.numpy() - decay @ y.numpy()
    expected_test = cross.numpy() @ np.linalg.solve(theta.numpy(), (np.eye(3) - decay) @ y.numpy())
    f_train, f_test = predict.gradient_descent_mse(theta, y)(t, k_test_train=cross)
    assert close(f_train, torch.from_numpy(expected_train), 1e-6) and close(f_test, torch.from_numpy(expected_test), 1e-6)


def test_numpy_scalars_are_numbers(problem: dict) -> None:
    """Regression: t = np.int64(5) (from np.arange), np.float32 learning rates and ridges were refused
    with "give a time >= 0" / "give a positive number"."""
    p = problem
    expected = predict.gradient_descent_mse(p["k"], p["y"], learning_rate=0.5, ridge=0.25)(5.0, p["f0"])[0]
    flow = predict.gradient_descent_mse(p["k"], p["y"], learning_rate=np.float32(0.5), ridge=np.float32(0.25))
    for t in (np.int64(5), np.float32(5.0), np.arange(10)[5]):
        assert close(flow(t, p["f0"])[0], expected)
    assert close(predict.kernel_ridge(p["k"], p["y"], ridge=np.float32(0.25)), predict.kernel_ridge(p["k"], p["y"], ridge=0.25))
    with pytest.raises(fastntk.InputError, match=r"t=.*: give a number >= 0"):
        flow(torch.tensor(5.0))


def test_solves_refuse_a_kernel_that_is_not_psd_as_such() -> None:
    """Regression: kernel_ridge and gp_inference called a clearly indefinite kernel singular and
    suggested a ridge of 1e-6·λ_max, which cannot make it positive definite."""
    k, y = torch.diag(torch.tensor([1.0, 2.0, -1.0])), torch.randn(3)
    for solve in (lambda: predict.kernel_ridge(k, y), lambda: predict.gp_inference(k, y, k[:1])):
        with pytest.raises(predict.KernelError, match=r"not positive semi-definite: smallest eigenvalue -1, largest 2"):
            solve()
    # negative only by rounding (within the PSD tolerance): singular, and the suggested ridge does make it solvable
    slightly = torch.diag(torch.tensor([1.0, 2.0, -1e-5], dtype=torch.float64))
    with pytest.raises(predict.KernelError, match=r"singular .*ridge=") as refused:
        predict.kernel_ridge(slightly, y)
    suggested = float(str(refused.value).split("ridge=")[-1].split(",")[0])
    assert predict.kernel_ridge(slightly, y, ridge=suggested).shape == (3,)
