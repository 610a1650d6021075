"""The structured method on layer variants and on models only partly covered by rules."""

from __future__ import annotations

import pytest
import torch

import fastntk
from cases import CASES_BY_NAME, STRUCTURED_CASES
from conftest import DTYPES, assert_kernel_close, reduce_full, reference_full
from fastntk._functional import FunctionalModel
from fastntk.methods import StructuredMethod
from fastntk.blocks.engine import calibrate_on_first_block
from fastntk.methods.structured.rules import conv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gram", [False, True], ids=["x1-x2", "gram"])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("case", [c.name for c in STRUCTURED_CASES])
def test_structured_matches_reference(case: str, mode: str, gram: bool, dtype: torch.dtype) -> None:
    c = CASES_BY_NAME[case]
    model = c.build(dtype)
    x1 = c.draw(4, dtype, seed=1)
    x2 = None if gram else c.draw(3, dtype, seed=2)
    kernel = fastntk.ntk(model, x1, x2, mode=mode, method="structured")
    assert_kernel_close(kernel, reduce_full(reference_full(case, dtype, gram), mode), dtype)


CONV_CASES = ["tutorial_cnn", "conv1d", "conv2d_options", "conv2d_groups", "depthwise_separable", "conv1d_dilated", "conv3d", "groupnorm"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["full", "trace"])
@pytest.mark.parametrize("path", ["grouped", "patches"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_both_conv_weight_jacobians(case: str, path: str, mode: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every convolution through the grouped weight backward, or (1d/2d) through patches."""
    monkeypatch.setattr(conv, "SMALL_PATCH", 0 if path == "grouped" else 10**9)
    c = CASES_BY_NAME[case]
    kernel = fastntk.ntk(c.build(dtype), c.draw(4, dtype, seed=1), c.draw(3, dtype, seed=2), mode=mode, method="structured")
    assert_kernel_close(kernel, reduce_full(reference_full(case, dtype, False), mode), dtype)


def num_outputs(f: FunctionalModel, x: torch.Tensor) -> int:
    """O, by one forward pass."""
    with torch.no_grad():
        return f(f.primals, x).shape[1]


def calibrated(case: str) -> StructuredMethod:
    c = CASES_BY_NAME[case]
    method = StructuredMethod(FunctionalModel.build(c.build(torch.float64)), "full", 2)
    method = method.calibrated(c.draw(3, torch.float64))[0]
    return method


@pytest.mark.parametrize(
    ("case", "fallback"),
    [
        ("mlp", []),
        ("tutorial_cnn", []),
        ("batchnorm_eval", []),
        ("groupnorm", []),
        ("token_dict", []),
        ("tied", ["embed.weight"]),  # an Embedding and a Linear share it: no single rule
        ("shuffled_batch", ["inner.bias", "inner.weight"]),  # caught by the gradient check
        ("direct_weight_use", ["fc.bias", "fc.weight"]),  # weight used outside its Linear, bias folded with it
        ("shared_linear_and_scale", ["scale"]),  # fc used twice stays structured
    ],
)
def test_fallback_is_exactly_what_no_rule_covers(case: str, fallback: list[str]) -> None:
    assert calibrated(case).fallback == fallback


def test_sequence_linear_uses_both_forms() -> None:
    """Few positions keep the position-pair form; many form per-sample Jacobians."""
    from fastntk.methods.structured.factors import JacobianFactor, PairFactor

    for case, kind in (("sequence_short", PairFactor), ("sequence_long", JacobianFactor)):
        c = CASES_BY_NAME[case]
        method = StructuredMethod(FunctionalModel.build(c.build(torch.float64)), "full", 2)
        method = method.calibrated(c.draw(2, torch.float64))[0]
        factors = method.left(c.draw(2, torch.float64))
        assert isinstance(factors[("fc.weight", "fc.bias")], kind)


@pytest.mark.parametrize(("mode", "sample_major"), [("trace", True), ("full", False), ("diagonal", False)])
def test_dense_cotangents_sample_major_only_for_trace(mode: str, sample_major: bool) -> None:
    """Trace contractions of dense layers read sample-major cotangents (one GEMM over O·e per pair
    of blocks); full and diagonal ones read them output-major, as the backward pass left them."""
    from fastntk.methods.contraction import is_output_major
    from fastntk.methods.structured.factors import PairFactor

    c = CASES_BY_NAME["mlp"]
    f = FunctionalModel.build(c.build(torch.float32))
    x = c.draw(5, torch.float32)
    method = StructuredMethod(f, mode, num_outputs(f, x))
    method = method.calibrated(x)[0]
    dense = [factor for factor in method.left(x).values() if isinstance(factor, PairFactor)]
    assert dense
    for factor in dense:
        assert factor.sample_major is sample_major
        assert factor.cotangents.is_contiguous() is sample_major
        assert is_output_major(factor.cotangents) is not sample_major


SIZED_EXACTLY = [c.name for c in STRUCTURED_CASES if c.name not in ("shuffled_batch", "direct_weight_use")]


@pytest.mark.parametrize("case", SIZED_EXACTLY + ["mlp", "tutorial_cnn", "transformer", "token_dict", "batchnorm_eval"])
def test_size_estimate_is_exact(case: str) -> None:
    """Blocks are sized from one forward pass before calibrating: the rules' factor sizes
    from shapes must be what calibration then measures (models whose calibration moves
    groups to the fallback excepted: the engine re-sizes for those, see the next test)."""
    c = CASES_BY_NAME[case]
    f = FunctionalModel.build(c.build(torch.float32))
    outputs = num_outputs(f, c.draw(1, torch.float32))
    for mode in ("full", "trace"):
        method = StructuredMethod(f, mode, outputs)
        method = method.estimated(c.draw(1, torch.float32))
        estimate = method.bytes_per_sample()
        method = method.calibrated(c.draw(4, torch.float32))[0]
        assert method.bytes_per_sample() == estimate


def test_blocks_shrink_when_calibration_finds_more_bytes() -> None:
    """shuffled_batch's Linear fails the check, so its Jacobians exceed the bound: the engine
    re-sizes the blocks (and drops the kept factors) instead of overrunning the budget."""
    c = CASES_BY_NAME["shuffled_batch"]
    model = c.build(torch.float64)
    x1, x2 = c.draw(6, torch.float64, seed=1), c.draw(3, torch.float64, seed=2)
    probe = StructuredMethod(FunctionalModel.build(model), "full", 2).estimated(x1[:1])
    budget = 2 * 4 * probe.bytes_per_sample()  # blocks of 4 by the bound

    def size_blocks(method: StructuredMethod) -> int:
        return max(1, budget // (2 * method.bytes_per_sample()))

    def load(side: int, start: int, stop: int) -> torch.Tensor:
        return (x1 if side == 1 else x2)[start:stop]

    method = StructuredMethod(FunctionalModel.build(model), "full", 2)
    method, kept, block = calibrate_on_first_block(method, load, 6, 3, None, size_blocks, keep=True)
    assert block < 4 and kept is None
    kernel = fastntk.ntk(model, x1, x2, mode="full", method="structured", block_size=4)
    assert_kernel_close(kernel, fastntk.reference_ntk(model, x1, x2, mode="full"), torch.float64)


def test_first_block_is_computed_once(captured_sizes: list[int]) -> None:
    """The calibration block's factors serve the engine's first block: x1 is captured once."""
    sizes = captured_sizes
    c = CASES_BY_NAME["mlp"]
    model = c.build(torch.float64)
    x1, x2 = c.draw(4, torch.float64, seed=1), c.draw(3, torch.float64, seed=2)
    kernel = fastntk.ntk(model, x1, x2, mode="full", method="structured")
    assert sorted(sizes) == [1, 3, 4]  # the size bound, x2's block, x1's block (calibrated and kept)
    assert_kernel_close(kernel, reference_full("mlp", torch.float64, False), torch.float64)


class NotVmappable(torch.autograd.Function):
    """An op whose backward reads a value (``.item()``), so it cannot run vmapped over outputs."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * 2.0

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad * float(torch.tensor(2.0).item()) + 0 * grad.sum().item()


def test_backward_that_cannot_be_vmapped_goes_one_output_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backward that cannot be vmapped over outputs is learned at calibration (its vmapped
    pass fails): the calibration then says one output at a time, and so do later blocks; a
    calibration block that took one output at a time (untried) says the same."""
    from fastntk.methods.structured import method as structured

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(NotVmappable.apply(self.a(x)))

    torch.manual_seed(0)
    model = Model().double()
    x1, x2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    expected = fastntk.reference_ntk(model, x1, x2, mode="full")
    untried = StructuredMethod(FunctionalModel.build(model), "full", 2)
    monkeypatch.setattr(structured, "CHUNK_BYTES", 1)  # the calibration block: one output at a time
    untried = untried.calibrated(x1)[0]
    monkeypatch.setattr(structured, "CHUNK_BYTES", 2**20)
    failed = StructuredMethod(FunctionalModel.build(model), "full", 2).calibrated(x1)[0]
    for method in (untried, failed):
        assert method.calibration.batched_backward is False
        assert method.calibration.output_chunk(2, 2) == 1
        kernel = method.contract(method.left(x1), method.left(x2))
        assert_kernel_close(kernel.double(), expected, torch.float64)


@pytest.mark.parametrize(("case", "heavy"), [("mlp", True), ("transformer", True), ("tutorial_cnn", False), ("conv1d", False)])
def test_oneDNN_passes_only_for_matmul_models(case: str, heavy: bool) -> None:
    """The forward and backward passes run under the oneDNN dispatch mode only when matrix
    products make most of the forward FLOPs (convolution networks do not earn its per-op cost back)."""
    assert calibrated(case).calibration.matmul_heavy is heavy


@pytest.mark.parametrize(("case", "cloned"), [("inplace_relu", True), ("mlp", False), ("tutorial_cnn", False)])
def test_layer_outputs_are_copied_only_when_written_over(case: str, cloned: bool) -> None:
    """The forward pass continues from the recorded layer outputs themselves (no copy of every
    activation) unless the model writes over one in place; then it gives the model copies."""
    assert calibrated(case).calibration.clone_outputs is cloned


def test_backward_vmapped_over_outputs_only_where_it_pays() -> None:
    """Matrix-product models: several outputs per backward pass (taller GEMMs); convolution
    models: one output at a time once a block's passes are big (PyTorch's vmap rule for the
    convolution backward loops over outputs anyway), several while they are tiny."""
    import dataclasses

    from fastntk.methods.structured.method import SMALL_PASSES

    conv = calibrated("tutorial_cnn").calibration
    big = dataclasses.replace(conv, forward_flops=SMALL_PASSES)  # per sample: any block is big
    tiny = dataclasses.replace(conv, forward_flops=1.0)
    assert big.output_chunk(4, 2) == 1
    assert tiny.output_chunk(4, 2) == 2
    matmul = dataclasses.replace(calibrated("mlp").calibration, forward_flops=SMALL_PASSES)
    assert matmul.output_chunk(4, 2) == 2
    assert dataclasses.replace(matmul, batched_backward=False).output_chunk(4, 2) == 1


@pytest.mark.parametrize("mode", ["trace", "diagonal", "full"])
@pytest.mark.parametrize("case", ["tutorial_cnn", "conv2d_groups", "sequence_long", "tied", "chain_shared"])
def test_gram_of_one_block_reuses_calibration_factors(case: str, mode: str) -> None:
    """K(x, x) of one block: calibration keeps the block's factors (fallback included) for the
    engine, and the first call (calibration) and later calls agree with the reference."""
    c = CASES_BY_NAME[case]
    model = c.build(torch.float64)
    x = c.draw(5, torch.float64)
    fn = fastntk.ntk_fn(model, mode=mode, method="structured")
    expected = fastntk.reference_ntk(model, x, mode=mode)
    assert_kernel_close(fn(x), expected, torch.float64)
    assert_kernel_close(fn(x), expected, torch.float64)
    f = FunctionalModel.build(model)
    method, kept = StructuredMethod(f, mode, num_outputs(f, x)).calibrated(x, keep=True)
    assert set(kept.factors) == set(method.groups) | {(name,) for name in method.fallback}
    assert_kernel_close(method.contract(kept.factors, kept.factors), expected, torch.float64)
