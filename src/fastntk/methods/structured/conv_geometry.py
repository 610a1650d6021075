"""How a convolution call is laid out (stride, padding, dilation, groups), read once from its arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
"""The arguments of torch.conv1d/2d/3d, in order."""
TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def as_tuple(value: int | tuple[int, ...] | list[int], dims: int) -> list[int]:
    """A per-spatial-dim list from an int or a sequence."""
    return [value] * dims if isinstance(value, int) else list(value)


def same_padding(kernel: list[int], dilation: list[int]) -> list[int]:
    """F.pad widths (last dim first) that make padding="same" explicit; the extra one goes right."""
    widths: list[int] = []
    for k, d in zip(reversed(kernel), reversed(dilation)):
        total = d * (k - 1)
        widths += [total // 2, total - total // 2]
    return widths


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's options as per-dim lists; ``pad``: F.pad widths (last dim first) that
    padding="same" puts around the input before a convolution with ``padding`` 0 (else empty)."""

    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    pad: list[int]

    @staticmethod
    def of(call: Mapping[str, Any]) -> "ConvGeometry":
        """From a call's bound arguments (see ARGUMENTS)."""
        weight = call["weight"]
        dims = weight.dim() - 2
        dilation = as_tuple(call.get("dilation", 1), dims)
        padding = call.get("padding", 0)
        pad: list[int] = []
        if isinstance(padding, str):
            if padding == "same":
                pad = same_padding(list(weight.shape[2:]), dilation)
            padding = 0
        return ConvGeometry(as_tuple(call.get("stride", 1), dims), as_tuple(padding, dims), dilation, call.get("groups", 1), pad)

    def input_cotangents(self, g: torch.Tensor, weight: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
        """The cotangents of the input (B, *input_shape) from those of the output g (B, C_out, ...):
        the transposed convolution, its output padding restoring what the forward's strides
        dropped (no stand-in input to fill, as the convolution's own backward would)."""
        dims = weight.dim() - 2
        padded = list(input_shape[1:])
        for i in range(len(self.pad) // 2):
            padded[-1 - i] += self.pad[2 * i] + self.pad[2 * i + 1]
        kernel, out = weight.shape[2:], g.shape[2:]
        output_padding = [
            size - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, o, s, p, d, k in zip(padded, out, self.stride, self.padding, self.dilation, kernel)
        ]
        grad = TRANSPOSED[dims](g, weight, None, self.stride, self.padding, output_padding, self.groups, self.dilation)
        for i in range(len(self.pad) // 2):  # crop what padding="same" added
            grad = grad.narrow(grad.dim() - 1 - i, self.pad[2 * i], input_shape[-1 - i])
        return grad
