"""Models vmap cannot batch over samples (recurrent layers, .item(), in-place state): every
method, in every mode, against the float64 reference; the probe; the cost of the loop path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastntk
from fastntk.blocks.budget import Sizing
from conftest import METHOD_MODES, METHODS, MODES, assert_kernel_close, assert_matches_reference
from fastntk._functional import FunctionalModel
from fastntk.methods import METHODS as METHOD_CLASSES
from fastntk.methods.jacobian import per_sample_jacobians
from fastntk.methods.per_sample import loop_overhead, looped_jacobians, vmap_failure
from fastntk.plan import estimate

FEATURES, HIDDEN, STEPS = 3, 5, 4


class Recurrent(nn.Module):
    """A recurrent layer on (N, T, F) inputs and a Linear head on its last step or its mean over steps."""

    def __init__(self, cls: type[nn.RNNBase], *, batch_first: bool, head: str, **kwargs: object) -> None:
        super().__init__()
        self.rnn = cls(FEATURES, HIDDEN, batch_first=batch_first, **kwargs)
        self.batch_first, self.head_on = batch_first, head
        self.head = nn.Linear(HIDDEN * (2 if self.rnn.bidirectional else 1), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        y = y if self.batch_first else y.transpose(0, 1)  # (N, T, H)
        return self.head(y[:, -1] if self.head_on == "last" else y.mean(1))


class ItemControlFlow(nn.Module):
    """Python control flow on a tensor's value (.item()), which vmap cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(FEATURES * STEPS, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x.flatten(1))
        if h.abs().max().item() > 100.0:  # never taken, but read per batch
            h = h / 100.0
        return self.b(torch.tanh(h))


class InPlaceState(nn.Module):
    """A hand-written recurrence that writes each step into a preallocated state in place."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.head = nn.Linear(FEATURES + HIDDEN, HIDDEN), nn.Linear(HIDDEN, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], HIDDEN, dtype=x.dtype)
        for t in range(x.shape[1]):
            h.copy_(torch.tanh(self.cell(torch.cat([x[:, t], h], dim=1))))
        return self.head(h)


MODELS = {
    "rnn_batch_first_last": lambda: Recurrent(nn.RNN, batch_first=True, head="last"),
    "rnn_relu_two_layers_mean": lambda: Recurrent(nn.RNN, batch_first=False, head="mean", num_layers=2, nonlinearity="relu"),
    "gru_bidirectional_mean": lambda: Recurrent(nn.GRU, batch_first=False, head="mean", bidirectional=True),
    "gru_two_layers_last": lambda: Recurrent(nn.GRU, batch_first=True, head="last", num_layers=2),
    "lstm_batch_first_two_layers_mean": lambda: Recurrent(nn.LSTM, batch_first=True, head="mean", num_layers=2),
    "lstm_bidirectional_last": lambda: Recurrent(nn.LSTM, batch_first=False, head="last", bidirectional=True),
    "item_control_flow": ItemControlFlow,
    "in_place_state": InPlaceState,
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().double().eval()


def draw(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, STEPS, FEATURES, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("gram", [False, True], ids=["x1-x2", "gram"])
@pytest.mark.parametrize("method, mode", METHOD_MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_unbatchable_models_match_reference(name: str, method: str, mode: str, gram: bool) -> None:
    """Regression: these models raised vmap's RuntimeError from every method."""
    assert_matches_reference((__name__, name, gram), lambda: build(name), draw(4, 1), None if gram else draw(3, 2), method, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["lstm_batch_first_two_layers_mean", "lstm_bidirectional_last"])
def test_float32_lstm_matches_reference(name: str, method: str, mode: str) -> None:
    """Regression: a float32 LSTM runs oneDNN's fused kernel on CPU, which keeps no workspace
    under no_grad (vmap's backward failed) and has no forward mode (vp failed)."""
    model = build(name).float()
    x1, x2 = draw(4, 1).float(), draw(3, 2).float()
    kernel = fastntk.ntk(model, x1, x2, mode=mode, method=method)
    assert kernel.dtype == torch.float32
    assert_kernel_close(kernel, fastntk.reference_ntk(model, x1, x2, mode=mode), torch.float32)
    assert torch.backends.mkldnn.enabled  # vp ran the LSTM without oneDNN, and restored it


def test_vp_counts_as_usable_for_a_float32_lstm() -> None:
    """Regression (review): vp's capability probe ran forward mode on oneDNN's fused LSTM
    only, so a float32 LSTM was ruled out for auto although vp computes it (on composite
    kernels, as its contraction does)."""
    from fastntk.methods.vp import VPMethod

    model, x = build("lstm_bidirectional_last").float(), draw(4, 1).float()
    assert VPMethod(FunctionalModel.build(model), "full", 2).unsupported(x) is None
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize("name", list(MODELS))
def test_probe_names_why_vmap_fails(name: str) -> None:
    f = FunctionalModel.build(build(name))
    assert vmap_failure(f, draw(1, 1)) is not None


def test_probe_passes_batchable_models() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES * STEPS, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    assert vmap_failure(FunctionalModel.build(model), draw(2, 1)) is None


def test_looped_jacobians_zero_for_parameters_an_output_does_not_reach() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.a(x), self.b(x)], dim=1)

    f = FunctionalModel.build(TwoHeads().double())
    x = torch.randn(2, 3, dtype=torch.float64)
    j = looped_jacobians(f, x)
    assert j["a.weight"].shape == (2, 2, 1, 3)
    torch.testing.assert_close(j["a.weight"][:, 0, 0], x)
    assert (j["a.weight"][:, 1] == 0).all() and (j["b.bias"][:, 0] == 0).all()


def test_looped_jacobians_one_output_at_a_time_when_the_backward_cannot_be_vmapped(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES * STEPS, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    f, x = FunctionalModel.build(model), draw(3, 1)
    expected = per_sample_jacobians(f, x)
    original, batched_calls = torch.autograd.grad, []

    def no_batched_backward(*args, is_grads_batched: bool = False, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if is_grads_batched:
            batched_calls.append(1)
            raise RuntimeError("no batching rule")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batched_backward)
    looped = looped_jacobians(f, x)
    assert batched_calls == [1]  # tried once, then one output at a time for every sample
    for name, j in expected.items():
        assert_kernel_close(looped[name], j, torch.float64)


def test_looped_jacobians_match_vmapped_ones() -> None:
    """The loop path gives what vmap(jacrev) gives, on a model both can run."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES * STEPS, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    f = FunctionalModel.build(model)
    x = draw(3, 1)
    expected = per_sample_jacobians(f, x)
    looped = looped_jacobians(f, x)
    assert list(looped) == list(expected)
    for name, j in expected.items():
        assert_kernel_close(looped[name], j, torch.float64)


@pytest.fixture
def vmap_attempts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Calls of vmap(jacrev(...)) over samples, whether they fail or not."""
    from fastntk.methods import jacobian

    calls: list[int] = []
    original = jacobian.vmap
    monkeypatch.setattr(jacobian, "vmap", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("method", ["jacobian", "vp", "structured"])
def test_vmap_failure_is_learnt_once(method: str, vmap_attempts: list[int]) -> None:
    """One failed vmap per kind of input: later blocks (block_size=1) and later calls loop at once."""
    fn = fastntk.ntk_fn(build("gru_two_layers_last"), method=method, block_size=1)
    first = fn(draw(3, 1), draw(2, 2))
    assert len(vmap_attempts) == 1
    second = fn(draw(3, 1), draw(2, 2))
    assert len(vmap_attempts) == 1
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_auto_probes_before_costing(vmap_attempts: list[int]) -> None:
    """auto knows before choosing that the Jacobians will be looped (the probe), and never tries vmap."""
    fn = fastntk.ntk_fn(build("lstm_bidirectional_last"))
    assert fn.plan(draw(4, 1)).chosen in ("jacobian", "structured")
    assert list(fn._batchable.values()) == [False]
    fn(draw(4, 1))
    assert vmap_attempts == []


def test_structured_fallback_loops_over_samples() -> None:
    """The recurrent weights go to the structured method's fallback, the head stays structured."""
    fn = fastntk.ntk_fn(build("lstm_bidirectional_last"), method="structured")
    plan = fn.plan(draw(4, 1))
    kinds = {g.parameters: g.kind for g in plan.groups}
    assert kinds[("head.weight", "head.bias")] != "fallback"
    assert all(kind == "fallback" for names, kind in kinds.items() if names[0].startswith("rnn."))


def test_plan_charges_the_loop_path() -> None:
    """The cost model adds each looped pass's overhead to the methods that loop, and only for
    models vmap cannot batch."""
    model = build("gru_two_layers_last")
    x1, x2 = draw(4, 1), draw(3, 2)
    plan = fastntk.plan(model, x1, x2)
    f = FunctionalModel.build(model)
    f.batchable = True
    sizing = Sizing(4, 3, False, input_bytes=0, pair_bytes=0, budget=2**30)
    batched = estimate(METHOD_CLASSES["jacobian"](f, "full", 2), sizing, plan.forward_flops)
    assert plan.flops["jacobian"] == pytest.approx(batched + loop_overhead(4 + 3, 2))


@pytest.mark.parametrize("name", ["gru_two_layers_last", "lstm_bidirectional_last", "rnn_relu_two_layers_mean"])
def test_plan_counts_every_step_of_a_recurrent_layer(name: str) -> None:
    """Regression: a recurrent layer's products were not counted (a one-step guess per parameter),
    so auto took vp for an LSTM, about 2.5 times slower than jacobian."""
    model = build(name)
    weights = sum(p.numel() for n, p in model.rnn.named_parameters() if n.startswith("weight"))
    assert fastntk.plan(model, draw(4, 1)).forward_flops >= 2 * STEPS * weights


@pytest.mark.parametrize("method", ["auto", "structured"])
def test_disk_gram_of_an_lstm(method: str) -> None:
    """fastntk.gram (blocks of 2, the plan costed and the fallback learnt per block) on a model vmap cannot batch."""
    model, x = build("lstm_bidirectional_last"), draw(5, 1)
    kernel = torch.as_tensor(fastntk.gram(model, x, mode="trace", method=method, block_size=2, progress=False))
    assert_kernel_close(kernel, fastntk.reference_ntk(model, x, mode="trace"), torch.float64)
