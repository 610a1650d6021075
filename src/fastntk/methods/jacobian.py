"""Method "jacobian": contract per-sample Jacobians, parameter tensor by parameter tensor.

Cost about N·O·[FP] for the Jacobians plus N1·N2·O²·P for ``full`` (N1·N2·O·P for
``trace`` and ``diagonal``); memory O·P per sample of a block.
"""

from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from .._functional import FunctionalModel, Params
from .._inputs import Batch
from .base import KernelMethod
from .contraction import contract_jacobians
from .per_sample import vmapped_or_looped


def jacobian_bytes(f: FunctionalModel, num_outputs: int, names: list[str] | None = None) -> int:
    """Peak bytes of one sample's Jacobian rows for the primals ``names`` (all by default):
    O·p numbers, twice (the rows and jacrev's intermediates)."""
    params = f.num_params if names is None else sum(f.primals[name].numel() for name in names)
    return 2 * num_outputs * params * f.dtype.itemsize


def per_sample_jacobians(f: FunctionalModel, x: Batch, chunk_size: int | None = None) -> Params:
    """∂f(θ, x_n)/∂θ for every sample: a dict name -> (N, O, *parameter shape)."""
    return vmapped_or_looped(f, x, lambda: vmap(jacrev(f.single), in_dims=(None, 0), chunk_size=chunk_size)(f.primals, x))


class JacobianMethod(KernelMethod):
    """Per-sample Jacobians by vmap(jacrev), then GEMMs per parameter tensor."""

    name = "jacobian"

    def left(self, x: Batch) -> Params:
        return per_sample_jacobians(self.f, x)

    def contract(self, left: Params, right: Params) -> torch.Tensor:
        return contract_jacobians(left, right, self.mode)

    def bytes_per_sample(self) -> int:
        return jacobian_bytes(self.f, self.num_outputs)
