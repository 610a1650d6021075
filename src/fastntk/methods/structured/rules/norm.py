"""Affine weight and bias of LayerNorm, GroupNorm and BatchNorm in eval mode: y = x̂ ⊙ γ + β.

The Jacobians are Σ over positions of g ⊙ x̂ (for γ) and of g (for β), per channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ....reduction import Mode
from ..factors import Factor, JacobianFactor
from .base import Roles, Rule, Saved, position_sum


def affine_factors(normalized: torch.Tensor, cotangents: torch.Tensor, roles: Roles, channel_dims: int) -> dict[tuple[str, ...], Factor]:
    """Factors of y = x̂ ⊙ γ + β from x̂ (N, *positions, *channels) and g (N, O, same)."""
    factors: dict[tuple[str, ...], Factor] = {}
    if "weight" in roles:
        factors[(roles["weight"],)] = JacobianFactor(position_sum(cotangents * normalized.unsqueeze(1), channel_dims))
    if "bias" in roles:
        factors[(roles["bias"],)] = JacobianFactor(position_sum(cotangents, channel_dims))
    return factors


def channels_last(normalized: torch.Tensor, cotangents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the channel dim (1 of the input, 2 of the cotangents) last."""
    return normalized.movedim(1, -1), cotangents.movedim(2, -1)


class LayerNormRule(Rule):
    functions = (F.layer_norm,)
    arguments = ("input", "normalized_shape", "weight", "bias", "eps")

    def save(self, call: dict, output: torch.Tensor) -> Saved:
        shape = tuple(call["normalized_shape"])
        x = call["input"].detach()
        return {"normalized": F.layer_norm(x, shape, None, None, call.get("eps", 1e-5)), "dims": len(shape)}

    def factors(self, saved: Saved, cotangents: torch.Tensor, roles: Roles, mode: Mode, num_outputs: int) -> dict[tuple[str, ...], Factor]:
        return affine_factors(saved["normalized"], cotangents, roles, saved["dims"])


class GroupNormRule(Rule):
    functions = (F.group_norm,)
    arguments = ("input", "num_groups", "weight", "bias", "eps")

    def save(self, call: dict, output: torch.Tensor) -> Saved:
        x = call["input"].detach()
        return {"normalized": F.group_norm(x, call["num_groups"], None, None, call.get("eps", 1e-5))}

    def factors(self, saved: Saved, cotangents: torch.Tensor, roles: Roles, mode: Mode, num_outputs: int) -> dict[tuple[str, ...], Factor]:
        return affine_factors(*channels_last(saved["normalized"], cotangents), roles, channel_dims=1)


class BatchNormEvalRule(Rule):
    functions = (F.batch_norm,)
    arguments = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")

    def parameters(self, call: dict) -> dict[str, torch.Tensor] | None:
        if call.get("training", False) or call.get("running_mean") is None:
            return None  # batch statistics: refused earlier, never structured
        return super().parameters(call)

    def save(self, call: dict, output: torch.Tensor) -> Saved:
        x = call["input"].detach()
        mean, var = call["running_mean"].detach(), call["running_var"].detach()
        return {"normalized": F.batch_norm(x, mean, var, None, None, False, 0.0, call.get("eps", 1e-5))}

    def factors(self, saved: Saved, cotangents: torch.Tensor, roles: Roles, mode: Mode, num_outputs: int) -> dict[tuple[str, ...], Factor]:
        return affine_factors(*channels_last(saved["normalized"], cotangents), roles, channel_dims=1)
