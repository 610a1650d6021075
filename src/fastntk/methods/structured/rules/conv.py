"""conv1d/2d/3d (stride, padding, dilation, groups): per-sample weight Jacobians Σ_s g_s ⊗ x_s.

The weight Jacobian of every (sample, output) pair is what a weight-gradient kernel
computes. One call of the convolution's own weight backward computes all of them: the
samples become groups (so their gradients are not summed) and the O cotangents of a sample
become extra output channels of its group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...._modes import Mode
from ..factors import Factor, JacobianFactor
from .base import Roles, Rule, Saved, position_sum


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


def conv_weight_jacobian(x: torch.Tensor, g: torch.Tensor, weight_shape: torch.Size, options: dict) -> torch.Tensor:
    """(N, O, |W|) from inputs x (N, C_in, *spatial) and cotangents g (N, O, C_out, *spatial_out)."""
    n, o, c_out = g.shape[:3]
    dims = x.dim() - 2
    groups = options.get("groups", 1)
    kernel = list(weight_shape[2:])
    stride = as_tuple(options.get("stride", 1), dims)
    dilation = as_tuple(options.get("dilation", 1), dims)
    padding = options.get("padding", 0)
    if isinstance(padding, str):
        if padding == "same":
            x = F.pad(x, same_padding(kernel, dilation))
        padding = 0
    padding = as_tuple(padding, dims)
    per_group = c_out // groups
    # output channels ordered (sample, group, output, channel-in-group); one group per (sample, group)
    grad = g.reshape(n, o, groups, per_group, *g.shape[3:]).transpose(1, 2).reshape(1, n * groups * o * per_group, *g.shape[3:])
    weight = x.new_zeros(()).expand(n * groups * o * per_group, weight_shape[1], *kernel)  # only its shape is read
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, x.reshape(1, -1, *x.shape[2:]), weight, None, stride, padding, dilation,
        False, [0] * dims, n * groups, [False, True, False],
    )
    return grad_weight.reshape(n, groups, o, per_group, -1).transpose(1, 2).reshape(n, o, -1)


class ConvRule(Rule):
    arguments = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")

    def __init__(self, function) -> None:  # noqa: ANN001
        self.functions = (function,)

    def save(self, call: dict, output: torch.Tensor) -> Saved:
        options = {k: call[k] for k in ("stride", "padding", "dilation", "groups") if k in call}
        return {"input": call["input"].detach(), "weight_shape": call["weight"].shape, "options": options}

    def factors(self, saved: Saved, cotangents: torch.Tensor, roles: Roles, mode: Mode, num_outputs: int) -> dict[tuple[str, ...], Factor]:
        factors: dict[tuple[str, ...], Factor] = {}
        if "weight" in roles:
            jacobian = conv_weight_jacobian(saved["input"], cotangents, saved["weight_shape"], saved["options"])
            factors[(roles["weight"],)] = JacobianFactor(jacobian)
        if "bias" in roles:
            factors[(roles["bias"],)] = JacobianFactor(position_sum(cotangents.movedim(2, -1), 1))
        return factors
