"""Per-group kernels from one method's factors: Θ = Σ_g Θ_g, each Θ_g = J_g J_gᵀ contracted apart.

Both exact methods that factor the kernel by parameters can split it: the Jacobian method's
factors are per-parameter Jacobians, the structured method's are per parameter group (a
Linear layer's weight and bias together, the Jacobian fallback's parameters one by one). A
block's factors are computed once, by the wrapped method, and each group's share of the
contraction is kept apart (``layer``: a (G, *block) stack) or weighted and summed
(``weighted``: Σ_g λ_g Θ_g = J Λ Jᵀ, one block). The vp method has no per-parameter factors
(its products run over all parameters at once), so it cannot split a kernel.

A structured factor whose parameters fall in different groups (a Linear's weight and bias,
asked for parameter by parameter) is split exactly: the bias's share of the "+ 1" folded into
the input Gram is its own Jacobian Σ_s g_s.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from ..reduction import block_shape
from .base import KernelMethod
from .contraction import flat_jacobian
from .structured.factors import Factor, JacobianFactor, PairFactor, RowsPairFactor

Factors = dict[tuple[str, ...], Factor]

SPLITTABLE = ("jacobian", "structured")
"""The methods whose factors split by parameter (vp's do not)."""


def split_factor(names: tuple[str, ...], factor: Factor, sizes: dict[str, int]) -> Factors:
    """One factor of the parameters ``names`` as one factor per parameter, exactly.

    A Jacobian (N, O, Σ p) is cut along its parameters (in the order of ``names``); a layer's
    input/cotangent pair with its bias folded in (``plus_one``, names (weight, bias)) becomes
    the weight's pair without the "+ 1" and the bias's Jacobian Σ_s g_s (for the compact
    RowsPairFactor, the same pair with zero keys, so that its Gram is the "+ 1" alone).
    """
    if isinstance(factor, JacobianFactor):
        parts = torch.split(factor.jacobian, [sizes[name] for name in names], dim=2)
        return {(name,): JacobianFactor(part) for name, part in zip(names, parts)}
    if len(names) == 2 and factor.plus_one:
        weight, bias = names
        if isinstance(factor, PairFactor):
            return {(weight,): dataclasses.replace(factor, plus_one=False), (bias,): JacobianFactor(factor.cotangents.sum(2))}
        if isinstance(factor, RowsPairFactor):
            zeros = factor.keys.new_zeros(factor.keys.shape[0], 1, 1)
            return {(weight,): dataclasses.replace(factor, plus_one=False), (bias,): dataclasses.replace(factor, keys=zeros)}
    raise AssertionError(f"unreachable: no exact split of {type(factor).__name__} over {names}")


def factor_samples(factors: Factors) -> int:
    """Samples of a block's factors (0 for none)."""
    for factor in factors.values():
        if isinstance(factor, RowsPairFactor):
            return factor.derivative.shape[0]
        return (factor.jacobian if isinstance(factor, JacobianFactor) else factor.cotangents).shape[0]
    return 0


class GroupedMethod(KernelMethod):
    """``inner``'s kernel cut into parameter groups: per group (``weights`` None) or weighted.

    Args:
        inner: a calibrated "jacobian" or "structured" method (its factors are computed once per block).
        group_of: the group index of every differentiated parameter, by canonical name.
        count: G, the number of groups.
        weights: λ_g per group for J Λ Jᵀ (one block), or None for the G blocks stacked.
    """

    def __init__(self, inner: KernelMethod, group_of: dict[str, int], count: int, weights: Sequence[float] | None = None) -> None:
        assert inner.name in SPLITTABLE, inner.name
        super().__init__(inner.f, inner.mode, inner.num_outputs, inner.calibration)
        self.inner, self.group_of, self.count, self.weights = inner, group_of, count, weights
        self.name = inner.name
        self.symmetric_factors = inner.symmetric_factors
        self.sides_with_factors = inner.sides_with_factors
        self.sizes = {name: p.numel() for name, p in inner.f.primals.items()}

    def grouped(self, factors: Any) -> Factors:
        """The inner method's factors of a block, keyed so that each key lies in one group."""
        if self.inner.name == "jacobian":
            return {(name,): JacobianFactor(flat_jacobian(j)) for name, j in factors.items()}
        out: Factors = {}
        for names, factor in factors.items():
            if len({self.group_of[name] for name in names}) == 1:
                out[names] = factor
            else:
                out.update(split_factor(names, factor, self.sizes))
        return out

    def left(self, x: Any) -> Factors:
        return self.grouped(self.inner.left(x))

    def right(self, x: Any) -> Factors:
        return self.grouped(self.inner.right(x))

    def left_and_right(self, x1: Any, x2: Any) -> tuple[Factors, Factors]:
        left, right = self.inner.left_and_right(x1, x2)
        return self.grouped(left), self.grouped(right)

    def contract(self, left: Factors, right: Factors) -> torch.Tensor:
        """(G, *block) per group, or the weighted sum Σ_g λ_g Θ_g (*block)."""
        shape = block_shape(self.mode, factor_samples(left), factor_samples(right), self.num_outputs)
        dtype, device = self.f.dtype, self.f.device
        if self.weights is None:
            out = torch.zeros((self.count, *shape), dtype=dtype, device=device)
        else:
            out = torch.zeros(shape, dtype=dtype, device=device)
        for key, factor in left.items():
            if key not in right:
                continue  # these parameters do not affect the other block's outputs
            g = self.group_of[key[0]]
            if self.weights is None:
                out[g].add_(factor.contract(right[key], self.mode))  # type: ignore[arg-type]
            elif self.weights[g] != 0:
                out.add_(factor.contract(right[key], self.mode), alpha=self.weights[g])  # type: ignore[arg-type]
        return out

    def bytes_per_sample(self) -> int:
        return self.inner.bytes_per_sample()
