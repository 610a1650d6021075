"""fastntk.linearize: the first-order Taylor expansion of a model, trainable like a module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastntk
from conftest import CASES_BY_NAME

CASES = ["mlp", "tutorial_cnn", "token_dict", "batchnorm_eval", "transformer"]


def model_and_inputs(case: str) -> tuple[nn.Module, object]:
    c = CASES_BY_NAME[case]
    return c.build(torch.float64), c.draw(4, torch.float64)


def call(model: nn.Module, x: object) -> torch.Tensor:
    if isinstance(x, dict):
        return model(**x)
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


@pytest.mark.parametrize("case", CASES)
def test_equals_the_model_at_theta0_with_the_same_gradient(case: str) -> None:
    model, x = model_and_inputs(case)
    lin = fastntk.linearize(model)
    out, lin_out = call(model, x), call(lin, x)
    torch.testing.assert_close(lin_out, out, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad((out * weights).sum(), [p for p in model.parameters() if p.requires_grad])
    lin_grads = torch.autograd.grad((lin_out * weights).sum(), [p for p in lin.module.parameters() if p.requires_grad])
    for g, h in zip(grads, lin_grads):
        torch.testing.assert_close(h, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["mlp", "tutorial_cnn"])
def test_is_the_first_order_taylor_expansion(case: str) -> None:
    """After moving θ by δ: f(θ0) + J δ, with J the float64 reference Jacobian; the model itself is untouched."""
    from fastntk.reference import reference_jacobian

    model, x = model_and_inputs(case)
    before = call(model, x).detach().clone()
    lin = fastntk.linearize(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        deltas = [1e-2 * torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in lin.module.parameters()]
        for p, d in zip(lin.module.parameters(), deltas):
            p.add_(d)
    jacobian = reference_jacobian(model, x)  # (N, O, P), parameters in model.named_parameters() order
    expected = before + (jacobian @ torch.cat([d.reshape(-1) for d in deltas])).reshape(before.shape)
    torch.testing.assert_close(call(lin, x).detach(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(call(model, x).detach(), before)  # the model keeps its parameters


def test_trains_like_a_module_and_stays_linear() -> None:
    """SGD on the linearised MLP: the loss falls, and the outputs stay affine in θ (the Taylor expansion)."""
    model, x = model_and_inputs("mlp")
    lin = fastntk.linearize(model)
    y = torch.randn(call(model, x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    optimiser = torch.optim.SGD(lin.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        optimiser.zero_grad()
        loss = ((call(lin, x) - y) ** 2).mean()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert [name for name, _ in lin.named_buffers() if name.startswith("initial_")]  # θ0 kept, not trained
    assert all(not b.requires_grad for b in lin.initial().values())
