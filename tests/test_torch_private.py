"""Every private PyTorch API the library uses has a fallback: forced on, the kernels are still exact.

Each private API of :mod:`fastntk._torch_private` is switched off in turn (as it would be in a
PyTorch without it, or with it changed): the kernels of the models that exercise it still equal
the float64 reference, and where the API is present, its fast path is the one taken.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastntk
from cases import CASES_BY_NAME, ScalesItsInput
from conftest import assert_kernel_close, reduce_full, reference_full
from fastntk import _gemm
from fastntk import _torch_private as tp
from fastntk._functional import FunctionalModel
from fastntk.methods.structured.capture import capture

APIS = {
    "onednn_linear": tp.ONEDNN_LINEAR,
    "version_counters": tp.VERSION_COUNTERS,
    "fused_activation_backward": tp.FUSED_ACTIVATION_BACKWARD,
    "convolution_backward": tp.CONVOLUTION_BACKWARD,
    "pytree": tp.PYTREE,
}
EXERCISED_BY = {
    "onednn_linear": (["mlp", "chain_mlp", "residual"], ["structured", "jacobian"]),
    "version_counters": (["inplace_relu", "chain_mlp", "chain_gelu", "residual"], ["structured"]),
    "fused_activation_backward": (["chain_mlp", "tanh", "inplace_relu"], ["structured"]),
    "convolution_backward": (["conv3d", "conv2d_groups", "tutorial_cnn"], ["structured"]),
    "pytree": (["token_dict", "tuple_output"], ["structured", "vp", "jacobian"]),
}
"""Models whose kernels go through each private API, and the methods that use it."""
FALLBACK_RUNS = [(api, case, method) for api, (cases, methods) in EXERCISED_BY.items() for case in cases for method in methods]


def test_every_private_api_is_present_in_this_pytorch() -> None:
    """The fast paths are the ones tested elsewhere (a PyTorch that lost one shows here first)."""
    missing = [name for name, api in APIS.items() if not api.present]
    assert not missing or missing == ["onednn_linear"] and not torch.backends.mkldnn.is_available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("api", "case", "method"), FALLBACK_RUNS)
def test_kernel_is_exact_on_the_fallback(api: str, case: str, method: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(APIS[api], "off", True)
    assert not APIS[api]
    c = CASES_BY_NAME[case]
    kernel = fastntk.ntk(c.build(dtype), c.draw(4, dtype, seed=1), c.draw(3, dtype, seed=2), mode="full", method=method)
    assert_kernel_close(kernel, reduce_full(reference_full(case, dtype, False), "full"), dtype)


@pytest.mark.parametrize("case", ["chain_mlp", "inplace_relu", "conv3d", "token_dict"])
def test_kernel_is_exact_on_every_fallback_at_once(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for api in APIS.values():
        monkeypatch.setattr(api, "off", True)
    c = CASES_BY_NAME[case]
    for mode in ("full", "trace"):
        kernel = fastntk.ntk(c.build(), c.draw(4, seed=1), mode=mode, method="structured")
        assert_kernel_close(kernel, reduce_full(reference_full(case, torch.float32, True), mode), torch.float32)


# --------------------------------------------------------------------------- oneDNN


def test_onednn_linear_and_its_fallback_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b_t, bias = torch.randn(9, 20, generator=gen), torch.randn(7, 20, generator=gen), torch.randn(7, generator=gen)
    expected = a.double() @ b_t.double().T + bias.double()
    fast = tp.onednn_linear(a, b_t, bias)
    monkeypatch.setattr(tp.ONEDNN_LINEAR, "off", True)
    assert not _gemm.onednn_available()
    slow = tp.onednn_linear(a, b_t, bias)
    for product in (fast, slow):
        torch.testing.assert_close(product.double(), expected, rtol=1e-5, atol=1e-5)


def test_without_onednn_no_product_is_routed(monkeypatch: pytest.MonkeyPatch) -> None:
    routed: list[int] = []
    monkeypatch.setattr(_gemm, "_linear", lambda a, b_t, bias: routed.append(1) or F.linear(a, b_t, bias))
    monkeypatch.setattr(tp.ONEDNN_LINEAR, "off", True)
    a = torch.randn(6, 6)
    with _gemm.fast_matmuls():
        product = _gemm.mm(a, a) + a @ a
    assert routed == []
    torch.testing.assert_close(product, 2 * (a @ a))


# --------------------------------------------------------------------------- version counters


class WritesOverALayersOutput(nn.Module):
    """Writes in place over a layer's output (what the structured method takes cotangents at)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        y.mul_(2)
        y.add_(x[:, :1])
        return self.head(torch.tanh(y))


@pytest.mark.parametrize("counters", [True, False], ids=["counters", "no-counters"])
def test_writes_over_a_layers_output_keep_the_kernel_exact(counters: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tp.VERSION_COUNTERS, "off", not counters)
    torch.manual_seed(0)
    model = WritesOverALayersOutput().double()
    x1, x2 = torch.randn(4, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    expected = fastntk.reference_ntk(model, x1, x2)
    for method in ("structured", "auto"):
        assert_kernel_close(fastntk.ntk(model, x1, x2, method=method), expected, torch.float64)


@pytest.mark.parametrize("counters", [True, False], ids=["counters", "no-counters"])
def test_a_model_writing_to_its_input_is_refused_without_counters_too(counters: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tp.VERSION_COUNTERS, "off", not counters)
    x1 = torch.randn(4, 3)
    before = x1.clone()
    with pytest.raises(fastntk.ModelError, match="modifies its input in place"):
        fastntk.ntk(ScalesItsInput(), x1)
    assert torch.equal(x1, before)


def test_without_counters_the_structured_method_trusts_copies_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """With counters, a chain of activations gets its own reverse pass and the model the recorded
    outputs themselves; without, the model gets copies, the saved inputs are copies, and the
    chain's activations (which read their outputs back) are left to autograd."""
    c = CASES_BY_NAME["tanh"]
    f = FunctionalModel.build(c.build(torch.float64))
    x = c.draw(4, torch.float64)
    observed = capture(f, x, graph=False)
    assert observed.chain is not None and not observed.cloned
    assert tp.version(x) == 0 and tp.unchanged(x, 0) and not tp.unchanged(x, None)
    monkeypatch.setattr(tp.VERSION_COUNTERS, "off", True)
    assert tp.version(x) is None and not tp.unchanged(x, 0)
    observed = capture(f, x, graph=False)
    assert observed.chain is None and observed.cloned
    assert all(not use.versions and use.intact() for use in observed.uses)
    assert observed.uses[0].saved["keys"].data_ptr() != x.data_ptr()


# --------------------------------------------------------------------------- fused backward kernels


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("kind", ["relu", "tanh", "sigmoid"])
def test_activation_backward_fallback_equals_the_fused_kernels(kind: str, in_place: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    x[0, :2] = 0.0  # ReLU's derivative at 0 (its output is 0 there)
    y = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[kind](x)
    g = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64)  # (k, N, ...): y broadcasts
    expected = torch.autograd.functional.vjp(lambda t: {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[kind](t).expand(3, 5, 6), x, g)
    results = []
    for off in (False, True):
        monkeypatch.setattr(tp.FUSED_ACTIVATION_BACKWARD, "off", off)
        grad = g.clone()
        result = tp.activation_backward(kind, grad, y, in_place)
        assert (result.data_ptr() == grad.data_ptr()) is in_place
        results.append(result)
    torch.testing.assert_close(results[0], results[1], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(results[1].sum(0), expected[1], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- convolution backward


@pytest.mark.parametrize(
    ("dims", "groups", "stride", "padding", "dilation"),
    [(1, 1, [2], [1], [1]), (2, 2, [1, 2], [0, 1], [2, 1]), (3, 1, [1, 2, 1], [1, 0, 0], [1, 1, 2])],
)
def test_convolution_weight_grad_fallback_equals_the_weight_backward(
    dims: int, groups: int, stride: list[int], padding: list[int], dilation: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *[7] * dims, generator=gen, dtype=torch.float64)
    weight_shape = (6, 4 // groups, *[3] * dims)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    out_shape = conv(x, torch.zeros(weight_shape, dtype=torch.float64), None, stride, padding, dilation, groups).shape
    grad = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    fast = tp.convolution_weight_grad(grad, x, weight_shape, stride, padding, dilation, groups)
    monkeypatch.setattr(tp.CONVOLUTION_BACKWARD, "off", True)
    with torch.no_grad():  # as the structured method calls it
        slow = tp.convolution_weight_grad(grad, x, weight_shape, stride, padding, dilation, groups)
    assert fast.shape == slow.shape == weight_shape
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- pytrees

Point = collections.namedtuple("Point", ["x", "y"])
T = torch.zeros(2)
TREES = [
    T,
    (T, T),
    [T, (T, [T])],
    {"b": T, "a": (T, None)},
    collections.OrderedDict(z=T, a=[T, T]),
    Point(T, {"k": T}),
    (),
    {"ids": T, "mask": T, "extra": 3},
]


@pytest.mark.parametrize("tree", TREES, ids=lambda t: type(t).__name__)
def test_fallback_pytree_flattens_as_torchs(tree: object, monkeypatch: pytest.MonkeyPatch) -> None:
    leaves, spec = tp.pytree.tree_flatten(tree)
    assert not isinstance(spec, tp.TreeSpec)  # torch's, while present
    monkeypatch.setattr(tp.PYTREE, "off", True)
    mine, my_spec = tp.pytree.tree_flatten(tree)
    assert isinstance(my_spec, tp.TreeSpec)
    assert len(mine) == len(leaves) and all(a is b for a, b in zip(mine, leaves))
    assert all(a is b for a, b in zip(tp.pytree.tree_leaves(tree), mine, strict=True))
    rebuilt = tp.pytree.tree_unflatten(mine, my_spec)
    assert type(rebuilt) is type(tree) and tp.pytree.tree_structure(rebuilt) == my_spec
    doubled = tp.pytree.tree_map(lambda t: t * 2 if isinstance(t, torch.Tensor) else t, tree)
    assert type(doubled) is type(tree)
    assert [float(t.sum()) if isinstance(t, torch.Tensor) else t for t in tp.pytree.tree_leaves(doubled)] == [
        0.0 if isinstance(t, torch.Tensor) else t for t in leaves
    ]
