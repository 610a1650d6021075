"""fastntk.linearize: the first-order Taylor expansion of a model, trainable like a module."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastntk
from conftest import CASES_BY_NAME, RTOL64

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
    from fastntk.reference import reference_jacobian

    model, x = model_and_inputs("mlp")
    model[0].bias.requires_grad_(False)  # a frozen parameter: neither trained nor expanded
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lin = fastntk.linearize(model)
    theta0 = [p.detach().clone() for p in lin.module.parameters()]
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
    trainable = [p.requires_grad for p in lin.module.parameters()]
    for p, p0, moved in zip(lin.module.parameters(), theta0, trainable):
        assert torch.equal(p, p0) != moved  # the trainable parameters moved, the frozen one did not
    assert all(torch.equal(b, p0) for b, p0 in zip(lin.initial().values(), [p for p, t in zip(theta0, trainable) if t]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    # still the first-order expansion around θ0 after training: f(θ0) + J(θ0)(θ − θ0)
    delta = torch.cat([(p.detach() - p0).reshape(-1) for p, p0 in zip(lin.module.parameters(), theta0)])
    jacobian = reference_jacobian(model.requires_grad_(True), x)  # (N, O, P), every parameter (δ = 0 for the frozen one)
    with torch.no_grad():
        torch.testing.assert_close(call(lin, x), call(model, x) + (jacobian @ delta).reshape(y.shape), rtol=1e-10, atol=1e-10)


# --- taylor_expand: degree 2 and the shared code path ---------------------------------------


def move(expanded: nn.Module, t: float, seed: int = 3) -> list[torch.Tensor]:
    """θ ← θ0 + t·δ for a fixed random direction δ (of the parameters' own scale); returns δ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        deltas = [torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in expanded.module.parameters()]
        for p, p0, d in zip(expanded.module.parameters(), expanded.initial().values(), deltas):
            p.copy_(p0 + t * d)
    return deltas


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_degree_two_equals_the_model_at_theta0_with_the_same_gradient(case: str, dtype: torch.dtype) -> None:
    """At θ0, δ = 0: the quadratic term and its gradient (linear in δ) vanish exactly."""
    from conftest import rtol

    c = CASES_BY_NAME[case]
    model, x = c.build(dtype), c.draw(4, dtype)
    quadratic = fastntk.taylor_expand(model, 2)
    assert isinstance(quadratic, fastntk.TaylorExpanded) and quadratic.degree == 2
    out, q_out = call(model, x), call(quadratic, x)
    tolerance = rtol(dtype) * out.abs().max().item()
    torch.testing.assert_close(q_out, out, rtol=0, atol=tolerance)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    grads = torch.autograd.grad((out * weights).sum(), [p for p in model.parameters() if p.requires_grad])
    q_grads = torch.autograd.grad((q_out * weights).sum(), [p for p in quadratic.module.parameters() if p.requires_grad])
    for g, h in zip(grads, q_grads):
        torch.testing.assert_close(h, g, rtol=0, atol=rtol(dtype) * max(g.abs().max().item(), 1e-30) + 1e-30)


def quadratic_in_parameters() -> nn.Module:
    """W2 (W1 x + b1) + b2: bilinear in (W1, b1) and W2, so exactly quadratic in θ."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2)).double()


def test_degree_two_is_exact_for_a_model_quadratic_in_its_parameters() -> None:
    model = quadratic_in_parameters()
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    quadratic, linear = fastntk.taylor_expand(model, 2), fastntk.taylor_expand(model, 1)
    move(quadratic, 1.0), move(linear, 1.0)  # a large step: no small-t argument
    moved = copy.deepcopy(model)
    move_model = fastntk.linearize(moved)  # the same θ0 + δ on a plain copy, read back as the model's parameters
    move(move_model, 1.0)
    exact = move_model.module(x)
    scale = exact.abs().max().item()
    assert (quadratic(x) - exact).abs().max().item() <= RTOL64 * scale
    assert (linear(x) - exact).abs().max().item() > 1e-3 * scale  # the linearisation is not: the test can fail


@pytest.mark.parametrize("case", ["tanh", "layernorm_gelu", "tuple_output", "multidim_output"])
def test_degree_two_error_shrinks_like_t_cubed(case: str) -> None:
    """e(t) = ‖f(θ0 + tδ) − f_2(θ0 + tδ)‖ = ‖c3 t³ + c4 t⁴ + …‖, so e(t)/e(t/2) = 8·(1 + O(t·‖c4‖/‖c3‖)).
    At t = 1e-3 with δ of unit scale the correction is ~1e-3 (c4/c3 = O(1) for these smooth nets:
    tanh, GELU, LayerNorm; a ReLU net's kinks crossed by the step break the expansion, so none
    here), and float64 rounding of f (~1e-16·|f|) is ~1e-7 of e(t) ≈ 1e-9·‖c3‖: the ratio is 8
    within 2%. The linearisation's ratio is 4 (t²), which the same bound rejects."""
    c = CASES_BY_NAME[case]
    model, x = c.build(torch.float64), c.draw(4, torch.float64)

    def error(degree: int, t: float) -> float:
        expanded = fastntk.taylor_expand(model, degree)
        move(expanded, t)
        with torch.no_grad():
            a, b = call(expanded, x), call(expanded.module, x)
            a, b = (torch.cat([o.reshape(-1) for o in v]) if isinstance(v, tuple) else v for v in (a, b))
            return (a - b).norm().item()

    t = 1e-3
    assert abs(error(2, t) / error(2, t / 2) / 8 - 1) < 0.02
    assert abs(error(1, t) / error(1, t / 2) / 4 - 1) < 0.02


def test_taylor_expand_of_degree_one_is_linearize_and_bad_degrees_are_refused() -> None:
    model, _ = model_and_inputs("mlp")
    assert type(fastntk.taylor_expand(model, 1)) is fastntk.Linearized
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(fastntk.OptionError, match="degree="):
            fastntk.taylor_expand(model, bad)


def test_ops_without_forward_mode_fall_back_to_reverse_mode_for_degree_one() -> None:
    """weight_norm's op has no forward-mode derivative (method="vp" refuses it): linearize falls
    back to a VJP of a VJP and is still the first-order expansion; degree 2 refuses, naming the op."""
    from fastntk.reference import reference_jacobian

    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(fastntk.ModelError, match="method='vp' needs forward-mode AD"):
        fastntk.ntk(model, x, method="vp")
    lin = fastntk.linearize(model)
    out, lin_out = model(x), lin(x)
    torch.testing.assert_close(lin_out, out, rtol=1e-12, atol=1e-12)
    w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for g, h in zip(torch.autograd.grad((out * w).sum(), list(model.parameters())), torch.autograd.grad((lin_out * w).sum(), list(lin.module.parameters()))):
        torch.testing.assert_close(h, g, rtol=1e-10, atol=1e-12)
    deltas = move(lin, 1e-2)
    expected = out.detach() + (reference_jacobian(model, x) @ torch.cat([1e-2 * d.reshape(-1) for d in deltas])).reshape(out.shape)
    torch.testing.assert_close(lin(x).detach(), expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(fastntk.ModelError, match=r"taylor_expand\(degree=2\) needs forward-mode AD.*_weight_norm_interface"):
        fastntk.taylor_expand(model, 2)(x)


def test_ops_with_neither_forward_mode_nor_double_backward_are_refused_naming_them() -> None:
    model = nn.Sequential(nn.EmbeddingBag(10, 4, mode="mean"), nn.Linear(4, 2))
    x = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(fastntk.ModelError, match="neither .*_embedding_bag.*method='jacobian'"):
        fastntk.linearize(model)(x)
    assert fastntk.ntk(model, x, method="jacobian").shape == (3, 3, 2, 2)


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated:FutureWarning")
def test_models_that_cannot_be_copied_are_refused_with_the_fix() -> None:
    model = nn.Sequential(nn.utils.weight_norm(nn.Linear(3, 4)))
    with pytest.raises(fastntk.ModelError, match="cannot be copied.*parametrizations.weight_norm"):
        fastntk.linearize(model)


def second_order_by_reverse_mode(model: nn.Module, x: object, deltas: list[torch.Tensor]) -> torch.Tensor:
    """f(θ0) + g'(0) + ½ g''(0) for g(t) = f(θ0 + tδ), the derivatives in t by reverse mode
    (an autograd Jacobian of an autograd Jacobian, one backward pass per output): an oracle
    sharing no code with the nested forward mode of taylor_expand."""
    from torch.func import functional_call

    theta0 = {name: p.detach() for name, p in model.named_parameters()}

    def path(t: torch.Tensor) -> torch.Tensor:
        params = {name: p + t * d for (name, p), d in zip(theta0.items(), deltas)}
        args, kwargs = ((), x) if isinstance(x, dict) else ((x,) if isinstance(x, torch.Tensor) else tuple(x), {})
        out = functional_call(model, params, args, kwargs)
        return torch.cat([o.reshape(-1) for o in (out if isinstance(out, tuple) else (out,))])

    from torch.nn.attention import SDPBackend, sdpa_kernel

    t0 = torch.zeros((), dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention has no double backward
        first = torch.autograd.functional.jacobian(path, t0)
        second = torch.autograd.functional.jacobian(lambda t: torch.autograd.functional.jacobian(path, t, create_graph=True), t0)
    return path(t0).detach() + first + second / 2


@pytest.mark.parametrize("case", ["mlp", "tanh", "layernorm_gelu", "tutorial_cnn", "token_dict", "tuple_output", "transformer"])
def test_degree_two_is_the_second_order_expansion(case: str) -> None:
    """After θ ← θ0 + δ: f(θ0) + Df[δ] + ½ D²f[δ, δ], against the reverse-mode oracle in float64.
    (LayerNorm in layernorm_gelu and the transformer: PyTorch's jvp-of-jvp of native_layer_norm
    is wrong, which the expansion avoids by computing norms from their definition.)"""
    c = CASES_BY_NAME[case]
    model, x = c.build(torch.float64), c.draw(4, torch.float64)
    quadratic = fastntk.taylor_expand(model, 2)
    deltas = [0.1 * d for d in move(quadratic, 0.1)]
    out = call(quadratic, x)
    flat = torch.cat([o.reshape(-1) for o in (out if isinstance(out, tuple) else (out,))]).detach()
    expected = second_order_by_reverse_mode(model, x, deltas)
    assert (flat - expected).abs().max().item() <= RTOL64 * expected.abs().max().item()


def test_norms_from_their_definition_equal_pytorchs() -> None:
    """The composite norms degree >= 2 runs on give PyTorch's values (running statistics too)."""
    import sys

    import torch.nn.functional as F

    norms = sys.modules["fastntk.linearize"].NormsFromTheirDefinition
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(4, 3, 5, dtype=torch.float64, generator=g), torch.rand(3, dtype=torch.float64, generator=g), torch.randn(3, dtype=torch.float64, generator=g)
    w5, b5 = torch.rand(5, dtype=torch.float64, generator=g), torch.randn(5, dtype=torch.float64, generator=g)
    calls = [
        lambda rm, rv: F.layer_norm(x, (5,), w5, b5, eps=1e-3),
        lambda rm, rv: F.layer_norm(x, [3, 5]),
        lambda rm, rv: F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3),
        lambda rm, rv: F.batch_norm(x, None, None, w, b, training=True),
        lambda rm, rv: F.instance_norm(x, weight=w, bias=b, eps=1e-4),
    ]
    for run in calls:
        stats = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
        ours_stats = [s.clone() for s in stats]
        expected = run(*stats)
        with norms():
            actual = run(*ours_stats)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
        for s, t in zip(ours_stats, stats):
            torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-12)
    with norms(), pytest.raises(fastntk.ModelError, match="InstanceNorm with track_running_stats"):
        F.instance_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("degree", [1, 2])
def test_a_model_with_nothing_trainable_expands_to_itself(degree: int) -> None:
    model, x = model_and_inputs("mlp")
    model.requires_grad_(False)
    expanded = fastntk.taylor_expand(model, degree)
    torch.testing.assert_close(call(expanded, x), call(model, x), rtol=0, atol=0)
    assert not list(expanded.initial())


@pytest.mark.parametrize("degree", [1, 2])
def test_outputs_with_leaves_that_are_not_floating_tensors(degree: int) -> None:
    """A Hugging Face GPT-2 returns a ModelOutput with a key/value cache (not a tensor) beside its
    logits, and fastntk.ntk takes it: the expansion expands the floating tensors (the logits), and
    passes the other leaves through as the model computed them at θ0."""
    transformers = pytest.importorskip("transformers", reason="needs the test extra: pip install -e .[test]")
    config = transformers.GPT2Config(vocab_size=7, n_embd=8, n_layer=1, n_head=2, n_positions=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    x = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(1))
    expanded = fastntk.taylor_expand(model, degree)
    out, exp_out = model(x), expanded(x)
    assert type(exp_out) is type(out) and exp_out.past_key_values is not None
    torch.testing.assert_close(exp_out.logits, out.logits, rtol=1e-12, atol=1e-12)
    w = torch.randn(out.logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out.logits * w).sum(), trained)
    exp_grads = torch.autograd.grad((exp_out.logits * w).sum(), [p for p in expanded.module.parameters() if p.requires_grad])
    for g, h in zip(grads, exp_grads):
        torch.testing.assert_close(h, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("degree", [1, 2])
def test_batchnorm_in_training_mode_normalises_by_the_batch_and_updates_its_statistics(degree: int) -> None:
    """A model in training mode (how a network with BatchNorm trains): at θ0 the expansion is the
    model, normalising by the batch's statistics, and its copy's running statistics advance as
    the model's do on the same batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).double()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expanded = fastntk.taylor_expand(model, degree)
    assert expanded.training
    lin_out = expanded(x)
    out = model(x)
    torch.testing.assert_close(lin_out, out, rtol=1e-12, atol=1e-12)
    for name, b in model.named_buffers():
        actual = expanded.module.get_buffer(name)
        assert type(actual) is torch.Tensor and not actual.requires_grad
        torch.testing.assert_close(actual, b, rtol=1e-12, atol=1e-12)
    assert int(expanded.module[1].num_batches_tracked) == 1
