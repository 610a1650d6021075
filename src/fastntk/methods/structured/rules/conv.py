"""conv1d/2d/3d (stride, padding, dilation, groups): per-sample weight Jacobians Σ_s g_s ⊗ x_s.

The weight Jacobian of every (sample, output) pair is what a weight-gradient kernel
computes. One call of the convolution's own weight backward per output computes them for
all samples: the samples become groups, so their gradients are not summed. When each
output channel sees only a few inputs (C_in/groups · kernel size <= SMALL_PATCH, e.g. a
first layer on RGB images or a depthwise convolution), 1d/2d convolutions use the input's
patches (im2col) and batched GEMMs instead: oneDNN's grouped weight-gradient kernel for
so few channels per group is slow, and its first call in a process has a set-up cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ....reduction import Mode
from ...._torch_private import convolution_weight_grad
from ..conv_geometry import ARGUMENTS, ConvGeometry
from ..factors import Factor, JacobianFactor
from .base import Roles, Rule, Saved


SMALL_PATCH = 32
"""Inputs per output channel (C_in/groups · kernel size) up to which 1d/2d convolutions use patches."""


def saved_geometry(call: dict) -> Saved:
    """The call's input (padded explicitly for padding="same") and its options as per-dim lists."""
    x = call["input"].detach()
    geometry = ConvGeometry.of(call)
    if geometry.pad:
        x = F.pad(x, geometry.pad)
    return {
        "input": x,
        "weight_shape": call["weight"].shape,
        "stride": geometry.stride,
        "padding": geometry.padding,
        "dilation": geometry.dilation,
        "groups": geometry.groups,
    }


def uses_patches(saved: Saved) -> bool:
    """Whether this convolution's weight Jacobians come from patches (1d/2d, few inputs per channel)."""
    return saved["input"].dim() <= 4 and saved["weight_shape"][1:].numel() <= SMALL_PATCH


def conv_weight_jacobian(saved: Saved, g: torch.Tensor) -> torch.Tensor:
    """(N, O, |W|) from the saved call and cotangents g (N, O, C_out, *spatial_out)."""
    if uses_patches(saved):
        if "patches" not in saved:  # once per block, shared by every chunk of outputs
            saved["patches"] = input_patches(saved)
        return patch_weight_jacobian(saved["patches"], g)
    return grouped_weight_jacobian(saved, g)


def input_patches(saved: Saved) -> torch.Tensor:
    """The 1d/2d input's patches (im2col) per group: (N, G, C_in/G·k, L)."""
    x, kernel = saved["input"], list(saved["weight_shape"][2:])
    stride, padding, dilation = saved["stride"], saved["padding"], saved["dilation"]
    if x.dim() == 3:  # 1d as 2d with a height of one
        x, kernel, stride, padding, dilation = x.unsqueeze(2), [1, *kernel], [1, *stride], [0, *padding], [1, *dilation]
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.reshape(x.shape[0], saved["groups"], -1, patches.shape[-1])


def patch_weight_jacobian(patches: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The Jacobians from patches (N, G, C_in/G·k, L) and g (N, O, C_out, L): GEMMs per (sample,
    group), one output at a time, computed as patches @ gᵀ (MKL runs that orientation faster
    than g @ patchesᵀ on a first layer's shapes: ``bench/gemm.py``) and transposed into place."""
    n, o, c_out = g.shape[:3]
    groups, width = patches.shape[1:3]
    flat = patches.reshape(n * groups, width, -1)
    jacobian = g.new_empty(n, o, groups, c_out // groups, width)
    for a in range(o):
        grad = g[:, a].reshape(n * groups, c_out // groups, -1)
        jacobian[:, a].copy_(torch.bmm(flat, grad.transpose(1, 2)).view(n, groups, width, -1).transpose(-1, -2))
    return jacobian.reshape(n, o, -1)


def grouped_weight_jacobian(saved: Saved, g: torch.Tensor) -> torch.Tensor:
    """The Jacobians by the convolution's weight backward, one call per output with a group per
    (sample, group): each output's cotangents are read in place (output-major, as computed)
    and the result is output-major too."""
    x, weight_shape, groups = saved["input"], saved["weight_shape"], saved["groups"]
    n, o, c_out = g.shape[:3]
    inputs = x.reshape(1, -1, *x.shape[2:])
    jacobian = torch.empty(o, n, weight_shape.numel(), dtype=g.dtype, device=g.device)
    for a in range(o):
        # channels ordered (sample, group, channel-in-group): one group per (sample, group)
        grad = g[:, a].reshape(1, n * c_out, *g.shape[3:])
        grad_weight = convolution_weight_grad(
            grad, inputs, (n * c_out, *weight_shape[1:]), saved["stride"], saved["padding"], saved["dilation"], n * groups
        )
        jacobian[a] = grad_weight.reshape(n, -1)
    return jacobian.transpose(0, 1)


class ConvRule(Rule):
    arguments = ARGUMENTS

    def __init__(self, function) -> None:  # noqa: ANN001
        self.functions = (function,)

    def save(self, call: dict, output: torch.Tensor) -> Saved:
        return saved_geometry(call)

    def factors(self, saved: Saved, cotangents: torch.Tensor, roles: Roles, mode: Mode, num_outputs: int) -> dict[tuple[str, ...], Factor]:
        factors: dict[tuple[str, ...], Factor] = {}
        if "weight" in roles:
            factors[(roles["weight"],)] = JacobianFactor(conv_weight_jacobian(saved, cotangents))
        if "bias" in roles:
            factors[(roles["bias"],)] = JacobianFactor(cotangents.flatten(3).sum(3))  # Σ over positions
        return factors
