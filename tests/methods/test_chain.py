"""Chains of dense layers, convolutions and activations: cotangents without autograd, the same as autograd's."""

from __future__ import annotations

import pytest
import torch

import fastntk
from cases import CASES_BY_NAME
from conftest import assert_kernel_close
from fastntk._functional import FunctionalModel
from fastntk.methods import StructuredMethod
from fastntk.methods.structured import chain as chain_module
from fastntk.methods.structured.capture import capture, per_output_cotangents
from fastntk.methods.structured.chain import SHAPE_ONLY, chain_cotangent_chunks

DENSE_CHAINS = ["mlp", "tanh", "single_output", "frozen", "chain_mlp", "chain_shared", "chain_gelu", "multidim_output", "sequence_short", "sequence_long"]
CONV_CHAINS = ["tutorial_cnn", "conv1d", "conv2d_options", "conv2d_groups", "depthwise_separable", "conv1d_dilated", "conv3d", "conv_same_even", "inplace_relu", "chain_pooled", "padded_mean", "summed"]
CHAINS = DENSE_CHAINS + CONV_CHAINS
NOT_CHAINS = ["residual", "layernorm_gelu", "transformer", "tied", "tuple_output", "token_dict", "groupnorm", "batchnorm_eval"]


def captured(case: str, n: int = 4):
    c = CASES_BY_NAME[case]
    f = FunctionalModel.build(c.build(torch.float64))
    return capture(f, c.draw(n, torch.float64))


@pytest.mark.parametrize("case", CHAINS + NOT_CHAINS)
def test_chains_are_recognised(case: str) -> None:
    assert (captured(case).chain is not None) is (case in CHAINS)


@pytest.mark.parametrize("sample_major", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, 100])
@pytest.mark.parametrize("case", CHAINS)
def test_chain_cotangents_are_autograds(case: str, chunk: int, sample_major: bool) -> None:
    observed = captured(case)
    n, o = observed.outputs.shape
    assert observed.chain is not None
    tensors = [use.output for use in observed.uses]
    expected = per_output_cotangents(observed.outputs, tensors, chunk, retain_graph=True)
    mine = chain_cotangent_chunks(observed.chain, len(observed.uses), n, o, min(chunk, o), sample_major)
    for want, got in zip(expected, mine, strict=True):
        for a, b in zip(want, got, strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
            if b.stride(0) != 0 and b.shape[1] > 1:  # stored as asked (broadcast rows excepted)
                assert b.is_contiguous() is sample_major


def factor_tensors(factors: dict) -> list[torch.Tensor]:
    return [t for f in factors.values() for t in vars(f).values() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("mode", ["full", "trace"])
@pytest.mark.parametrize("case", ["chain_mlp", "tutorial_cnn"])
def test_chain_models_record_no_graph_after_calibration(case: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    c = CASES_BY_NAME[case]
    method = StructuredMethod(FunctionalModel.build(c.build(torch.float64)), mode, 3 if case == "chain_mlp" else 2)
    method, kept = method.calibrated(c.draw(4, torch.float64), keep=True)
    assert method.calibration.chain
    # whether or not the calibration pass recorded a graph, the factors it keeps hang on none
    assert not any(t.requires_grad for t in factor_tensors(kept.factors))

    def no_autograd(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("autograd was used")

    monkeypatch.setattr(torch.autograd, "grad", no_autograd)
    factors = method.left(c.draw(5, torch.float64, seed=3))
    assert not any(t.requires_grad for t in factor_tensors(factors))


@pytest.mark.parametrize("chain", [True, False])
def test_cotangent_chunks_are_not_held_while_the_next_is_computed(chain: bool) -> None:
    """A chunk the caller has let go of is freed before the next one is made (else the peak
    holds two chunks, and the heap grows with every chunk)."""
    import gc

    observed = captured("tutorial_cnn", 3)
    n, o = observed.outputs.shape
    if chain:
        chunks = chain_cotangent_chunks(observed.chain, len(observed.uses), n, o, 1)
    else:
        chunks = per_output_cotangents(observed.outputs, [use.output for use in observed.uses], 1)
    first = next(chunks)
    storages = {g.untyped_storage().data_ptr() for g in first if g.stride(0) != 0}  # (broadcast rows are the weights')
    del first
    gc.collect()
    tensors = [t for t in gc.get_objects() if type(t) in (torch.Tensor, torch.nn.Parameter)]  # (isinstance would touch deprecated objects)
    alive = {t.untyped_storage().data_ptr() for t in tensors}
    assert storages and not storages & alive
    assert next(chunks)[0].shape == (n, 1, *observed.uses[0].output.shape[1:])


def test_wrong_chain_is_caught_by_the_gradient_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the chain's cotangents be wrong, calibration leaves the model to autograd: still exact."""
    original = chain_module.chain_cotangents
    monkeypatch.setattr(chain_module, "chain_cotangents", lambda *a: [2 * g for g in original(*a)])
    c = CASES_BY_NAME["mlp"]
    model = c.build(torch.float64)
    x1, x2 = c.draw(4, torch.float64, seed=1), c.draw(3, torch.float64, seed=2)
    method = StructuredMethod(FunctionalModel.build(model), "full", 3)
    method = method.calibrated(x1)[0]
    assert method.calibration.chain is False
    assert method.fallback == []  # still structured, from autograd's cotangents
    kernel = fastntk.ntk(model, x1, x2, mode="full", method="structured")
    assert_kernel_close(kernel, fastntk.reference_ntk(model, x1, x2, mode="full"), torch.float64)


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("case", ["chain_mlp", "chain_gelu", "tutorial_cnn"])
def test_later_calls_run_one_forward_pass_over_both_inputs(case: str, mode: str, captured_sizes: list[int]) -> None:
    """Once calibrated, a chain model's K(x1, x2) of one block pair comes from one forward pass
    over x1 and x2 together, each side's factors from its own rows: the same kernel."""
    sizes = captured_sizes
    c = CASES_BY_NAME[case]
    model = c.build(torch.float64)
    x1, x2 = c.draw(4, torch.float64, seed=1), c.draw(3, torch.float64, seed=2)
    fn = fastntk.ntk_fn(model, mode=mode, method="structured")
    first = fn(x1, x2)
    sizes.clear()
    again = fn(x1, x2)
    assert sizes == [7]
    expected = fastntk.reference_ntk(model, x1, x2, mode=mode)
    assert_kernel_close(first, expected, torch.float64)
    assert_kernel_close(again, expected, torch.float64)


@pytest.mark.parametrize(("mode", "compact"), [("trace", True), ("full", False), ("diagonal", False)])
def test_layer_before_the_dense_output_layer_keeps_compact_cotangents_in_trace_mode(mode: str, compact: bool) -> None:
    """Its cotangents are derivative[n] ⊙ rows[a]: in trace mode kept as such (N·e + O·e numbers,
    an O times cheaper contraction), in the other modes formed."""
    from fastntk.methods.structured.factors import RowsPairFactor

    c = CASES_BY_NAME["mlp"]  # Linear(6,16) ReLU Linear(16,16) ReLU Linear(16,3)
    method = StructuredMethod(FunctionalModel.build(c.build(torch.float64)), mode, 3)
    method = method.calibrated(c.draw(4, torch.float64))[0]
    factors = method.left(c.draw(4, torch.float64))
    assert isinstance(factors[("2.weight", "2.bias")], RowsPairFactor) is compact
    assert not any(isinstance(f, RowsPairFactor) for group, f in factors.items() if group != ("2.weight", "2.bias"))


@pytest.mark.parametrize(("case", "compact"), [("mlp", {1}), ("single_output", {0}), ("chain_mlp", {2}), ("inplace_relu", {1}), ("tutorial_cnn", set()), ("conv_same_even", set())])
def test_compact_uses_are_the_dense_layers_before_the_last_activation(case: str, compact: set[int]) -> None:
    """Only a dense layer right before the last activation (on vectors) has cotangents
    derivative ⊙ rows; chain_cotangents gives exactly those uses compact cotangents."""
    from fastntk.methods.structured.chain import RowsCotangents, chain_cotangents, compact_uses

    observed = captured(case)
    n, o = observed.outputs.shape
    assert compact_uses(observed.chain) == compact
    found = chain_cotangents(observed.chain, len(observed.uses), n, 0, o, sample_major=True, keep_rows=True)
    assert {i for i, g in enumerate(found) if isinstance(g, RowsCotangents)} == compact


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_compact_factor_contracts_like_its_formed_self(mode: str) -> None:
    from fastntk.methods.structured.factors import RowsPairFactor

    gen = torch.Generator().manual_seed(0)
    keys1, keys2 = torch.randn(4, 1, 6, generator=gen, dtype=torch.float64), torch.randn(3, 1, 6, generator=gen, dtype=torch.float64)
    derivative1, derivative2 = torch.rand(4, 5, generator=gen, dtype=torch.float64), torch.rand(3, 5, generator=gen, dtype=torch.float64)
    rows = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    a, b = RowsPairFactor(keys1, derivative1, rows, True), RowsPairFactor(keys2, derivative2, rows, True)
    expected = a.materialized().contract(b.materialized(), mode)
    for left, right in ((a, b), (a, b.materialized()), (a.materialized(), b)):
        torch.testing.assert_close(left.contract(right, mode), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["chain_mlp", "tutorial_cnn"])
def test_graph_free_chain_capture_lets_layer_outputs_go(case: str) -> None:
    """Only the outputs' shapes are kept (the cotangents reuse their memory); the activations
    the backward pass reads stay, and the cotangents are still autograd's."""
    c = CASES_BY_NAME[case]
    f = FunctionalModel.build(c.build(torch.float64))
    x = c.draw(4, torch.float64)
    shed, kept = capture(f, x, graph=False), capture(f, x)
    assert shed.chain is not None
    for a, b in zip(shed.uses, kept.uses, strict=True):
        assert a.output.shape == b.output.shape and a.output.untyped_storage().nbytes() <= a.output.element_size()
    assert all(s.output.untyped_storage().nbytes() > s.output.element_size() for s in shed.chain if s.kind not in SHAPE_ONLY)
    n, o = shed.outputs.shape
    expected = per_output_cotangents(kept.outputs, [use.output for use in kept.uses], o)
    for want, got in zip(expected, chain_cotangent_chunks(shed.chain, len(shed.uses), n, o, o), strict=True):
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("dim", "link"), [(1, True), (-1, True), ((1,), True), (0, False), (-2, False), ((0, 1), False), (None, False)])
def test_reductions_over_the_samples_are_not_links(dim: object, link: bool) -> None:
    """A mean over a sample's own dims is an affine link; one over the batch mixes samples
    (even where the result keeps N rows, as here with a square block)."""
    from fastntk.methods.structured.chain import Call, step_of

    x = torch.randn(4, 4)
    out = x.mean() if dim is None else x.mean(dim)
    call = Call(torch.Tensor.mean, (x,) if dim is None else (x, dim), {}, [x], out, None)
    assert (step_of(call, x) is not None) is link


@pytest.mark.slow
def test_chains_never_import_dynamo() -> None:
    """torch.func's first gradient transform in a process imports torch._dynamo (~0.6 s of a
    first call): a chain's backward, affine links included, uses plain autograd and ops."""
    import subprocess
    import sys

    script = (
        "import sys, torch, fastntk\n"
        "sys.path.insert(0, 'tests')\n"
        "from cases import CASES_BY_NAME\n"
        "c = CASES_BY_NAME['chain_pooled']\n"
        "model = c.build(torch.float32)\n"
        "fastntk.ntk(model, c.draw(3, torch.float32), c.draw(2, torch.float32, seed=1), method='structured')\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_an_activation_written_over_later_is_no_link() -> None:
    """tanh's backward reads its output: an in-place ReLU over it later in the pass (seen by
    the version counters recorded as each op ran) leaves the model to autograd."""
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    written_over = capture(FunctionalModel.build(model), torch.randn(5, 3, dtype=torch.float64))
    assert written_over.chain is None
    model[2] = nn.ReLU()  # not in place: a chain
    assert capture(FunctionalModel.build(model), torch.randn(5, 3, dtype=torch.float64)).chain is not None
