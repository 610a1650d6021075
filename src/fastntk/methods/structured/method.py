"""Method "structured": the kernel from the structure of each layer (Novak et al., ICML 2022).

Per block of samples: one forward pass records the inputs of every covered op
(``rules``), one batched backward pass gives the output cotangents for all O outputs,
and each parameter group's share of the kernel is contracted from those factors without
forming dy/dW. Parameters no rule covers get exact per-sample Jacobians (the fallback),
so every model works and the kernel stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..._checks import tolerance
from ..._errors import ModelError
from ..._inputs import Batch
from ..base import KernelMethod
from ..jacobian import flat_jacobian, per_sample_jacobians
from .capture import Use, capture, output_cotangents
from .factors import Factor, JacobianFactor, PairFactor

Factors = dict[tuple[str, ...], Factor]


def mergeable(a: Factor, b: Factor) -> bool:
    """Whether two uses' factors of one parameter group can be combined exactly."""
    if isinstance(a, JacobianFactor) and isinstance(b, JacobianFactor):
        return a.jacobian.shape == b.jacobian.shape
    if isinstance(a, PairFactor) and isinstance(b, PairFactor):
        return a.kind == b.kind and a.plus_one == b.plus_one and a.keys.shape[2:] == b.keys.shape[2:]
    return False


@dataclass(frozen=True)
class Layout:
    """Which parameter groups are structured, which fall back, and the factors' bytes per sample."""

    groups: frozenset[tuple[str, ...]]
    fallback: tuple[str, ...]
    bytes_per_sample: int
    pair_flops: dict[tuple[str, ...], float]
    """FLOPs of contracting one pair of samples, per structured group."""
    kinds: dict[tuple[str, ...], str]
    """How each structured group is contracted: "pair" (input and cotangent Grams) or "jacobian"."""
    forward_flops: float
    """FLOPs of one sample's forward pass: matmuls and convolutions seen, plus 2 per parameter
    used by ops no FLOP rule covers (attention kernels and the like)."""


class StructuredMethod(KernelMethod):
    """Structured derivatives per parameter group, with the Jacobian fallback for the rest."""

    name = "structured"
    calibration: Layout | None = None

    @property
    def fallback(self) -> list[str]:
        """Parameters computed by exact per-sample Jacobians (after calibration)."""
        assert self.calibration is not None, "calibrate first"
        return list(self.calibration.fallback)

    @property
    def groups(self) -> frozenset[tuple[str, ...]]:
        """Parameter groups computed from structured factors (after calibration)."""
        assert self.calibration is not None, "calibrate first"
        return self.calibration.groups

    def calibrate(self, x: Batch) -> None:
        """Fix which parameter groups are structured, checking each against autograd on x.

        The gradient of Σ r[n, a] f_a(x_n), for fixed random weights r, is computed by
        autograd and from each group's factors; a group that disagrees (an op used in a
        way its rule does not model, samples reordered inside the model, ...) goes to the
        Jacobian fallback. Also measures the factors' bytes per sample.
        """
        observed = capture(self.f, x)
        n, o = observed.outputs.shape
        weights = torch.randn(n, o, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        weights = weights.to(device=self.f.device, dtype=self.f.dtype)
        names = list(observed.primals)
        with torch.enable_grad():
            objective = (observed.outputs * weights).sum()
        true = torch.autograd.grad(objective, list(observed.primals.values()), retain_graph=True, allow_unused=True)
        true_by_name = {name: torch.zeros_like(observed.primals[name]) if g is None else g for name, g in zip(names, true)}
        cotangents = output_cotangents(observed.outputs, [use.output for use in observed.uses])
        cotangent_bytes = sum(g.numel() * g.element_size() for g in cotangents if g is not None)
        factors, conflicts = self.structured_factors(observed.uses, cotangents)
        scale = max((g.abs().max().item() for g in true_by_name.values() if g.numel()), default=0.0)
        tol = tolerance(self.f.dtype) * max(scale, torch.finfo(self.f.dtype).tiny)
        rejected: set[str] = set()
        for group, factor in factors.items():
            expected = torch.cat([true_by_name[name].reshape(-1) for name in group])
            claimed = factor.gradient(weights, [observed.primals[name].shape for name in group])
            if claimed.shape != expected.shape or (claimed - expected).abs().max().item() > tol:
                rejected.update(group)
        fallback = observed.unstructured | conflicts | rejected
        for group in factors:  # a group is structured whole or not at all
            if fallback & set(group):
                fallback.update(group)
        structured = {group: f for group, f in factors.items() if not fallback & set(group)}
        kept = sorted(fallback & set(names))
        bytes_ = sum(f.nbytes() for f in structured.values()) + cotangent_bytes
        bytes_ = bytes_ // n + 2 * o * self.f.dtype.itemsize * sum(self.f.primals[p].numel() for p in kept)
        self.calibration = Layout(
            frozenset(structured),
            tuple(kept),
            bytes_,
            {group: f.pair_flops(self.mode) for group, f in structured.items()},
            {group: "pair" if isinstance(f, PairFactor) else "jacobian" for group, f in structured.items()},
            observed.flops / n + 2.0 * sum(self.f.primals[p].numel() for p in observed.unstructured & set(names)),
        )

    def structured_factors(self, uses: list[Use], cotangents: list[torch.Tensor | None]) -> tuple[Factors, set[str]]:
        """Factors by group from each use, and the parameters whose uses cannot be combined.

        Consumes ``cotangents``: each entry is released once its factors exist, so the
        peak memory holds the cotangents of one layer beside the factors, not of all.
        """
        groups_of: dict[str, set[tuple[str, ...]]] = {}
        for use in uses:
            for group in use.rule.groups(use.roles):
                for name in group:
                    groups_of.setdefault(name, set()).add(group)
        shared = {name for name, groups in groups_of.items() if len(groups) > 1}
        merged: Factors = {}
        conflicts: set[str] = set()
        for i, use in enumerate(uses):
            g, cotangents[i] = cotangents[i], None
            if g is None:
                continue  # this layer does not affect the outputs
            if shared & set(use.roles.values()):  # a parameter in several groups: one group per parameter
                factors: Factors = {}
                for role, name in use.roles.items():
                    factors.update(use.rule.factors(use.saved, g, {role: name}, self.mode))
            else:
                factors = use.rule.factors(use.saved, g, use.roles, self.mode)
            del g
            for group, factor in factors.items():
                if group not in merged:
                    merged[group] = factor
                elif mergeable(merged[group], factor):
                    merged[group] = merged[group].merge(factor)  # type: ignore[arg-type]
                else:
                    conflicts.update(group)
        merged = {group: f for group, f in merged.items() if not conflicts & set(group)}
        return merged, conflicts

    def left(self, x: Batch) -> Factors:
        if self.calibration is None:
            self.calibrate(x)
        observed = capture(self.f, x)
        cotangents = output_cotangents(observed.outputs, [use.output for use in observed.uses])
        factors, conflicts = self.structured_factors(observed.uses, cotangents)
        factors = {group: f for group, f in factors.items() if group in self.groups}
        if not (observed.unstructured | conflicts) & set(self.f.primals) <= set(self.fallback):
            raise ModelError(
                "the model uses its parameters differently from one block of inputs to another (data-dependent "
                "control flow), so the structured method cannot pair its factors; use method='jacobian'"
            )
        if self.fallback:
            jacobians = per_sample_jacobians(self.f.restrict(self.fallback), x, self.vmap_chunk)
            factors.update({(name,): JacobianFactor(flat_jacobian(j)) for name, j in jacobians.items()})
        return factors

    def contract(self, left: Factors, right: Factors) -> torch.Tensor:
        total = None
        for group, factor in left.items():
            if group not in right:
                continue  # this group does not affect the other block's outputs
            part = factor.contract(right[group], self.mode)  # type: ignore[arg-type]
            total = part if total is None else total.add_(part)
        if total is None:
            n1, n2 = _samples(left), _samples(right)
            from ..._modes import block_shape

            return torch.zeros(block_shape(self.mode, n1, n2, self.num_outputs), dtype=self.f.dtype, device=self.f.device)
        return total

    def bytes_per_sample(self) -> int:
        if self.calibration is None:
            return 2 * self.num_outputs * self.f.num_params * self.f.dtype.itemsize
        return self.calibration.bytes_per_sample


def _samples(factors: Factors) -> int:
    factor = next(iter(factors.values()), None)
    if factor is None:
        return 0
    return (factor.jacobian if isinstance(factor, JacobianFactor) else factor.cotangents).shape[0]
