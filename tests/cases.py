"""Architectures the exact methods are tested on, as data: a model factory and an input factory.

Every factory is seeded, so a case builds the same model and inputs every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastntk._inputs import Batch, map_leaves


@dataclass(frozen=True)
class Case:
    """A model and a way to draw n of its inputs."""

    name: str
    model: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], Batch]

    def build(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = self.model()
        return model.to(dtype)

    def draw(self, n: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> Batch:
        batch = self.inputs(n, torch.Generator().manual_seed(seed))
        return map_leaves(lambda t: t.to(dtype) if t.is_floating_point() else t, batch)


def normal(*shape: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda n, g: torch.randn(n, *shape, generator=g)


class ScalesItsInput(nn.Module):
    """Writes to its input in place (refused by every method, the caller's tensors left alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.lin(x)


class Residual(nn.Module):
    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.conv2(F.relu(self.conv1(x)))
        return self.head(F.relu(x).flatten(1))


class TokenModel(nn.Module):
    """Embedding + masked mean + MLP head; called as model(input_ids=..., attention_mask=...)."""

    def __init__(self, vocab: int = 11, dim: int = 6, outputs: int = 3, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, outputs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1).clamp_min(1))


def tokens(vocab: int = 11, length: int = 5) -> Callable[[int, torch.Generator], Batch]:
    def draw(n: int, g: torch.Generator) -> Batch:
        ids = torch.randint(0, vocab, (n, length), generator=g)
        ids[:, 0] = 1  # repeated indices across samples
        mask = torch.ones(n, length, dtype=torch.long)
        mask[:, -1] = torch.randint(0, 2, (n,), generator=g)
        return {"input_ids": ids, "attention_mask": mask}

    return draw


class TiedLM(nn.Module):
    """Input embedding and output projection share one weight."""

    def __init__(self, vocab: int = 7, dim: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(ids).mean(1))))


def frozen_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 2))
    model[2].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    return model


def batchnorm_eval() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    bn = model[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


class MultiDimOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).reshape(-1, 2, 3)


class TupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.a = nn.Linear(6, 2)
        self.b = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        return self.a(h), self.b(h)


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 13, dim: int = 8, outputs: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, outputs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


CASES: list[Case] = [
    Case("mlp", lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)), normal(6)),
    Case(
        "tutorial_cnn",
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 2 * 2, 3)),
        normal(3, 8, 8),
    ),
    Case("conv1d", lambda: nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(4 * 5, 2)), normal(2, 10)),
    Case("residual", Residual, normal(3, 6, 6)),
    Case("layernorm_gelu", lambda: nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3)), normal(5)),
    Case("tanh", lambda: nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 9), nn.Tanh(), nn.Linear(9, 2)), normal(4)),
    Case("token_dict", TokenModel, tokens()),
    Case("tied", TiedLM, lambda n, g: torch.randint(0, 7, (n, 4), generator=g)),
    Case("frozen", frozen_mlp, normal(5)),
    Case("batchnorm_eval", batchnorm_eval, normal(2, 6, 6)),
    Case("multidim_output", MultiDimOutput, normal(4)),
    Case("single_output", lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)), normal(3)),
    Case("tuple_output", TupleOutput, normal(4)),
    Case("transformer", lambda: TinyTransformer().eval(), lambda n, g: torch.randint(0, 13, (n, 5), generator=g)),
]

CASES_BY_NAME = {case.name: case for case in CASES}


class Shuffled(nn.Module):
    """Reverses the batch around a Linear: per-sample outputs are right, rows inside are not."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(x.flip(0)).flip(0)))


class DirectWeightUse(nn.Module):
    """Uses a Linear's weight both through the module and directly: its rule alone would miss a term."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x)) + x @ self.fc.weight.T)


class SharedLinear(nn.Module):
    """One Linear applied twice (positions concatenate) and a scale parameter no rule covers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale * self.fc(torch.tanh(self.fc(x))))


class SharedChain(nn.Module):
    """One Linear applied twice in a chain (its two uses merge), then a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.relu(self.shared(x)))))


class SequenceLinear(nn.Module):
    """Linear layers over (N, S, 8) sequences: the structured rule picks its form by S."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x)).mean(1))


class PaddedMean(nn.Module):
    """Convolutions around a reflection padding, then a mean over the positions: affine links of a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = torch.tanh(self.conv2(F.pad(y, (1, 1, 1, 1), mode="reflect")))
        return self.head(y.mean(dim=(-2, -1)))


class SumPositions(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(2, 3))


STRUCTURED_CASES: list[Case] = [
    Case("conv2d_options", lambda: nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)), normal(2, 7, 7)),
    Case("conv2d_groups", lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 2)), normal(4, 5, 5)),
    Case("depthwise_separable", lambda: nn.Sequential(nn.Conv2d(3, 3, 3, groups=3), nn.ReLU(), nn.Conv2d(3, 5, 1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 2)), normal(3, 6, 6)),
    Case("conv1d_dilated", lambda: nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2, padding=1, bias=False), nn.GELU(), nn.Flatten(), nn.Linear(3 * 8, 2)), normal(2, 10)),
    Case(  # padding="same" with even kernels (one more on the right), then a strided depthwise convolution
        "conv_same_even",
        lambda: nn.Sequential(nn.Conv2d(2, 3, (2, 4), padding="same"), nn.Tanh(), nn.Conv2d(3, 3, 3, stride=2, groups=3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 2)),
        normal(2, 6, 6),
    ),
    Case(  # average pooling, then global average pooling into a dense head
        "chain_pooled",
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
        ),
        normal(2, 8, 8),
    ),
    Case("padded_mean", PaddedMean, normal(2, 6, 6)),
    Case(  # a sum over positions (its adjoint is a broadcast view) between activations
        "summed",
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 4, 3), nn.ReLU(), SumPositions(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)),
        normal(2, 7, 7),
    ),
    Case("conv3d", lambda: nn.Sequential(nn.Conv3d(1, 2, 2, stride=(1, 2, 1)), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 2 * 3, 2)), normal(1, 4, 4, 4)),
    Case("groupnorm", lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)), normal(2, 5, 5)),
    Case("embedding_padding", lambda: TokenModel(padding_idx=0), tokens()),
    Case("sequence_short", SequenceLinear, normal(2, 8)),
    Case("sequence_long", SequenceLinear, normal(10, 8)),
    Case("shuffled_batch", Shuffled, normal(4)),
    Case("direct_weight_use", DirectWeightUse, normal(4)),
    Case("shared_linear_and_scale", SharedLinear, normal(4)),
    Case(  # a chain of dense layers (cotangents without autograd), one activation in place
        "chain_mlp",
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(6, 7), nn.ReLU(inplace=True), nn.Linear(7, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)),
        normal(2, 3),
    ),
    Case("chain_shared", SharedChain, normal(5)),
    Case(  # GELU and SiLU (derivatives from their inputs), dropout in eval mode
        "chain_gelu",
        lambda: nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 6), nn.SiLU(), nn.Dropout(0.2), nn.Linear(6, 3)).eval(),
        normal(5),
    ),
    Case(  # in-place ops write over the outputs of the layers the structured method records
        "inplace_relu",
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 3 * 3, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)),
        normal(2, 5, 5),
    ),
]

CASES_BY_NAME.update({case.name: case for case in STRUCTURED_CASES})
