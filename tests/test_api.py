"""Options of ntk/ntk_fn: validation, reuse, result dtype, modes, blocking and the memory budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastntk
from conftest import assert_rel_close

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}  # relative to max|K|: rounding of exact algebra
MODES = ["full", "trace", "diagonal", "trace_mean"]
METHODS = ["jacobian", "vp", "structured"]




def mlp(dtype: torch.dtype = torch.float64, outputs: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, outputs)).to(dtype)


def vectors(n: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --------------------------------------------------------------------------- option validation


@pytest.mark.parametrize("mode", ["Full", "sum", "", None, "trace-mean"])
def test_unknown_mode_lists_the_valid_ones(mode) -> None:
    with pytest.raises(fastntk.OptionError) as info:
        fastntk.ntk_fn(mlp(), mode=mode)
    message = str(info.value)
    assert f"unknown mode {mode!r}" in message
    for valid in MODES:
        assert repr(valid) in message


@pytest.mark.parametrize("mode", [["full"], {"mode": "full"}], ids=["list", "dict"])
def test_unhashable_mode_is_an_option_error(mode) -> None:
    """A mode of the wrong type is bad input like any other: an OptionError, not a TypeError."""
    with pytest.raises(fastntk.OptionError, match="unknown mode"):
        fastntk.ntk_fn(mlp(), mode=mode)


@pytest.mark.parametrize("method", ["Jacobian", "exact", "", None, ["vp"]])
def test_unknown_method_lists_the_valid_ones(method) -> None:
    with pytest.raises(fastntk.OptionError) as info:
        fastntk.ntk_fn(mlp(), method=method)
    message = str(info.value)
    assert "unknown method" in message
    for valid in ("auto", *METHODS):
        assert repr(valid) in message


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, "3", 1.0])
def test_bad_chunk_size_is_refused(chunk_size) -> None:
    with pytest.raises(fastntk.OptionError) as info:
        fastntk.ntk(mlp(), vectors(4), block_size=chunk_size)
    message = str(info.value)
    assert f"block_size={chunk_size!r}" in message and "positive" in message


@pytest.mark.parametrize("budget", ["lots", -1, 0, 1.5], ids=["word", "negative", "zero", "float"])
def test_bad_max_memory_is_refused(budget) -> None:
    with pytest.raises(fastntk.OptionError, match="max_memory"):
        fastntk.ntk(mlp(), vectors(4), max_memory=budget)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_floating_dtype_is_refused(dtype) -> None:
    with pytest.raises(fastntk.FastNTKError) as info:
        fastntk.ntk(mlp(), vectors(4), dtype=dtype)
    message = str(info.value)
    assert str(dtype) in message and "torch.float64" in message


@pytest.mark.parametrize("dtype", ["float64", float], ids=["string", "python-type"])
def test_dtype_that_is_not_a_torch_dtype_is_refused(dtype) -> None:
    with pytest.raises(fastntk.FastNTKError, match="dtype"):
        fastntk.ntk(mlp(), vectors(4), dtype=dtype)


def test_model_that_is_not_a_module_is_refused() -> None:
    with pytest.raises(fastntk.InputError, match="torch.nn.Module"):
        fastntk.ntk(lambda x: x, vectors(4))


# --------------------------------------------------------------------------- ntk_fn reuse


@pytest.mark.parametrize("method", METHODS)
def test_reused_kernel_is_deterministic(method: str) -> None:
    fn = fastntk.ntk_fn(mlp(), method=method)
    x1, x2 = vectors(4), vectors(3, seed=2)
    first, second = fn(x1, x2), fn(x1, x2)
    assert torch.equal(first, second)
    assert torch.equal(fn(x1), fn(x1))


@pytest.mark.parametrize("method", METHODS)
def test_reused_kernel_tracks_in_place_weight_updates(method: str) -> None:
    model = mlp()
    fn = fastntk.ntk_fn(model, method=method)
    x1, x2 = vectors(4), vectors(3, seed=2)
    before = fn(x1, x2)
    assert_rel_close(before, fastntk.reference_ntk(model, x1, x2), RTOL[torch.float64])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    after = fn(x1, x2)
    expected = fastntk.reference_ntk(model, x1, x2)
    assert_rel_close(after, expected, RTOL[torch.float64])
    assert (after - before).abs().max() > 1e-3 * expected.abs().max()


def test_reused_kernel_tracks_a_replaced_parameter_and_train_mode_changes() -> None:
    """Refusals are re-checked per call: the model switched to train mode with dropout is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double().eval()
    fn = fastntk.ntk_fn(model)
    x = vectors(3)
    fn(x)
    model.train()
    with pytest.raises(fastntk.ModelError, match="model.eval()"):
        fn(x)
    model.eval()
    assert_rel_close(fn(x), fastntk.reference_ntk(model, x), RTOL[torch.float64])


def test_reused_kernel_takes_inputs_of_another_kind() -> None:
    """A second kind of input (another sample shape) gets its own probe and works."""

    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(torch.tanh(x).mean(1))

    torch.manual_seed(0)
    model = Pool().double()
    fn = fastntk.ntk_fn(model)
    g = torch.Generator().manual_seed(1)
    short, long = torch.randn(3, 2, 3, generator=g, dtype=torch.float64), torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    assert_rel_close(fn(short), fastntk.reference_ntk(model, short), RTOL[torch.float64])
    assert_rel_close(fn(long), fastntk.reference_ntk(model, long), RTOL[torch.float64])


# --------------------------------------------------------------------------- result dtype and device


@pytest.mark.parametrize("mode", MODES)
def test_result_dtype_and_device_follow_the_model(mode: str) -> None:
    model = mlp(torch.float32)
    x1, x2 = vectors(4, dtype=torch.float32), vectors(3, seed=2, dtype=torch.float32)
    kernel = fastntk.ntk(model, x1, x2, mode=mode)
    assert kernel.dtype == torch.float32 and kernel.device == torch.device("cpu")
    shapes = {"full": (4, 3, 3, 3), "diagonal": (4, 3, 3), "trace": (4, 3), "trace_mean": (4, 3)}
    assert kernel.shape == shapes[mode]
    assert_rel_close(kernel, fastntk.reference_ntk(model, x1, x2, mode=mode), RTOL[torch.float32])

    wide = fastntk.ntk(model, x1.double(), x2.double(), mode=mode, dtype=torch.float64)
    assert wide.dtype == torch.float64 and wide.device == torch.device("cpu")
    assert_rel_close(wide, fastntk.reference_ntk(model, x1, x2, mode=mode), RTOL[torch.float64])


def test_dtype_float32_for_a_float64_model() -> None:
    model = mlp(torch.float64)
    x = vectors(4, dtype=torch.float32)
    kernel = fastntk.ntk(model, x, dtype=torch.float32)
    assert kernel.dtype == torch.float32
    assert_rel_close(kernel, fastntk.reference_ntk(model.float(), x), RTOL[torch.float32])


# --------------------------------------------------------------------------- modes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_trace_mean_is_trace_over_the_number_of_outputs(dtype, method: str) -> None:
    outputs = 3
    model = mlp(dtype, outputs=outputs)
    x1, x2 = vectors(4, dtype=dtype), vectors(3, seed=2, dtype=dtype)
    trace = fastntk.ntk(model, x1, x2, mode="trace", method=method)
    mean = fastntk.ntk(model, x1, x2, mode="trace_mean", method=method)
    assert mean.dtype == dtype
    assert_rel_close(mean, trace / outputs, RTOL[dtype])
    assert_rel_close(mean, fastntk.reference_ntk(model, x1, x2, mode="trace_mean"), RTOL[dtype])


@pytest.mark.parametrize("method", METHODS)
def test_modes_are_reductions_of_full(method: str) -> None:
    model = mlp()
    x1, x2 = vectors(4), vectors(3, seed=2)
    full = fastntk.ntk(model, x1, x2, method=method)
    diagonal = torch.diagonal(full, dim1=2, dim2=3)
    assert_rel_close(fastntk.ntk(model, x1, x2, mode="diagonal", method=method), diagonal, RTOL[torch.float64])
    assert_rel_close(fastntk.ntk(model, x1, x2, mode="trace", method=method), diagonal.sum(-1), RTOL[torch.float64])


# --------------------------------------------------------------------------- blocking


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("gram", [True, False], ids=["x2-none", "x2-given"])
def test_chunk_sizes_with_ragged_blocks_equal_the_unchunked_kernel(mode: str, method: str, gram: bool) -> None:
    model = mlp()
    x1 = vectors(5)
    x2 = None if gram else vectors(4, seed=2)
    whole = fastntk.ntk(model, x1, x2, mode=mode, method=method)
    assert_rel_close(whole, fastntk.reference_ntk(model, x1, x2, mode=mode), RTOL[torch.float64])
    for chunk_size in (1, 2, 3, 5, 7):  # 2 and 3 leave a ragged last block of 5 and of 4
        blocked = fastntk.ntk(model, x1, x2, mode=mode, method=method, block_size=chunk_size)
        assert_rel_close(blocked, whole, RTOL[torch.float64])


@pytest.mark.parametrize("method", [*METHODS, "auto"])
@pytest.mark.parametrize("gram", [True, False], ids=["x2-none", "x2-given"])
def test_tiny_memory_budget_equals_the_default(method: str, gram: bool) -> None:
    """The smallest budget (blocks of one sample, and the result): one-sample blocks and no cached
    factors, same kernel; one byte less is refused."""
    model = mlp()
    x1 = vectors(5)
    x2 = None if gram else vectors(4, seed=2)
    default = fastntk.ntk(model, x1, x2, method=method)
    plan = fastntk.plan(model, x1, x2)
    smallest = plan.min_memory[plan.chosen if method == "auto" else method]
    tiny = fastntk.ntk(model, x1, x2, method=method, max_memory=smallest)
    with pytest.raises(fastntk.OptionError, match=f"max_memory={smallest} or more|the kernel alone"):
        fastntk.ntk(model, x1, x2, method=method, max_memory=smallest - 1)
    assert_rel_close(tiny, default, RTOL[torch.float64])
    assert_rel_close(default, fastntk.reference_ntk(model, x1, x2), RTOL[torch.float64])


def test_progress_bar_does_not_change_the_result(capsys) -> None:
    model = mlp()
    x = vectors(5)
    plain = fastntk.ntk(model, x)
    shown = fastntk.ntk(model, x, block_size=1, progress=True)
    assert_rel_close(shown, plain, RTOL[torch.float64])
    assert capsys.readouterr().out == ""  # never on stdout


def test_check_false_gives_the_same_result() -> None:
    model = mlp()
    x1, x2 = vectors(4), vectors(3, seed=2)
    assert torch.equal(fastntk.ntk(model, x1, x2, check=False), fastntk.ntk(model, x1, x2))


def test_inside_inference_mode_every_entry_point_refuses_with_the_fix() -> None:
    """torch.inference_mode() forbids differentiation: a clear OptionError from every entry point
    (before, a ModelError blamed the inputs), while torch.no_grad() around a call is fine."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    calls = {
        "ntk": lambda: fastntk.ntk(net, x),
        "plan": lambda: fastntk.plan(net, x),
        "gram": lambda: fastntk.gram(net, x),
        "self_ntk": lambda: fastntk.self_ntk(net, x),
        "NTKOperator": lambda: fastntk.NTKOperator(net, x),
        "layer_ntk": lambda: fastntk.layer_ntk(net, x),
        "nngp": lambda: fastntk.nngp(net, x),
    }
    for name, call in calls.items():
        with torch.inference_mode(), pytest.raises(fastntk.OptionError, match=r"inside torch.inference_mode\(\).*torch.no_grad\(\)"):
            call()
        assert not torch.is_inference_mode_enabled(), name
    with torch.no_grad():
        under_no_grad = fastntk.ntk(net, x)
    assert torch.equal(under_no_grad, fastntk.ntk(net, x))
