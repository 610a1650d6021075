"""fastntk.layer_ntk and fastntk.weighted_ntk: per-group kernels Θ_g = J_g J_gᵀ in one pass, and J Λ Jᵀ."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import fastntk
from conftest import CASES_BY_NAME, DTYPES, assert_kernel_close
from fastntk.reduction import reduce_full
from fastntk.methods.jacobian import JacobianMethod
from fastntk.methods.structured.method import StructuredMethod
from fastntk.reference import reference_jacobian

CASES = ["mlp", "tutorial_cnn", "token_dict", "tuple_output", "shared_linear_and_scale"]
"""shared_linear_and_scale: a Linear used twice and a scalar no structured rule covers (the Jacobian fallback)."""

VARIANTS = [  # (method, groups, block_size)
    ("structured", "parameter", None),  # a Linear's weight and bias split out of one structured factor
    ("structured", "module", 2),
    ("jacobian", "module", 1),
    ("auto", "parameter", 3),
]


class LSTMHead(nn.Module):
    """An LSTM on (N, T, F) inputs and a Linear head on its mean over steps (structured: LSTM by fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0].mean(1))


def build(case: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A seeded model and inputs x1 (4 samples), x2 (3 samples)."""
    if case == "lstm":
        g = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LSTMHead().to(dtype)
        return model, torch.randn(4, 5, 3, generator=g, dtype=dtype), torch.randn(3, 5, 3, generator=g, dtype=dtype)
    c = CASES_BY_NAME[case]
    return c.build(dtype), c.draw(4, dtype, seed=1), c.draw(3, dtype, seed=2)


@functools.lru_cache(maxsize=None)
def group_references(case: str, dtype: torch.dtype, gram: bool, groups: str) -> dict[str, torch.Tensor]:
    """Each group's float64 reference kernel (full mode): reference_ntk with params= that group."""
    model, x1, x2 = build(case, dtype)
    named = fastntk.parameter_groups(model, groups)
    return {name: fastntk.reference_ntk(model, x1, None if gram else x2, mode="full", params=names) for name, names in named.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gram", [True, False], ids=["gram", "x2"])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal", "trace_mean"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}-b{v[2]}")
@pytest.mark.parametrize("case", [*CASES, "lstm"])
def test_each_group_equals_its_reference(case: str, variant: tuple, mode: str, gram: bool, dtype: torch.dtype) -> None:
    method, groups, block_size = variant
    model, x1, x2 = build(case, dtype)
    kernels = fastntk.layer_ntk(model, x1, None if gram else x2, groups=groups, mode=mode, method=method, block_size=block_size)
    references = group_references(case, dtype, gram, groups)
    assert list(kernels) == list(references)
    for name, kernel in kernels.items():
        assert kernel.dtype == dtype
        assert_kernel_close(kernel, reduce_full(references[name], mode), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["full", "trace"])
@pytest.mark.parametrize("method", ["structured", "jacobian"])
@pytest.mark.parametrize("case", CASES)
def test_groups_sum_to_the_kernel(case: str, method: str, mode: str, dtype: torch.dtype) -> None:
    model, x1, x2 = build(case, dtype)
    total = sum(fastntk.layer_ntk(model, x1, x2, groups="parameter", mode=mode, method=method).values())
    assert_kernel_close(total, fastntk.ntk(model, x1, x2, mode=mode, method=method).double(), dtype)


def test_group_names() -> None:
    model, _, _ = build("tuple_output", torch.float64)
    assert fastntk.parameter_groups(model) == {
        "trunk": ["trunk.weight", "trunk.bias"], "a": ["a.weight", "a.bias"], "b": ["b.weight", "b.bias"],
    }
    assert list(fastntk.parameter_groups(model, "parameter")) == [name for name, _ in model.named_parameters()]
    scaled, _, _ = build("shared_linear_and_scale", torch.float64)
    assert list(fastntk.parameter_groups(scaled)) == ["", "fc", "head"]  # the root module's own parameter: group ""
    frozen = CASES_BY_NAME["frozen"].build()
    assert fastntk.parameter_groups(frozen) == {"0": ["0.weight"], "2": ["2.bias"], "4": ["4.weight", "4.bias"]}
    assert fastntk.parameter_groups(frozen, params=lambda name, p: name.startswith("4")) == {"4": ["4.weight", "4.bias"]}


@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_dict_groups_and_tied_weights(method: str) -> None:
    c = CASES_BY_NAME["tied"]
    model, x1, x2 = c.build(torch.float64), c.draw(4, torch.float64, seed=1), c.draw(3, torch.float64, seed=2)
    groups = {"embedding": ["out.weight"], "hidden": lambda name, p: name.startswith("hidden")}  # an alias of embed.weight
    kernels = fastntk.layer_ntk(model, x1, x2, groups=groups, mode="trace", method=method)
    assert list(kernels) == ["embedding", "hidden"]
    for name, params in (("embedding", ["embed.weight"]), ("hidden", ["hidden.weight", "hidden.bias"])):
        assert_kernel_close(kernels[name], fastntk.reference_ntk(model, x1, x2, mode="trace", params=params), torch.float64)
    assert fastntk.parameter_groups(model) == {"embed": ["embed.weight"], "hidden": ["hidden.weight", "hidden.bias"]}


def reparameterised(model: nn.Module, scale: dict[str, float]) -> nn.Module:
    """The model as a function of φ = θ / sqrt(λ): f(sqrt(λ) φ, x), whose kernel is J Λ Jᵀ (an independent oracle)."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.phi = nn.ParameterDict(
                {name.replace(".", "/"): nn.Parameter(p.detach() / math.sqrt(scale[name])) for name, p in model.named_parameters()}
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            theta = {name.replace("/", "."): phi * math.sqrt(scale[name.replace("/", ".")]) for name, phi in self.phi.items()}
            return functional_call(model, theta, (x,))

    return Scaled()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gram", [True, False], ids=["gram", "x2"])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal", "trace_mean"])
@pytest.mark.parametrize("method", ["structured", "jacobian", "auto"])
@pytest.mark.parametrize("case", ["mlp", "tutorial_cnn", "shared_linear_and_scale"])
def test_weighted_kernel(case: str, method: str, mode: str, gram: bool, dtype: torch.dtype) -> None:
    model, x1, x2 = build(case, dtype)
    x2 = None if gram else x2
    named = fastntk.parameter_groups(model)
    weights = {name: 0.25 + 1.5 * g for g, name in enumerate(named)}
    kernel = fastntk.weighted_ntk(model, x1, x2, weights=weights, mode=mode, method=method, block_size=2)
    expected = sum(w * reduce_full(group_references(case, dtype, gram, "module")[name], mode) for name, w in weights.items())
    assert_kernel_close(kernel, expected, dtype)
    if mode == "trace" and method == "auto":  # the reparameterised model's reference: J Λ Jᵀ without groups
        scale = {p: weights[name] for name, params in named.items() for p in params}
        oracle = fastntk.reference_ntk(reparameterised(model, scale), x1, x2, mode=mode)
        assert_kernel_close(kernel, oracle, dtype)


def test_a_zero_weight_leaves_its_group_out() -> None:
    model, x1, x2 = build("mlp", torch.float64)
    kernel = fastntk.weighted_ntk(model, x1, x2, weights={"0": 0.0, "2": 0.0, "4": 3.0}, mode="trace")
    assert_kernel_close(kernel, 3.0 * fastntk.reference_ntk(model, x1, x2, mode="trace", params=["4.weight", "4.bias"]), torch.float64)


class Counter:
    """Counts a method's factor computations (one forward/backward pass over a block each)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for cls, attr in ((JacobianMethod, "left"), (StructuredMethod, "block_factors")):
            original = getattr(cls, attr)

            def counted(method, x, original=original):  # noqa: ANN001
                self.calls += 1
                return original(method, x)

            monkeypatch.setattr(cls, attr, counted)

    def of(self, call) -> int:  # noqa: ANN001
        self.calls = 0
        call()
        return self.calls


@pytest.mark.parametrize("method", ["structured", "jacobian"])
@pytest.mark.parametrize("gram", [True, False], ids=["gram", "x2"])
def test_factors_are_computed_once_per_block_not_once_per_group(monkeypatch: pytest.MonkeyPatch, method: str, gram: bool) -> None:
    model, _, _ = build("mlp", torch.float64)
    c = CASES_BY_NAME["mlp"]
    x1, x2 = c.draw(9, torch.float64, seed=1), None if gram else c.draw(7, torch.float64, seed=2)
    counter = Counter(monkeypatch)
    groups = fastntk.parameter_groups(model, "parameter")
    assert len(groups) == 6
    options = dict(mode="trace", method=method, block_size=3)
    layers = counter.of(lambda: fastntk.layer_ntk(model, x1, x2, groups="parameter", **options))
    weighted = counter.of(lambda: fastntk.weighted_ntk(model, x1, x2, weights=dict.fromkeys(groups, 1.0), groups="parameter", **options))
    one = counter.of(lambda: fastntk.ntk(model, x1, x2, **options))
    separate = counter.of(lambda: [fastntk.ntk(model, x1, x2, params=names, **options) for names in groups.values()])
    assert layers == weighted == one
    assert separate == len(groups) * one
    if method == "jacobian":  # each block's factors once: 3 blocks of x1 (and 3 of x2)
        assert one == (3 if gram else 6)


def test_errors() -> None:
    model, x1, x2 = build("mlp", torch.float64)
    with pytest.raises(fastntk.OptionError, match=r"weights name \['1'\] but the groups are \['0', '2', '4'\]"):
        fastntk.weighted_ntk(model, x1, weights={"0": 1.0, "1": 1.0, "2": 1.0, "4": 1.0})
    with pytest.raises(fastntk.OptionError, match=r"no weight for the groups \['4'\]"):
        fastntk.weighted_ntk(model, x1, weights={"0": 1.0, "2": 1.0})
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(fastntk.OptionError, match=r"weight of group '2' is .*finite and >= 0"):
            fastntk.weighted_ntk(model, x1, weights={"0": 1.0, "2": bad, "4": 1.0})
    with pytest.raises(fastntk.OptionError, match="give a real number"):
        fastntk.weighted_ntk(model, x1, weights={"0": 1.0, "2": "big", "4": 1.0})
    with pytest.raises(fastntk.SelectionError, match=r"groups 'a' and 'b' both select '2.weight': groups must not overlap"):
        fastntk.layer_ntk(model, x1, groups={"a": ["0.weight", "2.weight"], "b": lambda name, p: name.startswith("2")})
    with pytest.raises(fastntk.SelectionError, match=r"group 'a': the model has no parameter named '9.weight'"):
        fastntk.layer_ntk(model, x1, groups={"a": ["9.weight"]})
    with pytest.raises(fastntk.SelectionError, match=r"group 'a' selects \['0.weight'\], which params= .* leaves out"):
        fastntk.layer_ntk(model, x1, groups={"a": ["0.weight"]}, params=["2.weight"])
    with pytest.raises(fastntk.OptionError, match=r"groups='layers': use 'module', 'parameter', or a dict"):
        fastntk.layer_ntk(model, x1, groups="layers")
    with pytest.raises(fastntk.OptionError, match=r"method='vp' cannot split the kernel by parameter group"):
        fastntk.layer_ntk(model, x1, method="vp")
    with pytest.raises(fastntk.OptionError, match=r"the 3 kernel\(s\) alone take .* more than max_memory"):
        fastntk.layer_ntk(model, x1, x2, max_memory=3 * 4 * 3 * 9 * 8)  # three full kernels of 4x3 pairs of 3x3 outputs
    with pytest.raises(fastntk.OptionError, match="unknown mode"):
        fastntk.layer_ntk(model, x1, mode="traced")


def test_a_non_finite_group_is_named() -> None:
    class Sqrt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x).abs().sqrt())

    model = Sqrt().double()
    with torch.no_grad():
        model.a.weight.zero_()
        model.a.bias.zero_()
    with pytest.raises(fastntk.NonFiniteError, match="the kernel of group 'a' contains NaN or inf") as info:
        fastntk.layer_ntk(model, torch.ones(2, 2, dtype=torch.float64), method="jacobian", mode="trace")
    assert info.value.kernel.shape == (2, 2, 2)


def test_leaves_the_model_and_process_as_found() -> None:
    model, x1, x2 = build("tutorial_cnn", torch.float32)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    fastntk.layer_ntk(model, x1, x2, mode="trace")
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    assert torch.equal(state, torch.random.get_rng_state()) and threads == torch.get_num_threads() and torch.is_grad_enabled()


def test_takes_what_ntk_takes() -> None:
    model, x1, _ = build("mlp", torch.float32)
    from_numpy = fastntk.layer_ntk(model, x1.double().numpy(), mode="trace", dtype=torch.float64)
    assert all(k.dtype == torch.float64 for k in from_numpy.values())
    dataset = torch.utils.data.TensorDataset(x1.double())
    from_dataset = fastntk.layer_ntk(model, dataset, mode="trace", dtype=torch.float64)
    assert all(torch.allclose(from_numpy[name], from_dataset[name]) for name in from_numpy)


def test_the_guide_examples_run() -> None:
    """The examples of docs/guide/per-layer.md, as written (they build on each other)."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "per-layer.md").read_text()
    namespace: dict = {}
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) == 3
    for code in blocks:
        exec(compile(code, "per-layer.md", "exec"), namespace)  # noqa: S102
    assert list(namespace["kernels"]) == ["0", "2"] and namespace["k"].shape == (32, 8)
    assert list(namespace["per_tensor"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert list(namespace["custom"]) == ["weights", "last bias"]
    assert abs(sum(namespace["share"].values()) - 1) < 1e-4


@pytest.mark.parametrize("function", [fastntk.layer_ntk, fastntk.weighted_ntk], ids=lambda f: f.__name__)
def test_the_docstring_examples_run(function) -> None:  # noqa: ANN001
    import doctest

    with torch.random.fork_rng():
        torch.manual_seed(0)
        finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
        for test in finder.find(function, function.__name__, globs={}):
            runner.run(test)
    assert runner.summarize(verbose=False).failed == 0 and runner.summarize(verbose=False).attempted >= 3


@pytest.mark.parametrize("entry", [fastntk.layer_ntk, fastntk.weighted_ntk], ids=lambda f: f.__name__)
def test_takes_ntks_options_with_its_defaults(entry) -> None:  # noqa: ANN001
    import inspect

    parameters, reference = inspect.signature(entry).parameters, inspect.signature(fastntk.ntk).parameters
    for name in ("mode", "method", "params", "dtype", "block_size", "max_memory", "check", "progress"):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY and parameters[name].default == reference[name].default, name
    assert parameters["groups"].default == "module"


def test_blocks_fit_max_memory_with_the_g_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The G kernels and blocks of G values count against max_memory: a budget that holds
    ntk's blocks whole cuts layer_ntk's (6 groups) into more, and the kernels stay exact."""
    model, _, _ = build("mlp", torch.float64)
    x = CASES_BY_NAME["mlp"].draw(40, torch.float64, seed=1)
    counter = Counter(monkeypatch)
    options = dict(mode="full", method="jacobian", max_memory="2MB")
    kernels: dict = {}
    layers = counter.of(lambda: kernels.update(fastntk.layer_ntk(model, x, groups="parameter", **options)))
    assert layers > counter.of(lambda: fastntk.ntk(model, x, **options))
    reference = reference_jacobian(model, x)
    start = 0
    for name, kernel in kernels.items():
        size = dict(model.named_parameters())[name].numel()
        j = reference[..., start:start + size]
        start += size
        assert_kernel_close(kernel, torch.einsum("nap,mbp->nmab", j, j), torch.float64)


@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_a_group_that_does_not_affect_the_outputs_is_zero(method: str) -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.used(x))

    model, x = Unused().double(), torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kernels = fastntk.layer_ntk(model, x, mode="full", method=method)
    assert torch.equal(kernels["unused"], torch.zeros(4, 4, 2, 2, dtype=torch.float64))
    assert_kernel_close(kernels["used"], fastntk.reference_ntk(model, x), torch.float64)


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("kind", ["dense", "positions", "rows", "rows_and_positions"])
def test_a_weight_and_bias_factor_splits_exactly(kind: str, mode: str) -> None:
    """A Linear's factor with its bias folded in (X + 1), split into the weight's share (X) and
    the bias's (its Jacobian Σ_s g_s), against the dense per-sample Jacobians of both."""
    from fastntk.methods.grouped import GroupedMethod
    from fastntk.methods.structured.factors import PairFactor, RowsPairFactor

    g = torch.Generator().manual_seed(0)
    n, o, d, e = 3, 2, 4, 5

    def pair(s: int) -> PairFactor:
        return PairFactor(torch.randn(n, s, d, generator=g, dtype=torch.float64), torch.randn(n, o, s, e, generator=g, dtype=torch.float64), "dot", True)

    def rows() -> RowsPairFactor:
        return RowsPairFactor(torch.randn(n, 1, d, generator=g, dtype=torch.float64), torch.randn(n, e, generator=g, dtype=torch.float64),
                              torch.randn(o, e, generator=g, dtype=torch.float64), True)

    shared_rows = torch.randn(o, e, generator=g, dtype=torch.float64)
    a, b = {
        "dense": (pair(1), pair(1)),
        "positions": (pair(3), pair(2)),
        "rows": (rows(), rows()),
        "rows_and_positions": (rows(), pair(2)),
    }[kind]
    if kind == "rows":  # both sides' rows are the output layer's
        a, b = (RowsPairFactor(f.keys, f.derivative, shared_rows, True) for f in (a, b))

    def jacobians(f) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001 - (N, O, e·d) weight and (N, O, e) bias Jacobians
        f = f.materialized() if isinstance(f, RowsPairFactor) else f
        return torch.einsum("nase,nsd->naed", f.cotangents, f.keys).flatten(2), f.cotangents.sum(2)

    from types import SimpleNamespace

    f = SimpleNamespace(primals={"w": torch.zeros(e, d), "b": torch.zeros(e)}, dtype=torch.float64, device=torch.device("cpu"))
    inner = SimpleNamespace(name="structured", f=f, mode=mode, num_outputs=o, calibration=None, symmetric_factors=True, sides_with_factors=2)
    method = GroupedMethod(inner, {"w": 0, "b": 1}, 2)  # type: ignore[arg-type]
    shares = dict(method.shares(("w", "b"), a, b))
    for group, (left, right) in enumerate(zip(jacobians(a), jacobians(b))):
        expected = reduce_full(torch.einsum("nap,mbp->nmab", left, right), mode)
        assert_kernel_close(shares[group], expected, torch.float64)
