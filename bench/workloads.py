"""The benchmark workloads (BENCHMARKS.md) plus our own extra ones, as data.

A workload is a model architecture (``arch``, a key of ``MODELS``; the same
key tells ``bench/nt_worker.py`` which JAX function to build), the input
shapes, the kernel mode and whether x2 is given.  Models are built with a
seeded torch initialisation in float32; inputs are fixed-seed standard
normal float32 (or fixed-seed integer token ids for token models).

Nothing here is known to the library: these are ordinary ``nn.Module``s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fastntk import zoo

MODEL_SEED = 0
X1_SEED = 1
X2_SEED = 2


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN + (projected) skip, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(x)).relu()
        y = self.bn2(self.conv2(y))
        return (y + self.down(x)).relu()


class SmallResNet(nn.Module):
    """CIFAR-shaped ResNet: stem 16 ch, blocks 16->16 and 16->32 (stride 2),
    global average pool, Linear(32, 10).  BatchNorm in eval mode with
    non-trivial running statistics and affine parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.block1 = BasicBlock(16, 16, 1)
        self.block2 = BasicBlock(16, 32, 2)
        self.fc = nn.Linear(32, 10)
        gen = torch.Generator().manual_seed(MODEL_SEED + 100)
        for mod in self.modules():
            if isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                mod.running_var.copy_(1.0 + 0.5 * torch.rand(c, generator=gen))
                with torch.no_grad():
                    mod.weight.copy_(1.0 + 0.1 * torch.randn(c, generator=gen))
                    mod.bias.copy_(0.1 * torch.randn(c, generator=gen))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x)).relu()
        x = self.block2(self.block1(x))
        return self.fc(x.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Token + learned position embedding, 2-layer nn.TransformerEncoder
    (d_model 64, 4 heads, ffn 128, post-norm, eval), mean-pool, Linear(64, 10)."""

    def __init__(self, vocab: int = 100, seq: int = 16, d_model: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, seq, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=128, dropout=0.1, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 10)
        self.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(ids) + self.pos)
        return self.head(h.mean(dim=1))


def depthwise_separable_cnn() -> nn.Module:
    """Two depthwise-separable blocks (3x3 depthwise + 1x1 pointwise), pool, Linear."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 64, 1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=64), nn.Conv2d(64, 64, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


class EmbeddingBagModel(nn.Module):
    """Embedding(1000, 64), mean over the bag, Linear(64, 10)."""

    def __init__(self, vocab: int = 1000, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(ids).mean(dim=1))


#: arch key -> factory.  nt_worker.py has a JAX twin for each key.
MODELS: dict[str, Callable[[], nn.Module]] = {
    "tutorial-cnn": zoo.TutorialCNN,  # seeded by Workload.build_model, as the others
    "mlp": lambda: zoo.mlp(seed=MODEL_SEED),
    "resnet-bn": SmallResNet,
    "transformer": TinyTransformer,
    "dwsep-cnn": depthwise_separable_cnn,
    "embedding-bag": EmbeddingBagModel,
}

#: arch key -> vocabulary size for models that take integer token ids.
TOKEN_VOCAB: dict[str, int] = {"transformer": 100, "embedding-bag": 1000}


# --------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One benchmark workload."""

    name: str
    arch: str
    x1_shape: tuple[int, ...]
    x2_shape: tuple[int, ...] | None  # None: Gram matrix K(x1, x1)
    mode: str  # "full" | "trace" | "diagonal"
    extra: bool = False

    def build_model(self) -> nn.Module:
        """The model, initialised from a fixed seed, float32, eval mode."""
        torch.manual_seed(MODEL_SEED)
        return MODELS[self.arch]().float().eval()

    def make_input(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """Fixed-seed standard normal float32, or token ids for token models."""
        gen = torch.Generator().manual_seed(seed)
        if self.arch in TOKEN_VOCAB:
            return torch.randint(0, TOKEN_VOCAB[self.arch], shape, generator=gen)
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    def build(self) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
        """(model, x1, x2); x2 is None for a Gram workload."""
        x1 = self.make_input(self.x1_shape, X1_SEED)
        x2 = None if self.x2_shape is None else self.make_input(self.x2_shape, X2_SEED)
        return self.build_model(), x1, x2

    def fingerprint(self) -> str:
        """Identifies the cached data and reference of this workload."""
        return f"v1|{self.name}|{self.arch}|{self.x1_shape}|{self.x2_shape}|{self.mode}"


CIFAR = (3, 32, 32)

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("seed-cnn-full", "tutorial-cnn", (20, *CIFAR), (5, *CIFAR), "full"),
        Workload("seed-cnn-trace", "tutorial-cnn", (20, *CIFAR), (5, *CIFAR), "trace"),
        Workload("seed-cnn-gram", "tutorial-cnn", (64, *CIFAR), None, "trace"),
        Workload("mlp-full", "mlp", (64, 784), (64, 784), "full"),
        Workload("mlp-gram-trace", "mlp", (512, 784), None, "trace"),
        # extra workloads of our own (run with --extra)
        Workload("resnet-bn-full", "resnet-bn", (16, *CIFAR), (8, *CIFAR), "full", True),
        Workload("transformer-gram-trace", "transformer", (32, 16), None, "trace", True),
        # XLA's CPU grouped-conv derivatives are slow (nt-jac/nt-vp ~100 s per
        # call at 16+8 CIFAR images): small images keep the pair in minutes.
        Workload("dwsep-cnn-diag", "dwsep-cnn", (8, 3, 16, 16), (4, 3, 16, 16), "diagonal", True),
        Workload("embedding-bag-full", "embedding-bag", (64, 16), (32, 16), "full", True),
    ]
}


def selected(names: list[str] | None, extra: bool) -> list[Workload]:
    """Workloads by name (in the given order), or the default set (+ extras)."""
    if names:
        unknown = [n for n in names if n not in WORKLOADS]
        if unknown:
            raise KeyError(f"unknown workloads {unknown}; known: {list(WORKLOADS)}")
        return [WORKLOADS[n] for n in names]
    return [w for w in WORKLOADS.values() if extra or not w.extra]
