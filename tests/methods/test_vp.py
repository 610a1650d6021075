"""Method "vp": its forward-mode passes differentiate the function reverse mode (and so J) does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vjp

import fastntk
from conftest import DTYPES, assert_kernel_close
from fastntk.methods.vp import PaddingRowsHeld

MODES = ["full", "trace", "diagonal"]


class TiedPaddedLM(nn.Module):
    """An embedding with a padding row whose weight is also the output projection."""

    def __init__(self, vocab: int = 9, dim: int = 5, padding_idx: int = 0) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.hidden = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(self.emb(ids).mean(1)))
        return F.linear(h, self.emb.weight)


def padded_ids(n: int, padding_idx: int, vocab: int = 9, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, vocab, (n, 6), generator=torch.Generator().manual_seed(seed))
    ids[:, -2:] = padding_idx % vocab  # every sample looks the padding row up
    return ids


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("params", [None, ["emb.weight"]], ids=["all", "embedding"])
@pytest.mark.parametrize("padding_idx", [0, -1])
@pytest.mark.parametrize("mode", MODES)
def test_tied_embedding_with_a_padding_row_matches_autograd(mode: str, padding_idx: int, params, dtype: torch.dtype) -> None:
    # regression: forward mode read the padding row's tangent that reverse mode zeroes (rel. error 1e-2 to 1e-1)
    model = TiedPaddedLM(padding_idx=padding_idx).to(dtype)
    x1, x2 = padded_ids(4, padding_idx), padded_ids(3, padding_idx, seed=2)
    expected = fastntk.reference_ntk(model, x1, x2, mode=mode, params=params)
    assert_kernel_close(fastntk.ntk(model, x1, x2, mode=mode, method="vp", params=params), expected, dtype)


def test_padding_row_used_only_by_lookups_contributes_nothing() -> None:
    # the documented kernel of a padding row: PyTorch gives it no gradient from lookups
    model = nn.Sequential(nn.Embedding(6, 4, padding_idx=2), nn.Flatten(), nn.Linear(12, 3)).double()
    only_padding = torch.full((3, 3), 2)
    for method in ("vp", "jacobian", "structured"):
        kernel = fastntk.ntk(model, only_padding, method=method, params=["0.weight"])
        assert torch.equal(kernel, torch.zeros_like(kernel)), method


@pytest.mark.parametrize("call", ["functional", "aten"])
def test_forward_mode_of_an_embedding_lookup_equals_its_reverse_mode(call: str) -> None:
    gen = torch.Generator().manual_seed(0)
    weight, tangent, cotangent = (torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    ids = torch.tensor([[0, 3, 3], [0, 1, 4]])
    cotangent = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)

    def lookup(w: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, w, padding_idx=3) if call == "functional" else torch.embedding(w, ids, 3)

    with PaddingRowsHeld():
        out, forward = jvp(lookup, (weight,), (tangent,))
    _, pullback = vjp(lookup, weight)
    (backward,) = pullback(cotangent)
    assert torch.equal(out, lookup(weight))  # values unchanged
    # <cotangent, J tangent> = <Jᵀ cotangent, tangent>: both modes see the same J
    assert torch.allclose((cotangent * forward).sum(), (backward * tangent).sum(), rtol=1e-12, atol=0)


def weight_normed() -> nn.Module:
    from torch.nn.utils.parametrizations import weight_norm

    return nn.Sequential(weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)).double()


def test_a_model_without_forward_mode_rules_is_unsupported_by_vp_naming_the_op() -> None:
    from fastntk._functional import FunctionalModel
    from fastntk.methods.vp import VPMethod

    x = torch.randn(2, 3, dtype=torch.float64)
    reason = VPMethod(FunctionalModel.build(weight_normed()), "full", 2).unsupported(x)
    assert reason is not None and "_weight_norm" in reason
    assert VPMethod(FunctionalModel.build(TiedPaddedLM()), "full", 9).unsupported(padded_ids(2, 0)) is None


def test_auto_never_chooses_a_method_that_cannot_compute_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # regression: auto chose vp for weight_norm models (cheapest estimate), then vp refused
    import importlib

    plan_module = importlib.import_module("fastntk.plan")

    model, x = weight_normed(), torch.randn(3, 3, dtype=torch.float64)
    monkeypatch.setattr(plan_module, "estimate", lambda method, *a: 0.0 if method.name == "vp" else 1.0)
    plan = fastntk.plan(model, x)
    assert plan.chosen != "vp" and "vp" in plan.unusable and "vp cannot be used" in str(plan)
    assert_kernel_close(fastntk.ntk(model, x), fastntk.reference_ntk(model, x), torch.float64)
