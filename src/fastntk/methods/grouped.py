"""Per-group kernels from one method's factors: Θ = Σ_g Θ_g, each Θ_g = J_g J_gᵀ contracted apart.

Both exact methods that factor the kernel by parameters can split it: the Jacobian method's
factors are per-parameter Jacobians, the structured method's are per parameter group (a
Linear layer's weight and bias together, the Jacobian fallback's parameters one by one). A
block's factors are computed once, by the wrapped method, and each group's share of the
contraction is kept apart (``layer``: a (G, *block) stack) or weighted and summed
(``weighted``: Σ_g λ_g Θ_g = J Λ Jᵀ, one block). The vp method has no per-parameter factors
(its products run over all parameters at once), so it cannot split a kernel.

A structured factor whose parameters fall in different groups (a Linear's weight and bias,
asked for parameter by parameter) is split exactly, in the contraction: the bias's share of the "+ 1" folded into
the input Gram is its own Jacobian Σ_s g_s. A dense layer (one position) keeps its factor
whole: its cotangent Gram C is contracted once, the bias's share is C and the weight's
X ⊙ C (:func:`weight_and_bias_shares`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from .._gemm import mm
from ..reduction import Mode, block_shape
from .base import KernelMethod
from .contraction import contract_jacobian_pair, flat_jacobian, keys_gram
from .structured.factors import Factor, JacobianFactor, PairFactor, RowsPairFactor, as_pair

Factors = dict[tuple[str, ...], Factor]

SPLITTABLE = ("jacobian", "structured")
"""The methods whose factors split by parameter (vp's do not)."""


def split_factor(names: tuple[str, ...], factor: Factor, sizes: dict[str, int]) -> Factors:
    """One factor of the parameters ``names`` as one factor per parameter, exactly.

    A Jacobian (N, O, Σ p) is cut along its parameters (in the order of ``names``); a layer's
    input/cotangent pair with its bias folded in (``plus_one``, names (weight, bias); a compact
    RowsPairFactor with its cotangents formed) becomes the weight's pair without the "+ 1" and
    the bias's Jacobian Σ_s g_s.
    """
    if isinstance(factor, JacobianFactor):
        parts = torch.split(factor.jacobian, [sizes[name] for name in names], dim=2)
        return {(name,): JacobianFactor(part) for name, part in zip(names, parts)}
    factor = as_pair(factor)
    if len(names) == 2 and isinstance(factor, PairFactor) and factor.plus_one:
        weight, bias = names
        return {(weight,): dataclasses.replace(factor, plus_one=False), (bias,): JacobianFactor(factor.cotangents.sum(2))}
    raise AssertionError(f"unreachable: no exact split of {type(factor).__name__} over {names}")


def dense_pair(factor: Factor) -> bool:
    """Whether a factor is a dense layer's (one position) with its bias folded in: then
    :func:`weight_and_bias_shares` splits its contraction without a second cotangent Gram."""
    if isinstance(factor, RowsPairFactor):
        return factor.plus_one
    return isinstance(factor, PairFactor) and factor.plus_one and factor.kind == "dot" and factor.cotangents.shape[2] == 1


def weight_and_bias_shares(a: Factor, b: Factor, mode: Mode) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight's and the bias's shares of a dense layer's block (factors a and b, see
    :func:`dense_pair`): from one cotangent Gram C, X ⊙ C and C (X the input Gram)."""
    if isinstance(a, RowsPairFactor) and isinstance(b, RowsPairFactor) and mode == "trace":
        bias = mm(a.derivative * a.rows.square().sum(0), b.derivative.T)  # Σ_a ⟨g_a, g'_a⟩, compactly
        x = keys_gram(a.keys, b.keys, "dot", False, a.derivative.dtype).reshape(bias.shape)
        return bias * x, bias
    a, b = (f.materialized() if isinstance(f, RowsPairFactor) else f for f in (a, b))
    assert isinstance(a, PairFactor) and isinstance(b, PairFactor)
    n1, o, _, e = a.cotangents.shape
    n2 = b.cotangents.shape[0]
    bias = contract_jacobian_pair(a.cotangents.reshape(n1, o, e), b.cotangents.reshape(n2, o, e), mode)
    x = keys_gram(a.keys, b.keys, "dot", False, a.cotangents.dtype).reshape(n1, n2)
    return bias * (x if mode == "trace" else x[:, :, None, None] if mode == "full" else x[:, :, None]), bias


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
        """The inner method's factors of a block, keyed by tuples of parameter names (a key whose
        parameters fall in different groups is split in :meth:`contract`)."""
        if self.inner.name == "jacobian":
            return {(name,): JacobianFactor(flat_jacobian(j)) for name, j in factors.items()}
        return factors

    def shares(self, key: tuple[str, ...], a: Factor, b: Factor) -> list[tuple[int, torch.Tensor]]:
        """(group, share of the block) of the parameters ``key`` from their factors a and b."""
        groups = [self.group_of[name] for name in key]
        if len(set(groups)) == 1:
            if self.weights is not None and self.weights[groups[0]] == 0:
                return []
            return [(groups[0], a.contract(b, self.mode))]  # type: ignore[arg-type]
        if dense_pair(a) and dense_pair(b):
            return list(zip(groups, weight_and_bias_shares(a, b, self.mode)))
        parts_a, parts_b = split_factor(key, a, self.sizes), split_factor(key, b, self.sizes)
        return [(self.group_of[k[0]], part.contract(parts_b[k], self.mode)) for k, part in parts_a.items()]  # type: ignore[arg-type]

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
            out = torch.empty((self.count, *shape), dtype=dtype, device=device)  # each group's first share is copied in
        else:
            out = torch.zeros(shape, dtype=dtype, device=device)
        filled: set[int] = set()
        for key, factor in left.items():
            if key not in right:
                continue  # these parameters do not affect the other block's outputs
            for g, share in self.shares(key, factor, right[key]):
                if self.weights is None:
                    if g in filled:
                        out[g].add_(share)
                    else:
                        out[g].copy_(share)
                        filled.add(g)
                elif self.weights[g] != 0:
                    out.add_(share, alpha=self.weights[g])
        if self.weights is None:
            for g in set(range(self.count)) - filled:
                out[g].zero_()  # no parameter of group g affects these outputs
        return out

    def bytes_per_sample(self) -> int:
        return self.inner.bytes_per_sample()
