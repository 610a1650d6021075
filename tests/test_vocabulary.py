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


def test_an_old_name_with_its_new_one_is_refused() -> None:
    with pytest.raises(fastntk.OptionError, match="chunk_size= and block_size= are the same option"):
        fastntk.ntk_fn(mlp(), block_size=2, chunk_size=7)


def test_deprecation_warnings_point_at_the_caller() -> None:
    net, x = mlp(), samples(4, 1)
    for call in (
        lambda: fastntk.ntk_fn(net, chunk_size=2),
        lambda: fastntk.ntk(net, x, chunk_size=2),
        lambda: fastntk.plan(net, x, chunk_size=2),
        lambda: fastntk.gram(net, data1=x),
        lambda: fastntk.NTKFunction(net, mode="trace"),
    ):
        with pytest.warns(DeprecationWarning) as record:
            call()
        assert all(r.filename == __file__ for r in record if "fastntk" in str(r.message))


def test_gram_takes_the_names_of_0_1() -> None:
    net, x = mlp(), samples(6, 1)
    with pytest.warns(DeprecationWarning):
        old = fastntk.gram(net, data1=x, mode="trace", memory_budget=10**7)
    assert torch.equal(old, fastntk.gram(net, x, mode="trace", max_memory=10**7))


def test_out_on_ntk_points_to_gram() -> None:
    with pytest.raises(fastntk.OptionError, match=r"unknown option 'out'.*fastntk.gram\(\.\.\., out=\.\.\.\)"):
        fastntk.ntk(mlp(), samples(3, 1), out="k.npy")


def test_blocks_of_one_row_are_sized_by_what_they_hold() -> None:
    """K(x1, x2) with N1 = 1: a block of b samples holds 1 x b pairs, not b x b."""
    torch.manual_seed(0)
    net = nn.Linear(3, 10)
    x1, x2 = samples(1, 1), samples(3000, 2)
    kernel = fastntk.ntk(net, x1, x2, mode="full", block_size=3000, max_memory="100MB")
    assert_kernel_close(kernel, fastntk.reference_ntk(net, x1, x2, mode="full"), torch.float32)
    assert fastntk.plan(net, x1, x2, mode="full", max_memory="100MB").block_size == 3000


def test_a_block_size_beyond_the_budget_is_refused_before_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastntk.methods.structured.method import StructuredMethod

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("calibrated although the block cannot fit")

    monkeypatch.setattr(StructuredMethod, "calibrated", refuse)
    net = nn.Sequential(nn.Linear(3, 300), nn.Tanh(), nn.Linear(300, 10))
    with pytest.raises(fastntk.OptionError, match="blocks of 4000 samples need"):
        fastntk.ntk(net, samples(4000, 1), mode="trace", method="structured", block_size=4000, max_memory="100MB")


def test_plan_of_a_named_method_gives_its_block_size() -> None:
    net, x = nn.Sequential(nn.Linear(30, 200), nn.Tanh(), nn.Linear(200, 10)), torch.randn(3000, 30)
    named = fastntk.plan(net, x, mode="trace", method="jacobian", max_memory="300MB")
    assert named.chosen == "jacobian" and named.block_size < fastntk.plan(net, x, mode="trace", max_memory="300MB").block_size


def test_plan_of_a_kernel_larger_than_memory_plans_it_on_disk() -> None:
    plan = fastntk.plan(mlp(), samples(30000, 1), mode="full", max_memory="1GB")
    assert plan.block_size is not None and plan.block_size < 30000


def test_train_and_eval_are_different_kinds_of_call() -> None:
    """A forward may branch on self.training: what an NTKFunction learned in one mode is not reused in the other."""

    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) if self.training else self.b(x) * self.b(x)

    torch.manual_seed(0)
    model = Branch()
    fn = fastntk.ntk_fn(model, mode="trace", method="structured")
    x = samples(5, 1)
    for training in (True, False, True):
        model.train(training)
        assert_kernel_close(fn(x), fastntk.reference_ntk(model, x, mode="trace"), torch.float32)
