"""The differential fuzzer across the library's size thresholds, and one known model per special path.

The fuzzer's models are tiny, so size thresholds (outputs per backward pass, conv weight
Jacobians by patches or by the grouped weight backward, oneDNN for big products) would
leave one side of each unfuzzed. Here each example also draws a threshold setting of
:data:`special_paths.THRESHOLDS` ("shipped", "low": every model above every threshold, "high":
below) and runs the fuzzer's oracle with those constants set. The deterministic tests below
build one known model per path and side, check that the side ran (by a counting spy) and
that the kernel matches the float64 reference.

Each example runs three combinations of the structured and auto methods (one in trace mode
for a compact tail; no reuse check). Environment: FASTNTK_FUZZ_THRESHOLD_EXAMPLES (default 30)
and FASTNTK_FUZZ_SHRINK (as in test_fuzz); ``python tests/fuzz/special_paths.py`` counts the
sides each run reaches.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fastntk import _gemm

from conftest import DTYPES
from differential import Checker, Combo, check_model, combos_of
from grammar import Spec, build, compact_tail, draw_inputs, selection, specs
from special_paths import THRESHOLDS, counting, modules, thresholds

EXAMPLES = int(os.environ.get("FASTNTK_FUZZ_THRESHOLD_EXAMPLES", "30"))
SHRINK = os.environ.get("FASTNTK_FUZZ_SHRINK", "0") == "1"
THRESHOLD_COMBOS = combos_of(methods=("structured", "auto"))
"""The thresholds are the structured method's (and the products every method contracts with)."""


@settings(
    max_examples=EXAMPLES, deadline=None, database=None, phases=tuple(Phase) if SHRINK else [Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(
    data=st.data(), family=st.sampled_from(["conv", "dense"]), setting=st.sampled_from(sorted(THRESHOLDS)),
    dtype=st.sampled_from(DTYPES), chosen=st.lists(st.sampled_from(THRESHOLD_COMBOS), min_size=3, max_size=3, unique=True),
)
def test_every_threshold_setting_matches_the_reference(
    data: st.DataObject, family: str, setting: str, dtype: torch.dtype, chosen: list[Combo]
) -> None:
    spec = data.draw(specs(family), label="spec")
    if compact_tail(spec) and not any(c.mode == "trace" for c in chosen):
        chosen = [*chosen[1:], Combo(chosen[0].method, "trace", chosen[0].gram, chosen[0].chunk)]
    model = build(spec, dtype)
    x1, x2 = draw_inputs(spec, spec.n1, 1, dtype), draw_inputs(spec, spec.n2, 2, dtype)
    with thresholds(setting):
        check_model(model, x1, x2, selection(spec, model), chosen)


# ----------------------------------------------------------------------------------------- one model per path

F32 = torch.float32
DENSE_TAIL = Spec("dense", (3,), "tensor", (("linear", 5, True, False), ("act", "tanh")), "linear", 3, (), None, False, 4, 3, 1)
"""Linear -> tanh -> output Linear: the compact rows of trace mode (RowsPairFactor)."""
CONV_2D = Spec("conv", (2, 5, 5), "tensor", (("conv", 2, 4, 3, 1, 1, 1, 1, True, "zeros"), ("act", "relu")), "linear", 3, (), None, False, 4, 3, 2)
"""A 2-d convolution (C_in·k = 18 inputs per output channel) and a 3-output head."""


def run(spec: Spec, setting: str, combos: list[Combo], dtype: torch.dtype = F32) -> dict:
    """Check ``combos`` on the spec's model under ``setting``; return the spies' counts."""
    model = build(spec, dtype)
    checker = Checker(model, draw_inputs(spec, spec.n1, 1, dtype), draw_inputs(spec, spec.n2, 2, dtype), selection(spec, model))
    with thresholds(setting), counting() as count:
        for combo in combos:
            checker.check(combo)
    checker.raise_first()
    return dict(count)


def test_compact_rows_in_trace_mode() -> None:
    count = run(DENSE_TAIL, "shipped", [Combo("structured", "trace", gram, "default") for gram in (True, False)])
    assert count.get("rows_trace", 0) > 0, count


@pytest.mark.parametrize(("setting", "side"), [("low", "conv_grouped"), ("high", "conv_patches"), ("shipped", "conv_patches")])
def test_conv_weight_jacobians_on_each_side_of_small_patch(setting: str, side: str) -> None:
    count = run(CONV_2D, setting, [Combo("structured", "full", False, "default"), Combo("structured", "diagonal", True, "2")])
    assert count.get(side, 0) > 0, count


@pytest.mark.parametrize(("setting", "sides"), [
    ("low", ("chunk_bound", "small_passes_above")), ("high", ("chunk_all_outputs", "small_passes_below")),
])
def test_outputs_per_pass_on_each_side_of_chunk_bytes_and_small_passes(setting: str, sides: tuple[str, ...]) -> None:
    count = run(CONV_2D, setting, [Combo("structured", "full", False, "default"), Combo("structured", "trace", True, "1")])
    count.update(run(DENSE_TAIL, setting, [Combo("structured", "full", False, "default")]))
    method = modules()["method"]
    present = [side for side, name in zip(sides, ("CHUNK_BYTES", "SMALL_PASSES")) if hasattr(method, name)]
    assert all(count.get(side, 0) > 0 for side in present), count


@pytest.mark.skipif(not _gemm.onednn_available(), reason="this PyTorch has no oneDNN linear op (tests/test_torch_private.py covers its fallback)")
@pytest.mark.parametrize(("dtype", "side"), [(torch.float32, "mm_onednn"), (torch.float64, "mm_pytorch")])
def test_library_products_on_onednn_and_on_pytorch(dtype: torch.dtype, side: str) -> None:
    """float32 CPU products of the contractions go to oneDNN, others stay PyTorch's."""
    count = run(DENSE_TAIL, "shipped", [Combo(m, mode, False, "default") for m in ("structured", "jacobian") for mode in ("full", "trace")], dtype)
    assert count.get(side, 0) > 0, count


@pytest.mark.parametrize(("setting", "blocks"), [("low", 3), ("high", 1)])
def test_gram_in_memory_on_each_side_of_gram_halves_min(setting: str, blocks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below GRAM_HALVES_MIN a Gram matrix in memory is one block; at or above it, two halves
    (3 blocks computed, the fourth mirrored); the oracle checks both."""
    from fastntk import _api

    seen: list[int] = []
    original = _api.run
    monkeypatch.setattr(_api, "run", lambda kernel, mine, *args, **kwargs: seen.append(len(mine)) or original(kernel, mine, *args, **kwargs))
    run(DENSE_TAIL, setting, [Combo(m, mode, True, "default") for m in ("structured", "jacobian") for mode in ("full", "trace")])
    assert seen and set(seen) == {blocks}, seen
