"""F.embedding: y_s = E[i_s]. The key Gram compares indices; no one-hot Jacobian is formed."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from ....reduction import Mode
from ..factors import Factor, FactorShape, PairFactor
from .base import Roles, Rule, Saved


class EmbeddingRule(Rule):
    functions = (F.embedding,)
    arguments = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")

    def parameters(self, call: dict) -> dict[str, torch.Tensor] | None:
        if call.get("max_norm") is not None or call.get("scale_grad_by_freq"):
            return None  # renormalised rows / frequency-scaled gradients: left to the Jacobian fallback
        return {"weight": call["weight"]}

    def save(self, call: dict, output: torch.Tensor) -> Saved:
        indices = call["input"].detach()
        padding = call.get("padding_idx")
        if padding is not None and padding < 0:
            padding += call["weight"].shape[0]
        return {"indices": indices.reshape(indices.shape[0], -1), "padding": padding}

    def factor_shapes(self, saved: Saved, output: torch.Tensor, roles: Roles, sizes: Mapping[str, int], mode: Mode, num_outputs: int) -> dict[tuple[str, ...], FactorShape]:
        positions = saved["indices"].shape[1]
        return {(roles["weight"],): FactorShape("pair", 1, positions, output[0].numel() // positions, key_kind="index")}

    def factors(self, saved: Saved, cotangents: torch.Tensor, roles: Roles, mode: Mode, num_outputs: int) -> dict[tuple[str, ...], Factor]:
        indices, padding = saved["indices"], saved["padding"]
        n, o = cotangents.shape[:2]
        g = cotangents.reshape(n, o, indices.shape[1], -1)
        if padding is not None:  # the padding row gets no gradient
            g = g * (indices != padding).to(g.dtype)[:, None, :, None]
        return {(roles["weight"],): PairFactor(indices, g, "index", plus_one=False)}
