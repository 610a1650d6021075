"""fastntk.nngp (outputs' and layers' inner products) and fastntk.monte_carlo (seeded averages)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fastntk
from conftest import CASES_BY_NAME, DTYPES, assert_kernel_close
from fastntk._api import PROBE
from fastntk._functional import FunctionalModel, flatten_output
from fastntk._inputs import call_model, map_leaves
from fastntk._functional import activation_bytes
from fastntk.reduction import reduce_full

CASES = ["mlp", "tutorial_cnn", "token_dict", "tuple_output", "transformer", "batchnorm_eval"]
LAYERS = {"mlp": "3", "tutorial_cnn": "3", "token_dict": "mix", "tuple_output": "trunk", "transformer": "encoder", "batchnorm_eval": "1"}
MODES = ["full", "trace", "diagonal", "trace_mean"]


def setup(case: str, dtype: torch.dtype, gram: bool) -> tuple[nn.Module, object, object]:
    c = CASES_BY_NAME[case]
    return c.build(dtype), c.draw(4, dtype, seed=1), None if gram else c.draw(3, dtype, seed=2)


def float64_features(model: nn.Module, x: object, layer: str | None) -> torch.Tensor:
    """φ(x) (N, d) of a float64 copy of the model: its flattened outputs, or the layer's output
    read by a hook of the test's own."""
    model = copy.deepcopy(model).double()
    x = map_leaves(lambda t: t.double() if t.is_floating_point() else t, x)
    n = next(t for t in torch.utils._pytree.tree_leaves(x)).shape[0]
    seen: list[torch.Tensor] = []
    if layer is not None:
        model.get_submodule(layer).register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        out = call_model(model, x)
    return flatten_output(out, n) if layer is None else seen[0].reshape(n, -1)


def direct_nngp(model: nn.Module, x1: object, x2: object, mode: str, layer: str | None = None) -> torch.Tensor:
    """The kernel straight from its definition, in float64: every pair, every feature pair."""
    a = float64_features(model, x1, layer)
    b = a if x2 is None else float64_features(model, x2, layer)
    full = torch.einsum("na,mb->nmab", a, b)  # (N1, N2, d, d)
    return reduce_full(full, mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gram", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_output_nngp_is_the_outputs_inner_products(case: str, mode: str, gram: bool, dtype: torch.dtype) -> None:
    model, x1, x2 = setup(case, dtype, gram)
    kernel = fastntk.nngp(model, x1, x2, mode=mode)
    assert kernel.dtype == dtype and not kernel.requires_grad
    assert_kernel_close(kernel, direct_nngp(model, x1, x2, mode), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [None, "full", "trace"])
@pytest.mark.parametrize("case", CASES)
def test_layer_nngp_is_the_features_inner_products_over_d(case: str, mode: str | None, dtype: torch.dtype) -> None:
    """mode=None with a layer is "trace_mean": φ(x)·φ(x')/d, neural-tangents' empirical_nngp_fn convention."""
    model, x1, x2 = setup(case, dtype, gram=False)
    layer = LAYERS[case]
    kernel = fastntk.nngp(model, x1, x2, layer=layer, mode=mode)
    assert_kernel_close(kernel, direct_nngp(model, x1, x2, mode or "trace_mean", layer), dtype)
    by_module = fastntk.nngp(model, x1, x2, layer=model.get_submodule(layer), mode=mode)
    torch.testing.assert_close(by_module, kernel, rtol=0, atol=0)
    assert all(not m._forward_hooks for m in model.modules())  # the hook is gone


def test_trace_mean_is_the_trace_over_outputs() -> None:
    model, x1, x2 = setup("mlp", torch.float64, gram=False)
    o = 3
    torch.testing.assert_close(fastntk.nngp(model, x1, x2, mode="trace_mean"), fastntk.nngp(model, x1, x2, mode="trace") / o)


@pytest.mark.parametrize("gram", [True, False])
@pytest.mark.parametrize("mode", ["full", "trace"])
def test_blocks_within_max_memory_give_the_same_kernel(mode: str, gram: bool) -> None:
    """From the smallest max_memory that holds one sample per side (one by one, features
    recomputed per block) through x2's features held whole, to everything in one block."""
    model, _, _ = setup("tutorial_cnn", torch.float64, gram)
    c = CASES_BY_NAME["tutorial_cnn"]
    x1, x2 = c.draw(7, torch.float64, seed=1), None if gram else c.draw(5, torch.float64, seed=2)
    expected = direct_nngp(model, x1, x2, mode)
    n2 = 7 if gram else 5
    pair = 8 * (9 if mode == "full" else 1)
    result = 7 * n2 * pair
    f = FunctionalModel.build(model, lambda name, p: True)
    activations = activation_bytes(f, x1[:PROBE])  # what one sample's forward pass holds, measured as nngp does
    per_sample = 8 * 3 + 4 * 8 * 3 * 8 * 8 + activations  # features + INPUT_COPIES inputs + activations
    held = result + n2 * 24 + per_sample + n2 * pair  # x2's features whole, then one row at a time
    streamed = result + 2 * per_sample + pair  # one sample a side, features recomputed per block
    least = min(held, streamed)
    for budget in (streamed, streamed + per_sample, held, held + 2 * per_sample, result + 3 * n2 * (per_sample + n2 * pair), "4GB"):
        assert_kernel_close(fastntk.nngp(model, x1, x2, mode=mode, max_memory=budget), expected, torch.float64)
    with pytest.raises(fastntk.OptionError, match="max_memory=.* is too small"):
        fastntk.nngp(model, x1, x2, mode=mode, max_memory=least - 1)


def test_inputs_are_taken_in_any_form_and_cast_to_dtype(tmp_path) -> None:
    import numpy as np

    model, x1, _ = setup("mlp", torch.float32, gram=True)
    path = tmp_path / "x.npy"
    np.save(path, x1.double().numpy())
    kernel = fastntk.nngp(model, str(path), mode="trace", dtype=torch.float64)
    assert kernel.dtype == torch.float64
    assert_kernel_close(kernel, direct_nngp(model, x1, None, "trace"), torch.float32)  # float32 weights, float64 arithmetic


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = nn.Linear(3, 4), nn.Linear(3, 4)
        self.shared = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.shared(self.used(x)))


def test_bad_layers_are_refused_with_what_to_pass_and_hooks_removed() -> None:
    model, x = Unused().double(), torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(fastntk.OptionError, match="no submodule named 'usd'; did you mean 'used'"):
        fastntk.nngp(model, x, layer="usd")
    with pytest.raises(fastntk.OptionError, match="not a submodule"):
        fastntk.nngp(model, x, layer=nn.Linear(3, 4))
    with pytest.raises(fastntk.ModelError, match="'spare' ran 0 times"):
        fastntk.nngp(model, x, layer="spare")
    with pytest.raises(fastntk.ModelError, match="'shared' ran 2 times"):
        fastntk.nngp(model, x, layer="shared")
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(fastntk.OptionError, match="unknown mode"):
        fastntk.nngp(model, x, mode="trace_sum")


def test_overflowing_features_are_refused_with_the_kernel_kept() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1e30)
    with pytest.raises(fastntk.NonFiniteError, match="NNGP kernel contains NaN or inf") as info:
        fastntk.nngp(model, torch.ones(2, 2))
    assert info.value.kernel is not None and info.value.kernel.shape == (2, 2, 1, 1)
    assert fastntk.nngp(model, torch.ones(2, 2), check=False).isinf().all()


def test_the_model_is_left_as_it_was() -> None:
    model, x1, x2 = setup("batchnorm_eval", torch.float32, gram=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fastntk.nngp(model, x1, x2, layer="1")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not model.training


# --- Monte Carlo ---------------------------------------------------------------------------


def mlp_factory() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()


@pytest.mark.parametrize("kernel,options", [(fastntk.nngp, {"mode": "full"}), (fastntk.ntk, {"mode": "trace", "method": "vp"})])
def test_monte_carlo_is_the_average_of_individually_seeded_kernels(kernel, options) -> None:
    x1 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x2 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    draws = []
    for i in range(5):
        torch.manual_seed(10 + i)
        draws.append(kernel(mlp_factory(), x1, x2, **options))
    stacked = torch.stack(draws).double()
    mc = fastntk.monte_carlo(kernel, mlp_factory, x1, x2, samples=5, seed=10, **options)
    assert mc.samples == 5 and mc.mean.dtype == torch.float64
    torch.testing.assert_close(mc.mean, stacked.mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mc.standard_error, stacked.std(0) / math.sqrt(5), rtol=1e-10, atol=1e-14)


def test_monte_carlo_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected = torch.randn(3)
    torch.set_rng_state(state)
    fastntk.monte_carlo(fastntk.nngp, mlp_factory, torch.ones(2, 3, dtype=torch.float64), samples=2, mode="trace")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.randn(3), expected)


def test_monte_carlo_of_one_sample_has_no_standard_error_and_bad_calls_are_refused() -> None:
    x = torch.ones(2, 3, dtype=torch.float64)
    mc = fastntk.monte_carlo(fastntk.nngp, mlp_factory, x, samples=1, mode="trace")
    assert mc.standard_error.isnan().all()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(fastntk.OptionError, match="samples="):
            fastntk.monte_carlo(fastntk.nngp, mlp_factory, x, samples=bad)
    with pytest.raises(fastntk.OptionError, match="seed="):
        fastntk.monte_carlo(fastntk.nngp, mlp_factory, x, seed=-1)
    with pytest.raises(fastntk.InputError, match="must build and return a torch.nn.Module"):
        fastntk.monte_carlo(fastntk.nngp, lambda: "net", x)
    widths = iter([4, 5])
    with pytest.raises(fastntk.InputError, match="draw 1 gave a kernel of shape"):
        fastntk.monte_carlo(fastntk.nngp, lambda: nn.Linear(3, next(widths)).double(), x, samples=2)


def arc_cosine(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """E_w[relu(w·x) relu(w·x')] for w ~ N(0, I/d) (Cho & Saul 2009, degree 1):
    ‖x‖‖x'‖/(2πd) · (sin θ + (π − θ) cos θ), θ the angle between x and x'."""
    d = x1.shape[1]
    norms = x1.norm(dim=1)[:, None] * x2.norm(dim=1)[None, :]
    cos = (x1 @ x2.T / norms).clamp(-1, 1)
    theta = torch.arccos(cos)
    return norms / (2 * math.pi * d) * (torch.sin(theta) + (math.pi - theta) * cos)


def test_monte_carlo_nngp_of_a_wide_relu_layer_is_the_arc_cosine_kernel() -> None:
    """The layer NNGP φφᵀ/m of m ReLU units with N(0, 1/d) weights is an unbiased estimate of the
    arc-cosine kernel (at any width); averaged over S draws its error is within a few standard
    errors. The bound: 5 standard errors plus the estimate's own uncertainty (the SE of an SE
    is about SE/sqrt(2(S−1)): 5·(1 + 1/sqrt(2·15)) < 6); a fresh seed breaks 6σ with probability
    ~1e-9 per entry. The standard error itself must be small (under 3% of the kernel), so a
    wrong kernel (e.g. missing the 1/m, or uniform weights) cannot pass."""
    d, width = 5, 2048

    def factory() -> nn.Module:
        layer = nn.Linear(d, width, bias=False).double()
        nn.init.normal_(layer.weight, std=1 / math.sqrt(d))
        return nn.Sequential(layer, nn.ReLU())

    x = torch.randn(4, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mc = fastntk.monte_carlo(fastntk.nngp, factory, x, samples=16, seed=0, layer="1")
    exact = arc_cosine(x, x)
    assert (mc.standard_error <= 0.03 * exact.abs().max()).all()
    assert ((mc.mean - exact).abs() <= 6 * mc.standard_error).all(), ((mc.mean - exact) / mc.standard_error)


def test_the_guide_examples_run() -> None:
    """The examples of docs/guide/nngp.md, as written, and what they claim."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "nngp.md").read_text()
    namespace: dict = {}
    with torch.random.fork_rng():
        for code in re.findall(r"```python\n(.*?)```", page, re.S):  # the examples build on each other
            exec(compile(code, "nngp.md", "exec"), namespace)  # noqa: S102
    assert namespace["k_out"].shape == (10, 10, 3, 3) and namespace["k_mean"].shape == (5, 10)
    assert namespace["k_relu"].shape == (10, 10) and namespace["posterior"].mean.shape == (5, 3)
    assert namespace["z"].abs().max() < 6 and namespace["ntk_mean"].shape == (10, 10)



def test_max_memory_bounds_the_forward_passes_activations() -> None:
    """The forward pass of a block holds its layers' outputs, not only the inputs and features:
    a conv layer's output is 16·12·12 floats per sample, far more than the 2 features. Every
    forward pass over b samples must fit them in max_memory: b·16·12·12·8 bytes at least."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2)).double()
    x = torch.randn(40, 1, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    budget = 10 * 16 * 12 * 12 * 8  # room for the activations of at most 10 samples
    sizes: list[int] = []
    handle = net.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    kernel = fastntk.nngp(net, x, mode="trace", max_memory=budget)
    handle.remove()
    assert_kernel_close(kernel, direct_nngp(net, x, None, "trace"), torch.float64)
    assert sizes and max(sizes) * 16 * 12 * 12 * 8 <= budget, sizes


def test_monte_carlo_seeds_a_kernel_that_draws_random_numbers_and_restores_the_callers_state() -> None:
    """A kernel callable may draw from torch's generator (a random-feature or stochastic estimate):
    the draws are then seeded by ``seed`` like the models, whatever the caller's state, which is
    left as it was."""
    def noisy(model: nn.Module, x1, x2, **options) -> torch.Tensor:
        return fastntk.nngp(model, x1, x2, **options) + torch.randn(())

    x = torch.ones(2, 3, dtype=torch.float64)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = fastntk.monte_carlo(noisy, mlp_factory, x, samples=2, seed=5, mode="trace").mean
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    torch.testing.assert_close(fastntk.monte_carlo(noisy, mlp_factory, x, samples=2, seed=5, mode="trace").mean, first, rtol=0, atol=0)
