"""F.linear: y = x Wᵀ + b at S positions (every leading dimension of x between batch and features)."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from ....reduction import Mode
from ..chain import RowsCotangents
from ..factors import Factor, FactorShape, JacobianFactor, PairFactor, RowsPairFactor
from .base import Roles, Rule, Saved, position_sum


def pair_is_cheaper(positions: int, d_in: int, d_out: int, outputs: int, mode: Mode) -> bool:
    """Position-pair form vs materialised per-sample Jacobians, by FLOPs per pair of samples.

    Pair form: S² (d_in + O^k d_out); Jacobian: O^k d_in d_out, with k = 2 for full, 1 otherwise.
    """
    k = 2 if mode == "full" else 1
    return positions**2 * (d_in + outputs**k * d_out) <= outputs**k * d_in * d_out


def weight_group(weight: str, bias: str | None) -> tuple[str, ...]:
    """The group of a weight whose bias's Jacobian is folded into its input Gram (the "+ 1")."""
    return (weight,) if bias is None else (weight, bias)


def linear_factors(keys: torch.Tensor, cotangents: torch.Tensor, roles: Roles, mode: Mode, num_outputs: int) -> dict[tuple[str, ...], Factor]:
    """Factors of y_s = W k_s (+ b) from keys (N, S, d_in) and cotangents (N, K, S, d_out)."""
    n, o, s, e = cotangents.shape
    weight, bias = roles.get("weight"), roles.get("bias")
    if weight is None:
        return {(bias,): JacobianFactor(position_sum(cotangents, 1))}
    if pair_is_cheaper(s, keys.shape[-1], e, num_outputs, mode):
        # one GEMM over O·e per trace contraction of a dense layer: sample-major cotangents
        return {weight_group(weight, bias): PairFactor(keys, cotangents, "dot", plus_one=bias is not None, sample_major=mode == "trace" and s == 1)}
    jacobian = torch.einsum("nase,nsd->naed", cotangents, keys).reshape(n, o, -1)
    if bias is None:
        return {(weight,): JacobianFactor(jacobian)}
    return {(weight, bias): JacobianFactor(torch.cat([jacobian, position_sum(cotangents, 1)], dim=2))}


class LinearRule(Rule):
    functions = (F.linear,)
    arguments = ("input", "weight", "bias")

    def groups(self, roles: Roles) -> list[tuple[str, ...]]:
        if "weight" in roles and "bias" in roles:
            return [(roles["weight"], roles["bias"])]
        return super().groups(roles)

    def save(self, call: dict, output: torch.Tensor) -> Saved:
        x = call["input"]
        return {"keys": x.detach().reshape(x.shape[0], -1, x.shape[-1])}

    def factor_shapes(self, saved: Saved, output: torch.Tensor, roles: Roles, sizes: Mapping[str, int], mode: Mode, num_outputs: int) -> dict[tuple[str, ...], FactorShape]:
        _, s, d = saved["keys"].shape
        e = output.shape[-1]
        weight, bias = roles.get("weight"), roles.get("bias")
        if weight is not None and pair_is_cheaper(s, d, e, num_outputs, mode):
            return {weight_group(weight, bias): FactorShape("pair", d, s, e, plus_one=bias is not None)}
        return super().factor_shapes(saved, output, roles, sizes, mode, num_outputs)

    def rows_factors(self, saved: Saved, cotangents: RowsCotangents, roles: Roles, mode: Mode, num_outputs: int) -> dict[tuple[str, ...], Factor] | None:
        """Trace mode, one position: keys and the compact cotangents (:class:`RowsPairFactor`)."""
        keys = saved["keys"]
        weight, bias = roles.get("weight"), roles.get("bias")
        if mode != "trace" or keys.shape[1] != 1 or weight is None:
            return None
        return {weight_group(weight, bias): RowsPairFactor(keys, cotangents.derivative, cotangents.rows, plus_one=bias is not None)}

    def factors(self, saved: Saved, cotangents: torch.Tensor, roles: Roles, mode: Mode, num_outputs: int) -> dict[tuple[str, ...], Factor]:
        keys = saved["keys"]
        n, o = cotangents.shape[:2]
        return linear_factors(keys, cotangents.reshape(n, o, keys.shape[1], -1), roles, mode, num_outputs)
