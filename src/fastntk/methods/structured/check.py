"""The calibration's check: what the structured method returns for two probe samples, group
by group, against autograd.

For the probe samples x_1..x_k (k = 2, so that reordered samples show) and each structured
group g, with J_g the (k·O, p_g) matrix of their per-sample, per-output Jacobians:

1. F_g, the group's full-mode contraction of its factors of the probe samples (k, k, O, O),
   must be J_g J_gᵀ. It is checked in m random directions R (m, k·O) of samples and outputs:
   R F_g Rᵀ against G_g G_gᵀ, where G = R J is m gradients of Σ_{n,a} R[c, n, a] f_a(x_n)
   (m plain backward passes of one forward pass on the probe: no per-sample Jacobians, no
   vmap). Entry (c, d) may differ by tol·(‖G_c‖‖G_d‖ + √(Q_cc Q_dd)), Q = R F_g Rᵀ:
   Cauchy–Schwarz in the group's own scale, whatever the other groups' scales.
2. In trace and diagonal modes, what is returned for the probe entries (the contraction of
   the factors in that mode) must be F_g reduced to that mode: entry by entry within tol·Σ_a ρ[n, a] ρ[m, a] (trace; the
   diagonal mode per output), ρ[n, a] = √F_g[n, n, a, a] = ‖J_g(x_n)[a]‖.

A group that fails goes to the exact Jacobian fallback. tol is √eps of the dtype.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..._checks import tolerance
from ..._functional import FunctionalModel
from ..._inputs import Batch, batch_size
from ...reduction import Mode, reduce_full
from .factors import Factor

Group = tuple[str, ...]

DIRECTIONS = 2
"""Random directions the full-mode contraction is checked in (each a backward pass)."""


def projected_gradients(f: FunctionalModel, x: Batch, directions: torch.Tensor) -> dict[str, list[torch.Tensor | None]]:
    """∇θ Σ_{n,a} directions[c, n, a] f_a(θ, x_n) for each c, per parameter (None where it does
    not affect the outputs): one forward pass on x and m backward passes, by plain autograd."""
    primals = {name: p.detach().requires_grad_() for name, p in f.primals.items()}
    with torch.enable_grad():
        outputs = f(primals, x)
        per_direction = [
            # a scalar objective, not grad_outputs: torch's first grad_outputs imports sympy (a start-up cost)
            torch.autograd.grad((outputs * direction).sum(), list(primals.values()), retain_graph=c < len(directions) - 1, allow_unused=True)
            for c, direction in enumerate(directions)
        ]
    return {name: [g[i] for g in per_direction] for i, name in enumerate(primals)}


def gradient_gram(gradients: list[torch.Tensor | None]) -> torch.Tensor:
    """G Gᵀ (m, m) for the m gradients G of one parameter (None: zeros), by dot products in
    their dtype (BLAS sums them in blocks: rounding far below the check's tolerance)."""
    m = len(gradients)
    flat = [None if g is None else g.reshape(-1) for g in gradients]
    gram = torch.zeros(m, m, dtype=torch.float64, device=next((g.device for g in flat if g is not None), None))
    for c in range(m):
        for d in range(c + 1):
            a, b = flat[c], flat[d]
            if a is not None and b is not None:
                gram[c, d] = gram[d, c] = torch.dot(a, b)
    return gram


def within(claimed: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> bool:
    """|claimed − expected| <= bound entry by entry (in float64)."""
    return bool(((claimed.double() - expected.double()).abs() <= bound).all())


CHECKED_OUTPUTS = 16
"""Outputs step 2 compares the diagonal-mode contraction with the full one on (all of them
when there are no more): the full one's cost grows with their square."""


def failed_groups(
    f: FunctionalModel, x: Batch, mode: Mode, num_outputs: int, factors: Mapping[Group, Factor]
) -> set[Group]:
    """The groups whose contributions to the probe samples x (k of them) fail the check above.

    ``factors``: each group's factors, of at least the k samples. R F_g Rᵀ comes from the factors projected on R (a pseudo-sample of m outputs:
    ``Factor.projected``), so no O×O block is formed; in step 2 the diagonal-mode
    contraction of every output is compared with F_g on at most CHECKED_OUTPUTS of them
    (seeded at random), and what is returned with that diagonal (summed for trace).
    """
    if not factors:
        return set()
    k = batch_size(x)
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(DIRECTIONS, k, num_outputs, generator=generator, dtype=torch.float64)
    gradients = projected_gradients(f, x, directions.to(device=f.device, dtype=f.dtype))
    subset = None if num_outputs <= CHECKED_OUTPUTS else torch.randperm(num_outputs, generator=generator)[:CHECKED_OUTPUTS].to(f.device)
    gradient_grams = {name: gradient_gram(gradients[name]) for name in {name for group in factors for name in group}}
    tol = tolerance(f.dtype)
    tiny = torch.finfo(torch.float64).tiny
    failed: set[Group] = set()
    for group, factor in factors.items():
        head = factor.head(k)
        projection = head.projected(directions.to(device=f.device, dtype=f.dtype))
        projected = projection.contract(projection, "full")[0, 0].double()  # (m, m) = R F_g Rᵀ
        true = sum(gradient_grams[name].to(f.device) for name in group)
        scale = true.diagonal().clamp(min=0).sqrt()
        claimed_scale = projected.diagonal().clamp(min=0).sqrt()
        if not within(projected, true, tol * (scale[:, None] * scale[None] + claimed_scale[:, None] * claimed_scale[None]) + tiny):
            failed.add(group)
            continue
        if mode == "full":
            continue
        diagonal = head.contract(head, "diagonal").double()  # (k, k, O)
        norms = torch.diagonal(diagonal, dim1=0, dim2=1).clamp(min=0).sqrt().T  # (k, O): ‖J_g(x_n)[a]‖
        bound = norms[:, None, :] * norms[None, :, :]  # (k, k, O)
        some = head if subset is None else head.outputs(subset)  # type: ignore[union-attr]
        full = some.contract(some, "full")
        checked = (diagonal, bound) if subset is None else (diagonal[:, :, subset], bound[:, :, subset])
        if not within(checked[0], reduce_full(full, "diagonal"), tol * checked[1] + tiny):
            failed.add(group)
            continue
        returned = head.contract(head, mode)
        expected, bound = (diagonal, bound) if mode == "diagonal" else (diagonal.sum(-1), bound.sum(-1))
        if not within(returned, expected, tol * bound + tiny):
            failed.add(group)
    return failed
