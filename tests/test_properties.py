"""Properties of the eNTK on random small MLPs (hypothesis, derandomized).

Tolerances come from the dtype: exact-algebra comparisons use RTOL relative to max|K|;
the PSD bound is the worst-case rounding of a Gram matrix of P-term dot products:
each entry is off by at most P·eps·max|K| (Cauchy-Schwarz), so the (N·O × N·O) matrix
is off by at most N·O·P·eps·max|K| in spectral norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fastntk

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
DTYPES = st.sampled_from([torch.float32, torch.float64])
METHODS = st.sampled_from(["jacobian", "vp", "structured"])

PROPERTY = settings(
    derandomize=True,
    deadline=None,
    max_examples=20,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


@dataclass(frozen=True)
class Net:
    """A random small MLP and its inputs, all determined by these fields."""

    in_features: int
    hidden: tuple[int, ...]
    activation: str
    outputs: int
    n1: int
    n2: int
    seed: int

    def model(self, dtype: torch.dtype) -> nn.Sequential:
        widths = (self.in_features, *self.hidden, self.outputs)
        layers: list[nn.Module] = []
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                if i:
                    layers.append(nn.Tanh() if self.activation == "tanh" else nn.GELU())
                layers.append(nn.Linear(a, b))
        return nn.Sequential(*layers).to(dtype)

    def inputs(self, n: int, which: int, dtype: torch.dtype) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 2 + which)
        return torch.randn(n, self.in_features, generator=g, dtype=torch.float64).to(dtype)


nets = st.builds(
    Net,
    in_features=st.integers(1, 4),
    hidden=st.lists(st.integers(1, 6), min_size=0, max_size=2).map(tuple),
    activation=st.sampled_from(["tanh", "gelu"]),
    outputs=st.integers(1, 4),
    n1=st.integers(1, 5),
    n2=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= tol, f"{what}: max error {error:.3g} > {tol:.3g}"


def max_abs(k: torch.Tensor) -> float:
    return k.abs().max().item()


@PROPERTY
@given(net=nets, dtype=DTYPES, method=METHODS)
def test_gram_is_symmetric_blockwise(net: Net, dtype: torch.dtype, method: str) -> None:
    model = net.model(dtype)
    k = fastntk.ntk(model, net.inputs(net.n1, 1, dtype), method=method)
    assert k.shape == (net.n1, net.n1, net.outputs, net.outputs) and k.dtype == dtype
    # K[n, m, a, b] == K[m, n, b, a]
    assert_close(k, k.permute(1, 0, 3, 2), RTOL[dtype] * max_abs(k), "symmetry")


@PROPERTY
@given(net=nets, dtype=DTYPES)
def test_gram_is_positive_semidefinite(net: Net, dtype: torch.dtype) -> None:
    model = net.model(dtype)
    n, o = net.n1, net.outputs
    k = fastntk.ntk(model, net.inputs(n, 1, dtype), method="jacobian")
    matrix = k.permute(0, 2, 1, 3).reshape(n * o, n * o).double()
    matrix = (matrix + matrix.T) / 2  # the asymmetric part is bounded by the symmetry test
    num_params = sum(p.numel() for p in model.parameters())
    bound = torch.finfo(dtype).eps * max_abs(k) * n * o * num_params
    smallest = torch.linalg.eigvalsh(matrix).min().item()
    assert smallest >= -bound, f"min eigenvalue {smallest:.3g} < -{bound:.3g}"
    # Self-similarity on the diagonal: K(x_n, x_n)[a, a] = |∂f_a/∂θ|² >= 0 exactly up to rounding.
    diag = torch.diagonal(torch.diagonal(k, dim1=0, dim2=1), dim1=0, dim2=1)
    assert (diag >= -bound).all()


@PROPERTY
@given(net=nets, dtype=DTYPES, method=METHODS, gram=st.booleans())
def test_trace_and_diagonal_are_reductions_of_full(net: Net, dtype: torch.dtype, method: str, gram: bool) -> None:
    model = net.model(dtype)
    x1 = net.inputs(net.n1, 1, dtype)
    x2 = None if gram else net.inputs(net.n2, 2, dtype)
    full = fastntk.ntk(model, x1, x2, method=method)
    diagonal = fastntk.ntk(model, x1, x2, mode="diagonal", method=method)
    trace = fastntk.ntk(model, x1, x2, mode="trace", method=method)
    expected_diagonal = torch.diagonal(full, dim1=2, dim2=3)
    tol = RTOL[dtype] * max_abs(full)
    assert_close(diagonal, expected_diagonal, tol, "diagonal")
    assert_close(trace, expected_diagonal.sum(-1), tol * net.outputs, "trace")  # a sum of O such entries


@PROPERTY
@given(net=nets, dtype=DTYPES, mode=st.sampled_from(["full", "trace", "diagonal"]), gram=st.booleans())
def test_jacobian_and_vp_agree(net: Net, dtype: torch.dtype, mode: str, gram: bool) -> None:
    model = net.model(dtype)
    x1 = net.inputs(net.n1, 1, dtype)
    x2 = None if gram else net.inputs(net.n2, 2, dtype)
    by_jacobian = fastntk.ntk(model, x1, x2, mode=mode, method="jacobian")
    by_vp = fastntk.ntk(model, x1, x2, mode=mode, method="vp")
    assert_close(by_vp, by_jacobian, RTOL[dtype] * max_abs(by_jacobian), f"vp vs jacobian ({mode})")


@PROPERTY
@given(net=nets, method=st.sampled_from(["jacobian", "vp", "auto"]), gram=st.booleans())
def test_float64_kernel_equals_the_reference(net: Net, method: str, gram: bool) -> None:
    model = net.model(torch.float64)
    x1 = net.inputs(net.n1, 1, torch.float64)
    x2 = None if gram else net.inputs(net.n2, 2, torch.float64)
    kernel = fastntk.ntk(model, x1, x2, method=method)
    reference = fastntk.reference_ntk(model, x1, x2)
    assert_close(kernel, reference, RTOL[torch.float64] * max_abs(reference), f"{method} vs reference")
