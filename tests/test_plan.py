"""The cost model: estimates per method, the choice, and its printout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastntk
from cases import CASES_BY_NAME


def test_plan_estimates_every_method_and_chooses_the_cheapest() -> None:
    c = CASES_BY_NAME["mlp"]
    plan = fastntk.plan(c.build(), c.draw(6), c.draw(5, seed=2))
    assert set(plan.flops) == {"jacobian", "vp", "structured"}
    assert all(flops > 0 for flops in plan.flops.values())
    assert plan.chosen == min(plan.flops, key=plan.flops.get)
    assert (plan.n1, plan.n2, plan.num_outputs) == (6, 5, 3)


def test_structured_contraction_is_cheaper_than_jacobians_for_dense_layers() -> None:
    """For y = W x the pair form costs d_in + O² d_out per pair, Jacobians O² d_in d_out."""
    model = nn.Sequential(nn.Linear(50, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(8, 50)
    plan = fastntk.plan(model, x, x)
    assert plan.flops["structured"] < plan.flops["jacobian"]
    assert {g.kind for g in plan.groups} == {"pair"}


def test_trace_is_estimated_cheaper_than_full() -> None:
    c = CASES_BY_NAME["tutorial_cnn"]
    model, x = c.build(), c.draw(6)
    full, trace = fastntk.plan(model, x, mode="full"), fastntk.plan(model, x, mode="trace")
    assert trace.flops["jacobian"] < full.flops["jacobian"]
    assert trace.flops["structured"] < full.flops["structured"]


def test_fallback_groups_are_listed() -> None:
    c = CASES_BY_NAME["tied"]
    plan = fastntk.plan(c.build(), c.draw(4))
    assert [g.parameters for g in plan.groups if g.kind == "fallback"] == [("embed.weight",)]


def test_fixed_method_is_what_the_plan_reports_and_the_text_lists_all() -> None:
    c = CASES_BY_NAME["mlp"]
    fn = fastntk.ntk_fn(c.build(), method="vp")
    plan = fn.plan(c.draw(4))
    assert plan.chosen == "vp"
    text = str(plan)
    assert all(name in text for name in ("jacobian", "vp", "structured", "<- chosen"))


def test_plan_computes_no_kernel_and_calibrates_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan estimates from one forward pass on one sample: no backward pass, no check,
    no calibration (the engine's first block calibrates the chosen method)."""
    from fastntk.methods import StructuredMethod

    c = CASES_BY_NAME["tutorial_cnn"]
    model, x = c.build(), c.draw(6)
    expected = fastntk.plan(model, x, mode="trace")

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the plan ran a backward pass or a calibration")

    monkeypatch.setattr(torch.autograd, "grad", refuse)
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(StructuredMethod, "calibrated", refuse)
    plan = fastntk.plan(model, x, mode="trace")
    assert plan.flops == expected.flops and plan.chosen == expected.chosen == "structured"
