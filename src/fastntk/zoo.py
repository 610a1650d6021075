"""Small built-in models and inputs, for the CLI default, the docs and the benchmarks.

Every constructor is seeded and leaves the global random state untouched: the
weights are drawn inside :func:`torch.random.fork_rng` after seeding only the CPU
generator, and the inputs come from a private :class:`torch.Generator`.

Example:
    >>> import fastntk
    >>> from fastntk import zoo
    >>> net = zoo.tutorial_cnn(seed=0)
    >>> x1, x2 = zoo.cifar_like_inputs(4, seed=1), zoo.cifar_like_inputs(2, seed=2)
    >>> fastntk.ntk(net, x1, x2).shape
    torch.Size([4, 2, 10, 10])
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch
from torch import nn

__all__ = ["TutorialCNN", "tutorial_cnn", "mlp", "cifar_like_inputs", "seeded"]

M = TypeVar("M", bound=nn.Module)


def seeded(build: Callable[[], M], seed: int) -> M:
    """``build()`` with torch's CPU generator seeded to ``seed``; the global RNG state is restored after.

    Only the CPU generator is seeded (not ``torch.manual_seed``, which would also queue a
    seed for CUDA generators), so modules must be built on the CPU.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build()


class TutorialCNN(nn.Module):
    """The CNN of PyTorch's "Neural Tangent Kernels" tutorial (torch.func), layer for layer.

    conv1 Conv2d(3, 32, 3×3) → ReLU → conv2 Conv2d(32, 32, 3×3) → ReLU →
    conv3 Conv2d(32, 32, 3×3) → flatten → fc Linear(21632, 10).

    Shapes: input (N, 3, 32, 32) → (N, 32, 30, 30) → (N, 32, 28, 28) → (N, 32, 26, 26)
    → (N, 21632) → output (N, 10). P = 235,722 parameters, O = 10 outputs.
    The attribute names match the tutorial, so its state_dicts load as they are.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, (3, 3))
        self.conv2 = nn.Conv2d(32, 32, (3, 3))
        self.conv3 = nn.Conv2d(32, 32, (3, 3))
        self.fc = nn.Linear(21632, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) images -> (N, 10) logits."""
        x = self.conv1(x)
        x = x.relu()
        x = self.conv2(x)
        x = x.relu()
        x = self.conv3(x)
        x = x.flatten(1)
        x = self.fc(x)
        return x


def tutorial_cnn(seed: int = 0) -> TutorialCNN:
    """The tutorial CNN (see :class:`TutorialCNN`) with PyTorch's default initialisation, seeded.

    Args:
        seed: seed of the weights; the same seed gives the same weights.

    Returns:
        A float32 CPU module mapping (N, 3, 32, 32) -> (N, 10), in training mode
        (it has no dropout or batch norm, so train and eval mode agree).
    """
    return seeded(TutorialCNN, seed)


def mlp(sizes: Sequence[int] = (784, 1024, 1024, 10), seed: int = 0) -> nn.Sequential:
    """A fully connected ReLU network with biases, seeded.

    ``sizes=(d0, d1, ..., dL)`` gives Linear(d0, d1) → ReLU → ... → ReLU → Linear(d(L-1), dL)
    (no activation after the last layer).

    Args:
        sizes: layer widths, input first; at least two positive integers.
        seed: seed of the weights.

    Returns:
        A float32 CPU ``nn.Sequential`` mapping (N, d0) -> (N, dL). The default
        (784, 1024, 1024, 10) has P = 1,863,690 parameters.

    Raises:
        ValueError: fewer than two sizes, or a size that is not a positive integer.
    """
    sizes = tuple(sizes)
    if len(sizes) < 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ValueError(f"sizes={sizes!r}: give at least two positive integer widths, input first, e.g. (784, 1024, 10)")

    def build() -> nn.Sequential:
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(d_in, d_out))
        return nn.Sequential(*layers)

    return seeded(build, seed)


def cifar_like_inputs(n: int, seed: int = 0) -> torch.Tensor:
    """n standard-normal CIFAR-shaped images, seeded; the global RNG is not used.

    Args:
        n: number of samples (>= 1).
        seed: seed of a private generator; the same (n, seed) gives the same tensor.

    Returns:
        A float32 CPU tensor of shape (n, 3, 32, 32).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r}: the number of samples must be a positive integer")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator, dtype=torch.float32)
