"""Bad inputs x1/x2 get an InputError/ModelError/NonFiniteError naming the problem and the fix.

And what is already computed is kept: a kernel whose derivatives are not finite comes
back in the error's ``.kernel``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastntk
from conftest import RTOL64, assert_rel_close



def mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def vectors(n: int, seed: int = 1, dtype: torch.dtype = torch.float32, features: int = 3) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed)).to(dtype)


class TwoInputs(nn.Module):
    """Called as model(a=..., b=...) from a dict batch, or model(a, b) from a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.la = nn.Linear(3, 2)
        self.lb = nn.Linear(2, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.la(a)) * self.lb(b)


def two_inputs() -> TwoInputs:
    torch.manual_seed(0)
    return TwoInputs()


def pair(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(n, 3, generator=g), "b": torch.randn(n, 2, generator=g)}


# --------------------------------------------------------------------------- x1 vs x2


def test_different_per_sample_shapes_are_refused() -> None:
    x1 = torch.randn(4, 3)
    x2 = torch.randn(2, 5)
    with pytest.raises(fastntk.InputError) as info:
        fastntk.ntk(mlp(), x1, x2)
    message = str(info.value)
    assert "x1 and x2" in message and "sample shapes" in message
    assert "(3,)" in message and "(5,)" in message
    assert "only dim 0 may differ" in message


def test_floating_inputs_of_other_dtypes_are_cast_to_the_compute_dtype() -> None:
    """As gram does with arrays and files: x1 and x2 are read in the compute dtype."""
    x1, x2 = vectors(4), vectors(3, dtype=torch.float64)
    assert torch.equal(fastntk.ntk(mlp(), x1, x2), fastntk.ntk(mlp(), x1, x2.float()))


def test_structure_mismatch_tensor_vs_dict_is_refused() -> None:
    with pytest.raises(fastntk.InputError) as info:
        fastntk.ntk(mlp(), vectors(4), {"input": vectors(3)})
    message = str(info.value)
    assert "different structures" in message and "same way" in message


def test_structure_mismatch_dict_keys_is_refused() -> None:
    x2 = pair(3)
    x2 = {"b": x2["b"], "c": x2["a"]}
    with pytest.raises(fastntk.InputError, match="different structures"):
        fastntk.ntk(two_inputs(), pair(4), x2)


# --------------------------------------------------------------------------- dtype and device against the model


def test_float64_inputs_for_a_float32_model_are_read_in_float32() -> None:
    """Inputs are read in the compute dtype (numpy's float64 arrays included); dtype= chooses it."""
    kernel = fastntk.ntk(mlp(), vectors(4, dtype=torch.float64))
    assert kernel.dtype == torch.float32 and torch.equal(kernel, fastntk.ntk(mlp(), vectors(4)))


def test_dtype_float64_makes_float64_inputs_work_for_a_float32_model() -> None:
    model = mlp()
    x1, x2 = vectors(4, dtype=torch.float64), vectors(3, seed=2, dtype=torch.float64)
    kernel = fastntk.ntk(model, x1, x2, dtype=torch.float64)
    assert kernel.dtype == torch.float64
    # The model's float32 weights, cast exactly to float64: the reference does the same.
    assert_rel_close(kernel, fastntk.reference_ntk(model, x1, x2), RTOL64)
    assert next(model.parameters()).dtype == torch.float32  # the model itself is left in float32


def test_dtype_given_also_casts_float32_inputs() -> None:
    model = mlp()
    x = vectors(4)
    kernel = fastntk.ntk(model, x, dtype=torch.float64)
    assert kernel.dtype == torch.float64
    assert_rel_close(kernel, fastntk.reference_ntk(model, x), RTOL64)


@pytest.mark.parametrize("which", ["x1", "x2"])
def test_inputs_on_the_meta_device_are_refused(which: str) -> None:
    """Inputs on another device are moved block by block to the model's (tests/test_gpu.py);
    meta tensors hold no values to move."""
    meta = torch.empty(3, 3, device="meta")
    with pytest.raises(fastntk.InputError, match=f"{which} \\(leaf 0\\) is on the meta device"):
        fastntk.ntk(mlp(), meta, None) if which == "x1" else fastntk.ntk(mlp(), vectors(4), meta)


# --------------------------------------------------------------------------- malformed batches


@pytest.mark.parametrize("which", ["x1", "x2"])
def test_empty_batch_is_refused(which: str) -> None:
    empty = torch.empty(0, 3)
    args = (empty, None) if which == "x1" else (vectors(4), empty)
    with pytest.raises(fastntk.InputError) as info:
        fastntk.ntk(mlp(), *args)
    message = str(info.value)
    assert which in message and "empty" in message and "at least one sample" in message


def test_dict_with_different_batch_sizes_is_refused() -> None:
    x = {"a": torch.randn(4, 3), "b": torch.randn(5, 2)}
    with pytest.raises(fastntk.InputError) as info:
        fastntk.ntk(two_inputs(), x)
    message = str(info.value)
    assert "x1" in message and "different batch sizes" in message and "[4, 5]" in message
    assert "dim 0" in message


@pytest.mark.parametrize(
    "batch, kind",
    [
        ((torch.randn(4, 3), 2.0), "float"),
        ({"a": torch.randn(4, 3), "b": None}, "NoneType"),
        ([1.0, 2.0, 3.0], "float"),
    ],
    ids=["tuple-with-float", "dict-with-none", "python-list"],
)
def test_non_tensor_leaf_is_refused(batch, kind: str) -> None:
    with pytest.raises(fastntk.InputError) as info:
        fastntk.ntk(two_inputs(), batch)
    message = str(info.value)
    assert "x1" in message and kind in message and "tensor" in message
    assert "functools.partial" in message  # the fix for constant arguments


def test_a_non_array_leaf_is_refused_with_the_fix() -> None:
    with pytest.raises(fastntk.InputError, match="contains a float .*bind constant arguments into the model"):
        fastntk.ntk(mlp(), (vectors(4), 1.5))


def test_zero_dim_tensor_is_refused() -> None:
    with pytest.raises(fastntk.InputError) as info:
        fastntk.ntk(mlp(), torch.tensor(1.0))
    message = str(info.value)
    assert "0-d" in message and "x[None]" in message


def test_zero_dim_tensor_in_x2_is_refused() -> None:
    with pytest.raises(fastntk.InputError, match="x2 has a 0-d tensor"):
        fastntk.ntk(mlp(), vectors(4), torch.tensor(1.0))


# --------------------------------------------------------------------------- inputs that do not fit the model


def test_wrong_feature_size_is_a_model_error_naming_the_shapes() -> None:
    with pytest.raises(fastntk.ModelError) as info:
        fastntk.ntk(mlp(), vectors(4, features=5))
    message = str(info.value)
    assert "failed on the inputs" in message
    assert "shape" in message and "x1/x2" in message
    assert "5" in message  # the offending size shows up in the underlying shape report
    assert isinstance(info.value.__cause__, RuntimeError)  # the original error is chained, not lost


def test_wrong_keyword_structure_is_a_model_error() -> None:
    x = pair(4)
    with pytest.raises(fastntk.ModelError) as info:
        fastntk.ntk(two_inputs(), {"a": x["a"], "c": x["b"]})
    message = str(info.value)
    assert "'c'" in message and "structure" in message


def test_tuple_batch_is_unpacked_as_positional_arguments() -> None:
    model = two_inputs().double()
    x = {k: v.double() for k, v in pair(4).items()}
    as_tuple = fastntk.ntk(model, (x["a"], x["b"]))
    as_dict = fastntk.ntk(model, x)
    assert_rel_close(as_tuple, as_dict, RTOL64)
    assert_rel_close(as_dict, fastntk.reference_ntk(model, x), RTOL64)


# --------------------------------------------------------------------------- non-finite inputs and parameters


def test_nan_in_x1_names_x1_and_the_sample() -> None:
    x1 = vectors(5)
    x1[2, 1] = float("nan")
    with pytest.raises(fastntk.NonFiniteError) as info:
        fastntk.ntk(mlp(), x1, vectors(3, seed=2))
    message = str(info.value)
    assert "x1" in message and "sample 2" in message
    assert info.value.kernel is None  # refused before anything was computed


def test_inf_in_x2_names_x2_and_the_sample() -> None:
    x2 = vectors(3, seed=2)
    x2[1, 0] = float("inf")
    with pytest.raises(fastntk.NonFiniteError) as info:
        fastntk.ntk(mlp(), vectors(4), x2)
    message = str(info.value)
    assert "x2" in message and "sample 1" in message
    assert "x1" not in message.split("x2")[0]  # it is x2 that is blamed, not x1


def test_nan_in_a_dict_leaf_names_the_leaf_and_sample() -> None:
    x = pair(4)
    x["b"][3, 1] = float("-inf")
    with pytest.raises(fastntk.NonFiniteError) as info:
        fastntk.ntk(two_inputs(), x)
    message = str(info.value)
    assert "x1 (leaf 1)" in message and "sample 3" in message


def test_nan_in_a_parameter_names_the_parameter() -> None:
    model = mlp()
    with torch.no_grad():
        model[2].weight[1, 0] = float("nan")
    with pytest.raises(fastntk.NonFiniteError) as info:
        fastntk.ntk(model, vectors(4))
    message = str(info.value)
    assert "'2.weight'" in message and "weights" in message


def test_inf_in_a_buffer_names_the_buffer() -> None:
    """Parameters and buffers are checked before any work (one reduction when all are finite)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    model[1].running_mean[2] = float("inf")
    with pytest.raises(fastntk.NonFiniteError, match="'1.running_mean'"):
        fastntk.ntk(model, vectors(4))


@pytest.mark.parametrize("method", ["jacobian", "vp", "structured", "auto"])
def test_inf_in_a_parameter_is_refused_by_every_method_before_any_work(method: str) -> None:
    # regression: vp refused, while jacobian, structured and auto returned a finite kernel
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 1] = float("inf")
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(fastntk.NonFiniteError, match="parameter '2.weight' contains NaN or inf") as info:
        fastntk.ntk(model, vectors(4), vectors(3, seed=2), method=method)
    assert info.value.kernel is None and not calls  # refused before the model ran


def test_nan_in_a_parameter_is_not_checked_when_check_is_false() -> None:
    model = mlp()
    with torch.no_grad():
        model[2].weight[1, 0] = float("nan")
    kernel = fastntk.ntk(model, vectors(4), check=False)
    assert kernel.shape == (4, 4, 2, 2)
    assert torch.isnan(kernel).any()


class SqrtOfSquare(nn.Module):
    """|lin(x)| written as sqrt(lin(x)²): finite output, but a 0·inf = NaN derivative where lin(x) = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.lin(x) ** 2)


@pytest.mark.parametrize("method", ["jacobian", "vp", "structured"])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_nonfinite_derivative_raises_and_keeps_the_kernel(method: str, mode: str) -> None:
    torch.manual_seed(0)
    model = SqrtOfSquare().double()
    with torch.no_grad():
        model.lin.bias.zero_()
    x = vectors(3, dtype=torch.float64, features=2)
    x[1] = 0.0  # lin(x[1]) = 0: the output is finite, its derivative is not
    with pytest.raises(fastntk.NonFiniteError) as info:
        fastntk.ntk(model, x, mode=mode, method=method)
    message = str(info.value)
    assert "x1[0], x1[1]" in message  # the first pair that touches sample 1 (a Gram: both from x1)
    assert ".kernel" in message
    kernel = info.value.kernel
    assert kernel is not None
    reference = fastntk.reference_ntk(model, x, mode=mode)
    assert kernel.shape == reference.shape
    # Nothing computed is lost: the entries between well-behaved samples are there and right.
    good = [0, 2]
    assert_rel_close(kernel[good][:, good], reference[good][:, good], RTOL64)
    assert not torch.isfinite(kernel[1, 1]).all()


def test_nonfinite_derivative_kernel_is_returned_with_check_false() -> None:
    torch.manual_seed(0)
    model = SqrtOfSquare().double()
    with torch.no_grad():
        model.lin.bias.zero_()
    x = vectors(3, dtype=torch.float64, features=2)
    x[1] = 0.0
    kernel = fastntk.ntk(model, x, check=False)
    assert kernel.shape == (3, 3, 2, 2) and not torch.isfinite(kernel).all()


# --------------------------------------------------------------------------- integer inputs


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(ids)).mean(1))


def tokens(n: int, length: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"ids": torch.randint(0, 10, (n, length), generator=torch.Generator().manual_seed(seed))}


@pytest.mark.parametrize("method", ["jacobian", "vp", "structured"])
def test_integer_token_ids_in_a_dict_work(method: str) -> None:
    torch.manual_seed(0)
    model = TokenModel().double()
    x1, x2 = tokens(4, seed=1), tokens(3, seed=2)
    kernel = fastntk.ntk(model, x1, x2, method=method)
    assert kernel.dtype == torch.float64
    assert_rel_close(kernel, fastntk.reference_ntk(model, x1, x2), RTOL64)


def test_integer_token_ids_stay_integers_when_dtype_is_given() -> None:
    torch.manual_seed(0)
    model = TokenModel()  # float32 weights
    x = tokens(4)
    kernel = fastntk.ntk(model, x, dtype=torch.float64)
    assert kernel.dtype == torch.float64
    assert_rel_close(kernel, fastntk.reference_ntk(model, x), RTOL64)
    assert x["ids"].dtype == torch.int64  # the caller's inputs are not cast in place


def test_token_ids_with_different_lengths_are_refused() -> None:
    torch.manual_seed(0)
    with pytest.raises(fastntk.InputError, match="sample shapes"):
        fastntk.ntk(TokenModel(), tokens(4, length=5), tokens(3, length=6))


def test_a_model_on_the_meta_device_is_refused_at_once() -> None:
    """Inputs on meta for a model elsewhere get the device mismatch (tests above)."""
    # regression: a raw "Tensor.item() cannot be called on meta tensors" after seconds
    model = nn.Linear(3, 2, device="meta")
    with pytest.raises(fastntk.ModelError, match="meta device.*to_empty"):
        fastntk.ntk(model, torch.randn(2, 3, device="meta"))
