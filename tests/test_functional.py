"""The parameter selection, buffers, output flattening and the model's dtype."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastntk
from conftest import RTOL64, assert_rel_close



def vectors(n: int, seed: int = 1, features: int = 3) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


# --------------------------------------------------------------------------- params selection


def trainable_copy(model: nn.Module) -> nn.Module:
    """The same model with every parameter requiring grad (the kernel of a named selection ignores the flags)."""
    return copy.deepcopy(model).requires_grad_(True)


def test_none_selects_every_parameter_with_requires_grad() -> None:
    model = mlp()
    model[0].bias.requires_grad_(False)
    x1, x2 = vectors(4), vectors(3, seed=2)
    trainable = ["0.weight", "2.weight", "2.bias"]
    kernel = fastntk.ntk(model, x1, x2)
    assert_rel_close(kernel, fastntk.reference_ntk(model, x1, x2, params=trainable), RTOL64)
    # The frozen bias contributes something, so leaving it out is visible.
    everything = fastntk.reference_ntk(trainable_copy(model), x1, x2)
    assert (everything - kernel).abs().max() > 1e-3 * everything.abs().max()


def test_the_kernel_is_the_sum_of_the_per_parameter_kernels() -> None:
    """K = Σ_p J_p J_pᵀ: a check of the selection that does not go through the reference."""
    model = mlp()
    x1, x2 = vectors(4), vectors(3, seed=2)
    parts = [fastntk.ntk(model, x1, x2, params=[name]) for name, _ in model.named_parameters()]
    assert_rel_close(sum(parts), fastntk.ntk(model, x1, x2), RTOL64)


@pytest.mark.parametrize("method", ["jacobian", "vp", "structured"])
def test_a_list_of_names_equals_the_reference_with_the_same_selection(method: str) -> None:
    model = mlp()
    x1, x2 = vectors(4), vectors(3, seed=2)
    names = ["2.bias", "0.weight"]
    kernel = fastntk.ntk(model, x1, x2, params=names, method=method)
    assert_rel_close(kernel, fastntk.reference_ntk(model, x1, x2, params=names), RTOL64)


def test_a_frozen_parameter_can_be_selected_by_name() -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    x = vectors(4)
    kernel = fastntk.ntk(model, x, params=["0.weight"])
    assert_rel_close(kernel, fastntk.reference_ntk(trainable_copy(model), x, params=["0.weight"]), RTOL64)
    assert model[0].weight.requires_grad is False


def test_reference_accepts_a_frozen_parameter_selected_by_name() -> None:
    """reference_ntk takes the same ``params`` as ntk, so a frozen parameter named explicitly must work."""
    model = mlp()
    model[0].weight.requires_grad_(False)
    x = vectors(4)
    expected = fastntk.reference_ntk(trainable_copy(model), x, params=["0.weight"])
    assert_rel_close(fastntk.reference_ntk(model, x, params=["0.weight"]), expected, RTOL64)
    assert model[0].weight.requires_grad is False


def test_a_predicate_selects_like_the_equivalent_list() -> None:
    model = mlp()
    x = vectors(4)
    seen: list[str] = []

    def biases(name: str, p: nn.Parameter) -> bool:
        seen.append(name)
        return name.endswith("bias")

    kernel = fastntk.ntk(model, x, params=biases)
    assert_rel_close(kernel, fastntk.reference_ntk(model, x, params=["0.bias", "2.bias"]), RTOL64)
    assert set(seen) == {"0.weight", "0.bias", "2.weight", "2.bias"}


class Tied(nn.Module):
    """``decode.weight`` is the same Parameter as ``encode.weight`` (used twice in the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(3, 3, bias=False)
        self.decode = nn.Linear(3, 3)
        self.decode.weight = self.encode.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.tanh(self.encode(x)))


def tied() -> Tied:
    torch.manual_seed(0)
    return Tied().double()


@pytest.mark.parametrize("method", ["jacobian", "vp", "structured"])
def test_alias_of_a_tied_weight_selects_the_canonical_parameter(method: str) -> None:
    model = tied()
    x1, x2 = vectors(4), vectors(3, seed=2)
    by_alias = fastntk.ntk(model, x1, x2, params=["decode.weight"], method=method)
    by_name = fastntk.ntk(model, x1, x2, params=["encode.weight"], method=method)
    both = fastntk.ntk(model, x1, x2, params=["encode.weight", "decode.weight"], method=method)
    reference = fastntk.reference_ntk(model, x1, x2, params=["encode.weight"])
    assert_rel_close(by_alias, reference, RTOL64)
    assert_rel_close(by_name, reference, RTOL64)
    assert_rel_close(both, reference, RTOL64)  # counted once, not twice


def test_tied_weight_derivative_covers_both_uses() -> None:
    """The tied weight's Jacobian is the sum over the places it is used: J = J_encode + J_decode.

    Computed on an untied copy (two separate parameters with the same values), by the
    reference's per-sample Jacobians; the sum of the two untied kernels alone misses the
    cross terms, so it must differ.
    """
    from fastntk.reference import reference_jacobian

    model = tied()
    x1, x2 = vectors(4), vectors(3, seed=2)
    untied = tied()
    untied.decode.weight = nn.Parameter(model.encode.weight.detach().clone())
    j1 = reference_jacobian(untied, x1, ["encode.weight"]) + reference_jacobian(untied, x1, ["decode.weight"])
    j2 = reference_jacobian(untied, x2, ["encode.weight"]) + reference_jacobian(untied, x2, ["decode.weight"])
    expected = torch.einsum("nap,mbp->nmab", j1, j2)
    kernel = fastntk.ntk(model, x1, x2, params=["decode.weight"])
    assert_rel_close(kernel, expected, RTOL64)
    separate = fastntk.ntk(untied, x1, x2, params=["encode.weight", "decode.weight"])
    assert (kernel - separate).abs().max() > 1e-3 * kernel.abs().max()


def test_unknown_name_suggests_a_close_match() -> None:
    with pytest.raises(fastntk.SelectionError) as info:
        fastntk.ntk_fn(mlp(), params=["0.weigth"])
    message = str(info.value)
    assert "'0.weigth'" in message and "did you mean" in message and "'0.weight'" in message


def test_unknown_name_far_from_any_points_to_named_parameters() -> None:
    with pytest.raises(fastntk.SelectionError) as info:
        fastntk.ntk(mlp(), vectors(2), params=["encoder.layers.7.attention"])
    assert "named_parameters()" in str(info.value)


def test_a_buffer_name_is_not_a_parameter() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    with pytest.raises(fastntk.SelectionError, match="'1.running_mean'"):
        fastntk.ntk_fn(model, params=["1.running_mean"])


@pytest.mark.parametrize(
    "params, words",
    [
        ([], ["empty list", "None for all"]),
        (lambda name, p: False, ["predicate matched none", "named_parameters()"]),
        ("0.weight", ["list of parameter names"]),
        (3, ["list of parameter names", "predicate"]),
    ],
    ids=["empty-list", "predicate-matches-nothing", "bare-string", "int"],
)
def test_malformed_or_empty_selection_is_refused(params, words: list[str]) -> None:
    with pytest.raises(fastntk.SelectionError) as info:
        fastntk.ntk_fn(mlp(), params=params)
    for word in words:
        assert word in str(info.value)


def test_model_without_trainable_parameters_is_refused() -> None:
    model = mlp().requires_grad_(False)
    with pytest.raises(fastntk.SelectionError) as info:
        fastntk.ntk(model, vectors(3))
    message = str(info.value)
    assert "requires_grad" in message and "params=" in message


def test_model_without_any_parameter_is_refused() -> None:
    """A parameter-free model has an empty NTK: a SelectionError, not an internal KeyError."""
    with pytest.raises(fastntk.SelectionError) as info:
        fastntk.ntk(nn.Tanh(), vectors(3))
    assert "no parameters" in str(info.value)


def test_selection_is_validated_when_the_kernel_is_built() -> None:
    """ntk_fn refuses the selection at once, not at the first call."""
    with pytest.raises(fastntk.SelectionError):
        fastntk.ntk_fn(mlp(), params=["nope"])


# --------------------------------------------------------------------------- buffers


def bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    g = torch.Generator().manual_seed(5)
    model[1].running_mean.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    model[1].running_var.copy_(torch.rand(4, generator=g, dtype=torch.float64) + 0.5)
    return model


class AffineEquivalent(nn.Module):
    """BatchNorm in eval mode written out: (x - mean)/sqrt(var + eps)·γ + β with mean, var as buffers."""

    def __init__(self, bn: nn.BatchNorm1d) -> None:
        super().__init__()
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        self.register_buffer("mean", bn.running_mean.clone())
        self.register_buffer("var", bn.running_var.clone())
        self.eps = bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / torch.sqrt(self.var + self.eps) * self.weight + self.bias


def test_batchnorm_buffers_are_used_not_differentiated() -> None:
    model = bn_model()
    x1, x2 = vectors(4), vectors(3, seed=2)
    written_out = nn.Sequential(model[0], AffineEquivalent(model[1]), model[2], model[3])
    kernel = fastntk.ntk(model, x1, x2)
    assert_rel_close(kernel, fastntk.ntk(written_out, x1, x2), RTOL64)
    assert_rel_close(kernel, fastntk.reference_ntk(model, x1, x2), RTOL64)


def test_changing_a_buffer_changes_the_kernel() -> None:
    model = bn_model()
    x = vectors(4)
    before = fastntk.ntk(model, x)
    model[1].running_var.mul_(4.0)
    after = fastntk.ntk(model, x)
    assert (after - before).abs().max() > 1e-3 * before.abs().max()
    assert_rel_close(after, fastntk.reference_ntk(model, x), RTOL64)


def test_the_predicate_never_sees_buffers() -> None:
    model = bn_model()
    seen: list[str] = []
    fastntk.ntk(model, vectors(3), params=lambda name, p: seen.append(name) is None)
    names = [name for name, _ in model.named_parameters()]
    assert seen[: len(names)] == names  # (it may be asked again, e.g. once per build)
    assert set(seen) == set(names)
    assert not any("running" in name or "num_batches" in name for name in seen)


@pytest.mark.parametrize("names", [["1.weight"], ["0.weight", "1.bias"], ["3.bias", "1.weight", "0.bias"]])
def test_partial_selection_with_buffers_equals_the_reference(names: list[str]) -> None:
    model = bn_model()
    x1, x2 = vectors(4), vectors(3, seed=2)
    kernel = fastntk.ntk(model, x1, x2, params=names)
    assert_rel_close(kernel, fastntk.reference_ntk(model, x1, x2, params=names), RTOL64)


# --------------------------------------------------------------------------- output flattening


class Body(nn.Module):
    def __init__(self, outputs: int = 5) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 6)
        self.head = nn.Linear(6, outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(x)))


class Concatenated(Body):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class TupleOut(Body):
    def forward(self, x: torch.Tensor):
        y = self.features(x)
        return y[:, :2], y[:, 2:]


class DictOut(Body):
    """Insertion order "second", "first" (not sorted): the flattened order follows insertion."""

    def forward(self, x: torch.Tensor):
        y = self.features(x)
        return {"second": y[:, :3], "first": y[:, 3:]}


class NestedOut(Body):
    def forward(self, x: torch.Tensor):
        y = self.features(x)
        return [y[:, :1], {"z": y[:, 1:3].reshape(-1, 2, 1), "a": y[:, 3:]}]


class MatrixOut(Body):
    """A (N, 2, 3) output: flattened per sample in row-major order."""

    def __init__(self) -> None:
        super().__init__(outputs=6)

    def forward(self, x: torch.Tensor):
        return self.features(x).reshape(-1, 2, 3)


def build(cls, *args) -> nn.Module:
    torch.manual_seed(0)
    return cls(*args).double()


@pytest.mark.parametrize("cls", [TupleOut, DictOut, NestedOut], ids=["tuple", "dict", "nested"])
@pytest.mark.parametrize("method", ["jacobian", "vp", "structured"])
def test_structured_outputs_are_concatenated_in_order(cls, method: str) -> None:
    x1, x2 = vectors(4), vectors(3, seed=2)
    structured = fastntk.ntk(build(cls), x1, x2, method=method)
    single = fastntk.ntk(build(Concatenated), x1, x2, method=method)
    assert structured.shape == (4, 3, 5, 5)
    assert_rel_close(structured, single, RTOL64)


def test_multi_dimensional_output_is_flattened_row_major() -> None:
    x = vectors(3)
    matrix = fastntk.ntk(build(MatrixOut), x)
    flat = fastntk.ntk(build(Concatenated, 6), x)
    assert matrix.shape == (3, 3, 6, 6)
    assert_rel_close(matrix, flat, RTOL64)


class Swapped(Body):
    def forward(self, x: torch.Tensor):
        y = self.features(x)
        return {"first": y[:, 3:], "second": y[:, :3]}


def test_dict_order_matters() -> None:
    """A check with teeth: swapping the insertion order permutes the output axes."""
    x = vectors(3)
    a = fastntk.ntk(build(DictOut), x)
    b = fastntk.ntk(build(Swapped), x)
    perm = torch.tensor([3, 4, 0, 1, 2])  # b's output k is a's output perm[k]
    assert_rel_close(b, a[:, :, perm][:, :, :, perm], RTOL64)
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


class IntegerOut(Body):
    def forward(self, x: torch.Tensor):
        return self.features(x).argmax(1)


class Reduced(Body):
    def forward(self, x: torch.Tensor):
        return self.features(x).sum(0)


class NoTensor(Body):
    def forward(self, x: torch.Tensor):
        return "hello"


@pytest.mark.parametrize(
    "cls, words",
    [
        (IntegerOut, ["torch.int64", "floating point"]),
        (Reduced, ["batched on dim 0", "reduces over the batch"]),
        (NoTensor, ["str", "tuple/list/dict of tensors"]),
    ],
    ids=["integer", "batch-reduced", "not-a-tensor"],
)
def test_unusable_outputs_are_a_model_error(cls, words: list[str]) -> None:
    with pytest.raises(fastntk.ModelError) as info:
        fastntk.ntk(build(cls), vectors(3))
    for word in words:
        assert word in str(info.value)


# --------------------------------------------------------------------------- the model's dtype


class MixedDtype(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4).double()
        self.b = nn.Linear(4, 2)  # float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x.to(self.a.weight.dtype))).to(self.b.weight.dtype))


def test_mixed_dtype_model_needs_dtype() -> None:
    torch.manual_seed(0)
    model = MixedDtype()
    with pytest.raises(fastntk.ModelError) as info:
        fastntk.ntk(model, vectors(3))
    message = str(info.value)
    assert "torch.float32" in message and "torch.float64" in message and "dtype=" in message


def test_mixed_dtype_model_with_dtype_float64_equals_the_reference() -> None:
    torch.manual_seed(0)
    model = MixedDtype()
    x1, x2 = vectors(4), vectors(3, seed=2)
    kernel = fastntk.ntk(model, x1, x2, dtype=torch.float64)
    assert kernel.dtype == torch.float64
    assert_rel_close(kernel, fastntk.reference_ntk(model, x1, x2), RTOL64)
    assert model.b.weight.dtype == torch.float32 and model.a.weight.dtype == torch.float64
