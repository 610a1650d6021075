"""fastntk.zoo: architectures, shapes, seeding, and the global RNG left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastntk import zoo


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tutorial_cnn_architecture():
    net = zoo.tutorial_cnn()
    assert [name for name, _ in net.named_children()] == ["conv1", "conv2", "conv3", "fc"]
    for name, c_in in (("conv1", 3), ("conv2", 32), ("conv3", 32)):
        conv = getattr(net, name)
        assert isinstance(conv, nn.Conv2d)
        assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (c_in, 32, (3, 3))
        assert conv.stride == (1, 1) and conv.padding == (0, 0) and conv.bias is not None
    assert isinstance(net.fc, nn.Linear) and (net.fc.in_features, net.fc.out_features) == (21632, 10)
    assert sum(p.numel() for p in net.parameters()) == 235_722
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in net.parameters())


def test_tutorial_cnn_forward_is_the_tutorial_network():
    net, x = zoo.tutorial_cnn(seed=3), zoo.cifar_like_inputs(2, seed=4)
    h = F.relu(F.conv2d(x, net.conv1.weight, net.conv1.bias))
    assert h.shape == (2, 32, 30, 30)
    h = F.relu(F.conv2d(h, net.conv2.weight, net.conv2.bias))
    assert h.shape == (2, 32, 28, 28)
    h = F.conv2d(h, net.conv3.weight, net.conv3.bias)  # no ReLU after conv3
    assert h.shape == (2, 32, 26, 26)
    expected = F.linear(h.flatten(1), net.fc.weight, net.fc.bias)
    out = net(x)
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, expected)


def test_tutorial_cnn_seeded_like_manual_seed():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        expected = zoo.TutorialCNN()
    assert same_weights(zoo.tutorial_cnn(seed=7), expected)


def test_mlp_default_architecture():
    net = zoo.mlp()
    kinds = [type(m) for m in net]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)] == [(784, 1024), (1024, 1024), (1024, 10)]
    assert all(m.bias is not None for m in net if isinstance(m, nn.Linear))
    assert sum(p.numel() for p in net.parameters()) == 1_863_690
    assert net(torch.zeros(3, 784)).shape == (3, 10)


@pytest.mark.parametrize("sizes, n_linear", [((5, 2), 1), ((5, 7, 3), 2), ([4, 8, 8, 8, 1], 4)])
def test_mlp_custom_sizes(sizes, n_linear):
    net = zoo.mlp(sizes, seed=1)
    assert sum(isinstance(m, nn.Linear) for m in net) == n_linear
    assert not isinstance(net[-1], nn.ReLU)
    assert net(torch.zeros(6, sizes[0])).shape == (6, sizes[-1])


@pytest.mark.parametrize("sizes", [(), (5,), (5, 0), (5, -1), (5, 2.0), (5, True)])
def test_mlp_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError, match="sizes"):
        zoo.mlp(sizes)


@pytest.mark.parametrize("build", [zoo.tutorial_cnn, lambda seed: zoo.mlp((6, 5, 2), seed=seed)], ids=["cnn", "mlp"])
def test_models_deterministic_per_seed(build):
    assert same_weights(build(seed=0), build(seed=0))
    assert same_weights(build(seed=5), build(seed=5))
    assert not same_weights(build(seed=0), build(seed=1))


def test_models_independent_of_global_rng():
    torch.manual_seed(123)
    a = zoo.tutorial_cnn(seed=2), zoo.mlp((6, 5, 2), seed=2)
    torch.manual_seed(999)
    torch.rand(17)
    b = zoo.tutorial_cnn(seed=2), zoo.mlp((6, 5, 2), seed=2)
    assert all(same_weights(x, y) for x, y in zip(a, b))


def test_cifar_like_inputs():
    x = zoo.cifar_like_inputs(4, seed=1)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert torch.equal(x, zoo.cifar_like_inputs(4, seed=1))
    assert not torch.equal(x, zoo.cifar_like_inputs(4, seed=2))
    big = zoo.cifar_like_inputs(200, seed=0)
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02  # standard normal


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_cifar_like_inputs_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n="):
        zoo.cifar_like_inputs(n, seed=0)


def test_global_rng_untouched():
    torch.manual_seed(42)
    state = torch.get_rng_state()
    zoo.tutorial_cnn(seed=0)
    zoo.mlp((6, 5, 2), seed=3)
    zoo.cifar_like_inputs(3, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    after = torch.rand(5)
    torch.manual_seed(42)
    assert torch.equal(after, torch.rand(5))
