"""An obviously correct float64 eNTK: per-sample Jacobians by plain autograd loops, then einsum.

Slow (N·O backward passes) and memory-hungry (N·O·P); meant for tests and checks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._functional import ParamSelection, flatten_output, select_parameters
from ._inputs import Batch, batch_size, call_model, map_leaves, take
from .reduction import check_mode, reduce_full


def reference_jacobian(model: nn.Module, x: Batch, params: ParamSelection = None, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """J (N, O, P): row (n, a) is ∂ output a of sample n / ∂θ, θ the selected parameters flattened in order.

    Computed in ``dtype`` (float64 by default) on a deep copy of the model, one sample and
    one output at a time.
    """
    model64 = copy.deepcopy(model).to(dtype)
    names = select_parameters(model64, params)
    named = dict(model64.named_parameters())
    theta = [named[name].requires_grad_(True) for name in names]  # a copy: frozen ones may be selected
    x64 = map_leaves(lambda t: t.to(dtype) if t.is_floating_point() else t, x)
    rows = []
    for n in range(batch_size(x64)):
        out = flatten_output(call_model(model64, take(x64, n, n + 1)), 1)[0]
        per_output = []
        for a in range(out.shape[0]):
            grads = torch.autograd.grad(out[a], theta, retain_graph=True, allow_unused=True)
            per_output.append(torch.cat([
                (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, theta)
            ]))
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def reference_ntk(
    model: nn.Module, x1: Batch, x2: Batch | None = None, *, mode: str = "full", params: ParamSelection = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The eNTK by brute force, in ``dtype`` (float64 by default: the reference the tests hold
    every method to; the model's own dtype measures how much its rounding alone moves the
    kernel), shaped like :func:`fastntk.ntk`'s result."""
    j1 = reference_jacobian(model, x1, params, dtype=dtype)
    j2 = j1 if x2 is None else reference_jacobian(model, x2, params, dtype=dtype)
    check_mode(mode)
    return reduce_full(torch.einsum("nap,mbp->nmab", j1, j2), mode)
