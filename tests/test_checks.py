"""Refusals of models whose per-sample NTK is not defined, and that a call leaves model and RNG alone.

Standard: a refused model gets a ``fastntk.ModelError`` whose message names the
module (or the behaviour) and the fix; an accepted model is neither modified nor
does the call disturb the user's global random state.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastntk
from fastntk.blocks.budget import INPUT_COPIES, OUTPUT_COPIES
from cases import ScalesItsInput
from conftest import RTOL64, assert_rel_close

# Tolerance of float64 results that must agree up to rounding (exact algebra, different summation order).


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- models


def mlp_bn1d() -> nn.Sequential:
    """BatchNorm1d at path '1'."""
    seeded(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2))


class ConvBN(nn.Module):
    """BatchNorm2d at path 'bn'."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bn(self.conv(x))).flatten(1))


def conv_bn() -> ConvBN:
    seeded(0)
    return ConvBN()


def set_running_stats(model: nn.Module, seed: int = 3) -> None:
    """Non-trivial running statistics so that eval-mode BatchNorm is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def mlp_dropout() -> nn.Sequential:
    """nn.Dropout at path '1'."""
    seeded(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 2))


class ConvDropout2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.drop = nn.Dropout2d(0.25)
        self.head = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.conv(x))).flatten(1))


class Attention(nn.Module):
    """MultiheadAttention (with its own dropout probability) at path 'att'."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.att(x, x, x, need_weights=False)[0].mean(1))


class Centered(nn.Module):
    """Subtracts the batch mean: each sample's output depends on the other samples."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x - x.mean(0))


class Noisy(nn.Module):
    """Draws fresh noise at every call, in any mode: invisible to a module-type check."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x + torch.randn_like(x))


def vectors(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(seed))


def sequences(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 5, 4, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- BatchNorm in training mode


@pytest.mark.parametrize(
    "build, inputs, path, kind",
    [(mlp_bn1d, vectors, "'1'", "BatchNorm1d"), (conv_bn, images, "'bn'", "BatchNorm2d")],
    ids=["bn1d", "bn2d"],
)
def test_batchnorm_in_training_mode_is_refused_naming_it(build, inputs, path, kind) -> None:
    model = build().train()
    with pytest.raises(fastntk.ModelError) as info:
        fastntk.ntk(model, inputs())
    message = str(info.value)
    assert kind in message and path in message
    assert "training mode" in message
    assert "model.eval()" in message


@pytest.mark.parametrize("build, inputs", [(mlp_bn1d, vectors), (conv_bn, images)], ids=["bn1d", "bn2d"])
def test_batchnorm_in_eval_mode_computes_the_reference(build, inputs) -> None:
    model = build().double()
    set_running_stats(model)
    model.eval()
    x1, x2 = inputs(4, seed=1).double(), inputs(3, seed=2).double()
    for method in ("jacobian", "vp"):
        assert_rel_close(fastntk.ntk(model, x1, x2, method=method), fastntk.reference_ntk(model, x1, x2), RTOL64)


def test_only_the_norm_layers_in_eval_mode_is_enough() -> None:
    """The message's alternative fix ("put just the norm layers in eval mode") really works."""
    model = mlp_bn1d().train()
    model[1].eval()
    assert fastntk.ntk(model, vectors()).shape == (4, 4, 2, 2)


def test_batchnorm_without_running_stats_is_refused_with_a_model_error_naming_it() -> None:
    """track_running_stats=False uses batch statistics even in eval mode: the same refusal is due.

    ``model.eval()`` does not help here, so the message must not stop at suggesting it.
    """
    seeded(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 2)).eval()
    with pytest.raises(fastntk.ModelError) as info:
        fastntk.ntk(model, vectors())
    message = str(info.value)
    assert "'1'" in message and "track_running_stats" in message


# --------------------------------------------------------------------------- batch dependence, detected empirically


def test_batch_dependent_custom_module_is_refused() -> None:
    with pytest.raises(fastntk.ModelError) as info:
        fastntk.ntk(Centered(), vectors(4))
    message = str(info.value)
    assert "depends on the other samples" in message
    assert "per-sample" in message


def test_batch_dependence_is_detected_with_one_x1_sample_and_x2_given() -> None:
    """The probe fills up with samples of x2 when x1 has fewer than it needs."""
    with pytest.raises(fastntk.ModelError, match="depends on the other samples"):
        fastntk.ntk(Centered(), vectors(1, seed=1), vectors(3, seed=2))


def test_batch_dependence_is_detected_by_a_reused_kernel_after_a_one_sample_call() -> None:
    """A one-sample probe cannot see batch dependence; it must not excuse later, larger batches."""
    fn = fastntk.ntk_fn(Centered())
    try:
        fn(vectors(1))
    except fastntk.ModelError:
        pass  # refusing already is fine too
    with pytest.raises(fastntk.ModelError, match="depends on the other samples"):
        fn(vectors(4))


# --------------------------------------------------------------------------- dropout in training mode


@pytest.mark.parametrize(
    "build, inputs, path, kind",
    [
        (mlp_dropout, vectors, "'1'", "Dropout"),
        (lambda: (seeded(0), ConvDropout2d())[1], images, "'drop'", "Dropout2d"),
        (lambda: (seeded(0), Attention(0.1))[1], sequences, "'att'", "MultiheadAttention"),
    ],
    ids=["dropout", "dropout2d", "multihead-attention"],
)
def test_active_dropout_is_refused_naming_it(build, inputs, path, kind) -> None:
    model = build().train()
    with pytest.raises(fastntk.ModelError) as info:
        fastntk.ntk(model, inputs())
    message = str(info.value)
    assert kind in message and path in message
    assert "model.eval()" in message


@pytest.mark.parametrize(
    "build, inputs",
    [
        (mlp_dropout, vectors),
        (lambda: (seeded(0), ConvDropout2d())[1], images),
        (lambda: (seeded(0), Attention(0.1))[1], sequences),
    ],
    ids=["dropout", "dropout2d", "multihead-attention"],
)
def test_dropout_in_eval_mode_computes_the_reference(build, inputs) -> None:
    model = build().double().eval()
    x1, x2 = inputs(3, seed=1).double(), inputs(2, seed=2).double()
    assert_rel_close(fastntk.ntk(model, x1, x2), fastntk.reference_ntk(model, x1, x2), RTOL64)


def test_dropout_with_probability_zero_in_training_mode_is_accepted() -> None:
    """p=0 draws nothing: the kernel is the eval-mode one (the refusal is about randomness, not mode)."""
    model = mlp_dropout().double()
    model[1].p = 0.0
    x = vectors().double()
    train_kernel = fastntk.ntk(model.train(), x)
    assert_rel_close(train_kernel, fastntk.ntk(model.eval(), x), RTOL64)


# --------------------------------------------------------------------------- custom randomness, detected empirically


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_custom_randomness_is_refused(training: bool) -> None:
    model = Noisy().train(training)
    with pytest.raises(fastntk.ModelError) as info:
        fastntk.ntk(model, vectors())
    message = str(info.value)
    assert "random" in message
    assert "remove the randomness" in message


def test_custom_randomness_is_detected_even_for_one_sample() -> None:
    with pytest.raises(fastntk.ModelError, match="random"):
        fastntk.ntk(Noisy(), vectors(1))


# --------------------------------------------------------------------------- the user's RNG state


@pytest.mark.parametrize(
    "build, inputs, refused",
    [
        (lambda: mlp_dropout().eval(), vectors, False),
        (lambda: (seeded(0), Noisy())[1], vectors, True),
        (lambda: mlp_dropout().train(), vectors, True),
        (lambda: (seeded(0), Centered())[1], vectors, True),
    ],
    ids=["accepted", "random-refused", "dropout-refused", "batch-dependent-refused"],
)
def test_global_rng_state_is_unchanged_by_a_call(build, inputs, refused: bool) -> None:
    model = build()
    x = inputs()
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    if refused:
        with pytest.raises(fastntk.ModelError):
            fastntk.ntk(model, x)
    else:
        fastntk.ntk(model, x, vectors(3, seed=2))
        fastntk.ntk_fn(model, method="vp")(x)
    assert torch.equal(torch.get_rng_state(), before)
    # And so the next draw is the one the user would have got without the call.
    expected = torch.randn(5, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(torch.randn(5), expected)


# --------------------------------------------------------------------------- the model is not modified


class Mixed(nn.Module):
    """A frozen parameter, BatchNorm buffers, a dropout and a nested module."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.bn = nn.BatchNorm1d(5)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(5, 2)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.tanh(self.bn(self.inp(x))))) * self.scale


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def assert_unmodified(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["dtypes"] == before["dtypes"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    for name, p in model.named_parameters():
        assert p.grad is None, name


@pytest.mark.parametrize("method", ["jacobian", "vp", "auto"])
@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["model-dtype", "float64"])
def test_model_is_not_modified_by_a_call(method: str, dtype) -> None:
    seeded(0)
    model = Mixed()
    set_running_stats(model)
    model.eval()
    model.out.train()  # a mixed train/eval state must survive too (Linear in train mode is harmless)
    before = snapshot(model)
    fastntk.ntk(model, vectors(4), vectors(3, seed=2), method=method, dtype=dtype)
    fastntk.ntk(model, vectors(4), method=method, dtype=dtype, params=["scale", "out.weight"], mode="trace")
    assert_unmodified(model, before)


def test_model_is_not_modified_by_a_refused_call() -> None:
    seeded(0)
    model = Mixed().train()
    before = snapshot(model)
    with pytest.raises(fastntk.ModelError):
        fastntk.ntk(model, vectors())
    assert_unmodified(model, before)


def test_refused_custom_model_is_not_modified_and_keeps_its_grads() -> None:
    """A .grad the user already has stays exactly as it was (nothing computed is lost)."""
    seeded(0)
    model = Noisy()
    model.lin(vectors()).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fastntk.ModelError):
        fastntk.ntk(model, vectors())
    fastntk.ntk(nn.Sequential(model.lin), vectors())  # an accepted call on the same parameters
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


# --------------------------------------------------------------------------- inputs written to


@pytest.mark.parametrize("method", ["jacobian", "vp", "structured", "auto"])
def test_a_model_writing_to_its_input_is_refused_naming_it_and_leaves_the_inputs_alone(method: str) -> None:
    # regression: refused as "draws random numbers", and the caller's x1 was doubled
    seeded(0)
    x1, x2 = torch.randn(4, 3), torch.randn(3, 3)
    before1, before2 = x1.clone(), x2.clone()
    with pytest.raises(fastntk.ModelError, match=r"modifies its input in place.*x = x \* 2.*x\.clone\(\)"):
        fastntk.ntk(ScalesItsInput(), x1, x2, method=method)
    assert torch.equal(x1, before1) and torch.equal(x2, before2)
    assert x1._version == 0 and x2._version == 0


# --------------------------------------------------------------------------- the memory budget


def wide_output_mlp() -> nn.Sequential:
    """O = 40 outputs from a narrow layer: the structured factors are far smaller than J."""
    seeded(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 40)).double()


@pytest.mark.parametrize("method", ["jacobian", "vp"])
def test_a_budget_below_one_sample_is_refused_before_any_work(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # regression: max_memory=1 MiB with O=5000 peaked at gigabytes without a word
    from fastntk.methods import jacobian, vp

    def no_factors(*_):  # noqa: ANN002, ANN202
        raise AssertionError("factors computed although the budget cannot hold them")

    monkeypatch.setattr(jacobian, "per_sample_jacobians", no_factors)
    monkeypatch.setattr(vp, "per_sample_jacobians", no_factors)
    model, x = wide_output_mlp(), torch.randn(4, 3, dtype=torch.float64)
    sides = {"jacobian": 2, "vp": 1}[method]  # vp's x1 blocks are inputs, its x2 blocks Jacobians
    pair, sample = 40 * 40 * 8, 3 * 8  # bytes of one pair's (O, O) block, of one sample's inputs
    result = 4 * 4 * pair  # held in memory, within max_memory
    need = sides * fastntk.plan(model, x).bytes_per_sample[method] + INPUT_COPIES * sample + OUTPUT_COPIES * pair + result
    with pytest.raises(fastntk.OptionError, match=rf"method '{method}' \(O=40.*max_memory={need} or more"):
        fastntk.ntk(model, x, method=method, max_memory=need - 1)
    monkeypatch.undo()
    assert_rel_close(fastntk.ntk(model, x, method=method, max_memory=need), fastntk.reference_ntk(model, x), RTOL64)


def test_a_block_size_must_fit_the_budget_too() -> None:
    """block_size sets the blocks by hand, within max_memory: blocks it cannot hold are refused
    before any work, naming both; blocks that fit give the kernel."""
    model, x = wide_output_mlp(), torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(fastntk.OptionError, match=r"blocks of 4 samples need .*max_memory=.*smaller block_size"):
        fastntk.ntk(model, x, method="jacobian", max_memory="1MB", block_size=4)
    kernel = fastntk.ntk(model, x, method="jacobian", max_memory="1MB", block_size=1)
    assert_rel_close(kernel, fastntk.reference_ntk(model, x), RTOL64)


def test_auto_chooses_a_method_that_keeps_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    plan_module = importlib.import_module("fastntk.plan")
    model, x = wide_output_mlp(), torch.randn(4, 3, dtype=torch.float64)
    sizes = fastntk.plan(model, x).bytes_per_sample
    pair = 40 * 40 * 8
    rest = INPUT_COPIES * 3 * 8 + OUTPUT_COPIES * pair + 4 * 4 * pair  # one sample's inputs and output block, the result
    budget = 2 * sizes["structured"] + rest
    assert budget < min(2 * sizes["jacobian"], sizes["vp"]) + rest
    monkeypatch.setattr(plan_module, "estimate", lambda method, *a: 1.0 if method.name == "structured" else 0.0)
    plan = fastntk.plan(model, x, max_memory=budget)
    assert plan.chosen == "structured" and {"jacobian", "vp"} <= plan.unusable.keys()
    assert_rel_close(fastntk.ntk(model, x, max_memory=budget), fastntk.reference_ntk(model, x), RTOL64)
