"""One vocabulary: ntk, ntk_fn, plan and gram take the same options, values and inputs."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch import nn

import fastntk
from conftest import assert_kernel_close

SHARED = ("mode", "method", "params", "dtype", "block_size", "max_memory", "check", "progress")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def samples(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("entry", [fastntk.ntk, fastntk.ntk_fn, fastntk.gram, fastntk.plan])
def test_every_entry_point_takes_the_same_options_with_the_same_defaults(entry) -> None:
    parameters = inspect.signature(entry).parameters
    reference = inspect.signature(fastntk.ntk).parameters
    for name in SHARED:
        if entry is fastntk.plan and name in ("check", "progress"):
            continue
        assert name in parameters, f"{entry.__name__} lacks {name}"
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[name].default == reference[name].default, name
    assert reference["mode"].default == "full" and reference["max_memory"].default == "4GB"
    assert reference["progress"].default is False


def test_the_kernel_function_exposes_only_calls_and_plans() -> None:
    fn = fastntk.ntk_fn(mlp())
    assert isinstance(fn, fastntk.NTKFunction)
    public = {name for name in dir(fn) if not name.startswith("_")}
    assert public == {"plan"}


@pytest.mark.parametrize("memory", [10**7, "10MB", "9.5MiB", np.int64(10**7)])
def test_a_memory_size_is_bytes_or_a_size_everywhere(memory) -> None:
    net, x = mlp(), samples(6, 1)
    expected = fastntk.reference_ntk(net, x, mode="trace")
    assert_kernel_close(fastntk.ntk(net, x, mode="trace", max_memory=memory), expected, torch.float32)
    assert_kernel_close(fastntk.gram(net, x, mode="trace", max_memory=memory), expected, torch.float32)
    assert fastntk.plan(net, x, mode="trace", max_memory=memory).block_size == 6


def test_gram_in_memory_is_the_kernel_of_ntk() -> None:
    net, x1, x2 = mlp(), samples(9, 1), samples(5, 2)
    for x in (None, x2):
        for mode in ("full", "trace", "diagonal", "trace_mean"):
            assert torch.equal(fastntk.gram(net, x1, x, mode=mode, block_size=4), fastntk.ntk(net, x1, x, mode=mode, block_size=4))


@pytest.mark.parametrize("kind", ["numpy", "tuple of numpy", "npy path", "dataset", "dataloader"])
def test_ntk_takes_what_gram_takes(kind: str, tmp_path) -> None:
    net, x1, x2 = mlp(), samples(7, 1), samples(4, 2)
    expected = fastntk.reference_ntk(net, x1, x2, mode="trace")

    def given(x: torch.Tensor, name: str):
        array = x.numpy().astype(np.float64)  # numpy's default dtype: cast to the model's
        if kind == "numpy":
            return array
        if kind == "tuple of numpy":
            return (array,)
        if kind == "npy path":
            np.save(tmp_path / f"{name}.npy", array)
            return str(tmp_path / f"{name}.npy")
        dataset = torch.utils.data.TensorDataset(x)  # items (x_i,): model(*batch)
        return dataset if kind == "dataset" else torch.utils.data.DataLoader(dataset, batch_size=3)

    assert_kernel_close(fastntk.ntk(net, given(x1, "a"), given(x2, "b"), mode="trace"), expected, torch.float32)
    assert_kernel_close(fastntk.gram(net, given(x1, "c"), given(x2, "d"), mode="trace"), expected, torch.float32)
    assert fastntk.plan(net, x1.numpy(), x2.numpy(), mode="trace").n1 == 7


def test_floating_inputs_are_cast_to_the_compute_dtype() -> None:
    net, x = mlp(), samples(5, 1)
    assert torch.equal(fastntk.ntk(net, x.double()), fastntk.ntk(net, x))
    assert fastntk.ntk(net, x, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize(("old", "new", "value"), [("chunk_size", "block_size", 2), ("memory_budget", "max_memory", 10**7)])
@pytest.mark.parametrize("entry", ["ntk", "ntk_fn", "plan"])
def test_the_names_of_0_1_still_work_with_a_warning(old: str, new: str, value: int, entry: str) -> None:
    net, x = mlp(), samples(5, 1)
    with pytest.warns(DeprecationWarning, match=f"{old}= is deprecated, use {new}="):
        if entry == "ntk":
            result = fastntk.ntk(net, x, **{old: value})
        elif entry == "ntk_fn":
            result = fastntk.ntk_fn(net, **{old: value})(x)
        else:
            result = fastntk.plan(net, x, **{old: value})
    if entry != "plan":
        assert torch.equal(result, fastntk.ntk(net, x, **{new: value}))


def test_an_unknown_option_is_named() -> None:
    with pytest.raises(fastntk.OptionError, match="unknown option 'chunk'.*block_size"):
        fastntk.ntk(mlp(), samples(3, 1), chunk=2)
