"""Minimal reproducers of what the differential fuzzer found, one named test each.

Each builds a few-line model and runs the fuzzer's oracle (:func:`differential.check_model`)
on the combinations that failed: the kernel must match the float64 reference, or the method
must refuse with a ModelError naming one that computes it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastntk

from differential import check_model, combos_of

F64 = torch.float64


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=F64)


class SharedOverPositions(nn.Module):
    """One Linear applied twice to (N, 2, 2) sequences, then a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(torch.tanh(self.fc(x))).flatten(1))


class ConvTwice(nn.Module):
    """One Conv1d applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3, padding="same")
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(torch.relu(self.conv(x))).flatten(1))


class NormWeightReused(nn.Module):
    """A LayerNorm whose weight also scales its output directly (a use outside its rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x) * self.norm.weight)


class TiedEmbedding(nn.Module):
    """Per-position logits by the embedding's own weight (no padding_idx)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(self.embed(ids), self.embed.weight).flatten(1)


ONE_BLOCK_CASES = {
    "linear-twice-over-positions": (SharedOverPositions, lambda: randn(5, 2, 2)),
    "conv-twice": (ConvTwice, lambda: randn(4, 2, 4)),
    "layernorm-weight-reused": (NormWeightReused, lambda: randn(4, 3)),
    "tied-embedding": (TiedEmbedding, lambda: torch.tensor([[0, 1], [2, 3], [1, 4], [0, 0]])),
}


@pytest.mark.parametrize("case", sorted(ONE_BLOCK_CASES))
def test_one_block_gram_trace_and_diagonal_of_a_parameter_used_twice(case: str) -> None:
    """structured/auto, x2=None, all N samples in one block (block_size=N or None): trace and
    diagonal were wrong for a parameter used twice or partly outside the rules (full mode,
    x2 given and blocks smaller than N were right)."""
    torch.manual_seed(0)
    make_model, draw = ONE_BLOCK_CASES[case]
    model = make_model().to(F64)
    check_model(model, draw(), None, combos=combos_of(["structured", "auto"], ["trace", "diagonal"], [True], ["N", "default"]))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
def test_recurrent_layers(cell: type[nn.RNNBase]) -> None:
    """Every method crashed with a RuntimeError (a broadcast shape mismatch inside the RNN's
    functional call) instead of computing the kernel or refusing with a ModelError."""
    torch.manual_seed(0)
    model = Recurrent(cell).to(F64)
    check_model(model, randn(3, 2, 3), randn(2, 2, 3), combos=combos_of(modes=["full"], chunks=["default"]))


def test_auto_does_not_pick_vp_for_weight_norm() -> None:
    """"auto" chose vp (cheapest estimate) for a weight_norm layer, whose op has no forward-mode
    derivative, and then refused; jacobian and structured compute the kernel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)), nn.Tanh(), nn.Linear(3, 2)).to(F64)
    check_model(model, randn(3, 3), randn(2, 3), combos=combos_of(["auto"], ["full"], [False], ["default"]))


class TiedPaddedEmbedding(nn.Module):
    """An Embedding with padding_idx whose weight is also the output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.embed(ids).mean(1)), self.embed.weight)


def test_vp_with_padding_idx_embedding_tied_to_the_output() -> None:
    """vp (and auto, which picks it) differed from the reference by the padding row's terms when
    that weight is also used elsewhere (an untied padding_idx embedding was right)."""
    torch.manual_seed(0)
    model = TiedPaddedEmbedding().to(F64)
    ids = torch.tensor([[0, 1], [0, 2], [3, 0]])
    check_model(model, ids, ids[:2], combos=combos_of(["vp", "auto"], ["full"], [False], ["default"]))


class Guarded(nn.Module):
    """Data-dependent control flow: an overflow guard that never fires on these inputs, after a
    Linear (structured covers fc by its rule) or after a 0-d scale (no rule: Jacobian fallback)."""

    def __init__(self, scaled: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.tensor(1.5)) if scaled else None
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x) if self.scale is None else self.scale * x
        if bool((h.abs() > 1e6).any()):
            h = h * 0.5
        return self.head(h)


@pytest.mark.parametrize("scaled", [False, True], ids=["after-linear", "after-scale"])
def test_data_dependent_control_flow(scaled: bool) -> None:
    """Every vmap-based path crashed with vmap's RuntimeError (bool() of a batched tensor): jacobian
    and vp always, structured and auto where a parameter falls back to per-sample Jacobians;
    a refusal must be a ModelError naming a method that computes the kernel."""
    torch.manual_seed(0)
    model = Guarded(scaled).to(F64)
    check_model(model, randn(3, 3), randn(2, 3), combos=combos_of(modes=["full"], chunks=["default"]))


def test_float32_rounding_of_an_ill_conditioned_model_is_not_a_wrong_kernel() -> None:
    """Found by the long run: a LayerNorm after attention, only the embedding differentiated,
    one token's kernel of 2e-3 — every method, jacobian included, is 8e-5 off the float64
    kernel in float32 (500 ulps of max|K| is 6e-5), because the float32 forward pass itself
    moves it that much. The oracle allows ROUNDING_FACTOR times what the brute-force
    reference in float32 is off (scaled to the dtype's eps), and still refuses a kernel off
    by more than that."""
    from differential import ROUNDING_FACTOR, Checker
    from grammar import Spec, build, draw_inputs, selection

    spec = Spec(
        family="embedding", input=("ids", 6, 3, None), inputs="tensor",
        ops=(("embed", 6, 2, None), ("mha", 1), ("transpose",), ("layernorm", True), ("ln_weight", "m3")),
        output="linear", outputs=1, frozen=(0,), params=(0,), train=False, n1=1, n2=1, seed=0,
    )
    model = build(spec, torch.float32)
    x1, x2 = draw_inputs(spec, spec.n1, 1, torch.float32), draw_inputs(spec, spec.n2, 2, torch.float32)
    check_model(model, x1, x2, selection(spec, model), combos_of(["jacobian", "structured", "auto"], ["full", "diagonal"], [True], ["N"]))
    checker = Checker(model, x1, x2, selection(spec, model))
    reference = checker.reference(True)
    off = reference + 2 * ROUNDING_FACTOR * checker.rounding(True).max() + 1e-3 * reference.abs().max()
    with pytest.raises(AssertionError):
        checker.assert_close(off.float(), "full", gram=True)


def test_the_fuzzers_self_kernel_check_catches_a_wrong_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_self compares fastntk.self_ntk with the reference Gram's diagonal: right passes, doubled fails."""
    from differential import Checker, Combo

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    for mode in ("full", "trace", "diagonal"):  # the fuzzer's modes (trace_mean is trace / O)
        checker = Checker(model, x1, x2)
        checker.check_self(Combo("structured", mode, False, "2"))
        assert not checker.failures, checker.failures
    right = fastntk.self_ntk
    monkeypatch.setattr(fastntk, "self_ntk", lambda *args, **kwargs: 2 * right(*args, **kwargs))
    checker = Checker(model, x1, x2)
    checker.check_self(Combo("structured", "trace", False, "default"))
    assert [kind.__name__ for kind, _, _ in checker.failures] == ["WrongKernel"]


def test_the_fuzzers_operator_check_catches_a_wrong_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_operator compares NTKOperator @ v with the reference kernel laid out 2-D times v:
    right passes (both x2 choices, several block sizes, float32 and float64), 1.001 times it fails."""
    from differential import Checker, Combo

    from fastntk.operator import NTKOperator

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(dtype)
        x1, x2 = torch.randn(4, 3, dtype=dtype), torch.randn(3, 3, dtype=dtype)
        checker = Checker(model, x1, x2)
        for gram, chunk in ((True, "1"), (False, "2"), (False, "default")):
            checker.check_operator(Combo("structured", "full", gram, chunk))
        assert not checker.failures, checker.failures
    right = NTKOperator.__matmul__
    monkeypatch.setattr(NTKOperator, "__matmul__", lambda self, v: 1.001 * right(self, v))
    checker = Checker(model, x1, x2)
    checker.check_operator(Combo("structured", "trace", False, "default"))
    assert [kind.__name__ for kind, _, _ in checker.failures] == ["WrongKernel"]


def test_the_fuzzers_tracker_check_catches_a_wrong_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_tracker compares KernelTracker's kernels with the reference Gram: right passes, a
    tracker whose kernels are doubled fails, and so does one that leaves the model changed."""
    from differential import Checker, Combo
    from fastntk import tracking

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    for mode in ("full", "trace", "diagonal"):
        checker = Checker(model, x1, x2)
        checker.check_tracker(Combo("auto", mode, False, "2"))
        assert not checker.failures, checker.failures
    right = tracking.KernelTracker._compute
    monkeypatch.setattr(tracking.KernelTracker, "_compute", lambda self: (2 * right(self)[0], 0.0))
    checker = Checker(model, x1, x2)
    checker.check_tracker(Combo("jacobian", "trace", False, "default"))
    assert [kind.__name__ for kind, _, _ in checker.failures] == ["WrongKernel"]

    def mutating(self):
        with torch.no_grad():
            next(self.model.parameters()).add_(1.0)
        return right(self)

    monkeypatch.setattr(tracking.KernelTracker, "_compute", mutating)
    checker = Checker(model, x1, x2)
    checker.check_tracker(Combo("jacobian", "trace", False, "default"))
    assert "Mutated" in [kind.__name__ for kind, _, _ in checker.failures]
