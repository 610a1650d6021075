"""conv1d/2d/3d (stride, padding, dilation, groups): per-sample weight Jacobians Σ_s g_s ⊗ x_s.

The weight Jacobian of every (sample, output) pair is what a weight-gradient kernel
computes; it is obtained by vmapping the op's own weight VJP, so every convolution
option is handled exactly as PyTorch does.
"""

from __future__ import annotations

import torch
from torch.func import vjp, vmap

from ...._modes import Mode
from ..factors import Factor, JacobianFactor
from .base import Roles, Rule, Saved, position_sum


class ConvRule(Rule):
    functions = (torch.conv1d, torch.conv2d, torch.conv3d)
    arguments = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")

    def __init__(self, function) -> None:
        self.function = function
        self.functions = (function,)

    def save(self, call: dict, output: torch.Tensor) -> Saved:
        options = {k: call[k] for k in ("stride", "padding", "dilation", "groups") if k in call}
        weight = call["weight"]
        return {"input": call["input"].detach(), "weight": torch.zeros_like(weight.detach()), "options": options}

    def factors(self, saved: Saved, cotangents: torch.Tensor, roles: Roles, mode: Mode) -> dict[tuple[str, ...], Factor]:
        factors: dict[tuple[str, ...], Factor] = {}
        spatial = cotangents.dim() - 3
        if "weight" in roles:
            factors[(roles["weight"],)] = JacobianFactor(self.weight_jacobian(saved, cotangents))
        if "bias" in roles:
            factors[(roles["bias"],)] = JacobianFactor(position_sum(cotangents.movedim(2, -1), 1)) if spatial else JacobianFactor(cotangents)
        return factors

    def weight_jacobian(self, saved: Saved, cotangents: torch.Tensor) -> torch.Tensor:
        """(N, O, |W|): the weight gradient of each sample for each output's cotangent."""
        conv, options, zero = self.function, saved["options"], saved["weight"]

        def per_sample(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            _, pull = vjp(lambda w: conv(x.unsqueeze(0), w, None, **options), zero)
            return vmap(lambda c: pull(c.unsqueeze(0))[0])(g)

        n, o = cotangents.shape[:2]
        return vmap(per_sample)(saved["input"], cotangents).reshape(n, o, -1)
