"""The structured method's one-block Gram matrix (x2=None, the Gram stream) on models whose
parameters are used more than once or partly outside the rules, and the calibration's check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastntk
from conftest import DTYPES, assert_kernel_close
from fastntk._functional import FunctionalModel
from fastntk._checks import tolerance
from fastntk.methods import StructuredMethod
from fastntk.methods.structured.factors import PairFactor


class ConvTwice(nn.Module):
    """One Conv2d applied twice: its weight and bias groups have two uses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))


class NormTwice(nn.Module):
    """One LayerNorm applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.mid, self.head = nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.inp(x)))
        return self.head(self.norm(torch.tanh(self.mid(h))))


class ConvTransposeShared(nn.Module):
    """A conv weight also used by F.conv_transpose2d (no rule): it goes to the fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv_transpose2d(torch.tanh(self.conv(x)), self.conv.weight, padding=1)
        return self.head(torch.tanh(h).flatten(1))


class NormWeightDirect(nn.Module):
    """A LayerNorm weight also used directly (outside its rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.head = nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.inp(x)))
        return self.head(torch.tanh(h * self.norm.weight))


MODELS = {
    "conv_twice": (ConvTwice, (3, 6, 6)),
    "norm_twice": (NormTwice, (5,)),
    "conv_transpose_shared": (ConvTransposeShared, (3, 6, 6)),
    "norm_weight_direct": (NormWeightDirect, (5,)),
}


def build(name: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """The model (norm affine parameters moved off 1 and 0) and 6 inputs, seeded."""
    cls, shape = MODELS[name]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = cls()
        with torch.no_grad():
            for parameter_name, p in model.named_parameters():
                if parameter_name.startswith("norm"):
                    p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(1))
    return model.to(dtype), x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_size", [None, 6, 64], ids=["default", "chunk=N", "chunk>N"])
@pytest.mark.parametrize("method", ["structured", "auto"])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("name", list(MODELS))
def test_one_block_gram_of_shared_parameters(name: str, mode: str, method: str, chunk_size: int | None, dtype: torch.dtype) -> None:
    """K(x, x) of one block: each group's uses merged before contracting (the stream once
    contracted each use alone, losing their cross terms, and added a fallback parameter's
    share on top of its structured one)."""
    model, x = build(name, dtype)
    kernel = fastntk.ntk(model, x, mode=mode, method=method, block_size=chunk_size)
    assert_kernel_close(kernel, fastntk.reference_ntk(model, x, mode=mode), dtype)


class SmallBranch(nn.Module):
    """A dense path plus a tiny one: the tiny Linear's gradients are ~1e-10 of the others."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head, self.tiny = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inp(x))) + 1e-10 * self.tiny(x)


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_check_catches_a_corrupted_group_with_tiny_gradients(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check compares each group in its own scale: a group whose factors are wrong (here
    doubled) goes to the fallback however small its gradients. The former gradient check
    (tolerance √eps times the largest gradient of ALL parameters) passed it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SmallBranch().double()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = FunctionalModel.build(model)
    corrupted = ("tiny.weight", "tiny.bias")
    original = StructuredMethod.use_factors

    def doubled(self, use, cotangents, roles, num_outputs):  # noqa: ANN001, ANN202
        factors = original(self, use, cotangents, roles, num_outputs)
        if corrupted in factors:
            factor = factors[corrupted]
            assert isinstance(factor, PairFactor)
            factors[corrupted] = PairFactor(factor.keys, 2 * factor.cotangents, factor.kind, factor.plus_one, factor.sample_major)
        return factors

    # the former check's view: the corruption's error in the gradient (as large as the tiny
    # group's gradient itself) is below √eps times the largest gradient
    weights = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    primals = {name: p.detach().requires_grad_() for name, p in f.primals.items()}
    gradients = dict(zip(primals, torch.autograd.grad((f(primals, x[:2]) * weights).sum(), list(primals.values()))))
    largest = max(g.abs().max().item() for g in gradients.values())
    assert max(gradients[name].abs().max().item() for name in corrupted) < tolerance(torch.float64) * largest

    honest = StructuredMethod(f, mode, 3)
    honest = honest.calibrated(x)[0]
    assert honest.fallback == []
    monkeypatch.setattr(StructuredMethod, "use_factors", doubled)
    method = StructuredMethod(f, mode, 3)
    method = method.calibrated(x)[0]
    assert method.fallback == sorted(corrupted)


class ManyOutputs(SmallBranch):
    """SmallBranch with O = 40 outputs: more than the check's CHECKED_OUTPUTS."""

    def __init__(self) -> None:
        super().__init__()
        self.head, self.tiny = nn.Linear(8, 40), nn.Linear(5, 40)


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_check_with_many_outputs_projects_instead_of_forming_o_by_o_blocks(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (review): the check formed each group's (k, k, O, O) contraction, O² times
    a group's parameters, even in trace mode (a Linear(32, 8000) head: 5 s -> 29 s). It now
    projects the factors on its directions; a corrupted group is still caught, and the
    kernel is exact."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ManyOutputs().double()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_kernel_close(fastntk.ntk(model, x, mode=mode, method="structured"), fastntk.reference_ntk(model, x, mode=mode), torch.float64)
    f = FunctionalModel.build(model)
    corrupted = ("tiny.weight", "tiny.bias")
    original = StructuredMethod.use_factors

    def one_output_doubled(self, use, cotangents, roles, num_outputs):  # noqa: ANN001, ANN202
        factors = original(self, use, cotangents, roles, num_outputs)
        if corrupted in factors:
            factor = factors[corrupted]
            assert isinstance(factor, PairFactor)
            g = factor.cotangents.clone()
            g[:, 37] *= 2  # one output of forty
            factors[corrupted] = PairFactor(factor.keys, g, factor.kind, factor.plus_one, factor.sample_major)
        return factors

    monkeypatch.setattr(StructuredMethod, "use_factors", one_output_doubled)
    method = StructuredMethod(f, mode, 40)
    method = method.calibrated(x)[0]
    assert method.fallback == sorted(corrupted)
