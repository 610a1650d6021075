"""Method "jacobian": contract per-sample Jacobians, parameter tensor by parameter tensor.

Cost about N·O·[FP] for the Jacobians plus N1·N2·O²·P for ``full`` (N1·N2·O·P for
``trace`` and ``diagonal``); memory O·P per sample of a block.
"""

from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from .._functional import FunctionalModel, Params
from .._inputs import Batch
from .._modes import Mode
from .base import KernelMethod


def jacobian_bytes(f: FunctionalModel, num_outputs: int, names: list[str] | None = None) -> int:
    """Peak bytes of one sample's Jacobian rows for the primals ``names`` (all by default):
    O·p numbers, twice (the rows and jacrev's intermediates)."""
    params = f.num_params if names is None else sum(f.primals[name].numel() for name in names)
    return 2 * num_outputs * params * f.dtype.itemsize


def per_sample_jacobians(f: FunctionalModel, x: Batch, chunk_size: int | None = None) -> Params:
    """∂f(θ, x_n)/∂θ for every sample: a dict name -> (N, O, *parameter shape)."""
    return vmap(jacrev(f.single), in_dims=(None, 0), chunk_size=chunk_size)(f.primals, x)


def flat_jacobian(j: torch.Tensor) -> torch.Tensor:
    """(N, O, *parameter shape) -> (N, O, p), 0-d parameters included."""
    return j.reshape(j.shape[0], j.shape[1], -1)


def jacobian_pair_flops(mode: Mode, num_outputs: int, params: int) -> float:
    """FLOPs of contracting one pair of samples' Jacobians over ``params`` parameters."""
    return 2.0 * (num_outputs**2 if mode == "full" else num_outputs) * params


def contract_jacobian_pair(a: torch.Tensor, b: torch.Tensor, mode: Mode) -> torch.Tensor:
    """One parameter's share of the kernel from Jacobians a (N1, O, p) and b (N2, O, p)."""
    n1, o, p = a.shape
    n2 = b.shape[0]
    if mode == "full":
        return (a.reshape(n1 * o, p) @ b.reshape(n2 * o, p).T).reshape(n1, o, n2, o).permute(0, 2, 1, 3)
    if mode == "trace":
        return a.reshape(n1, o * p) @ b.reshape(n2, o * p).T
    return torch.bmm(a.transpose(0, 1), b.permute(1, 2, 0)).permute(1, 2, 0)


def contract_jacobians(j1: Params, j2: Params, mode: Mode) -> torch.Tensor:
    """Σ over parameter tensors of J1 J2ᵀ, reduced per ``mode``."""
    total = None
    for name, a in j1.items():
        part = contract_jacobian_pair(flat_jacobian(a), flat_jacobian(j2[name]), mode)
        total = part if total is None else total.add_(part)
    assert total is not None
    return total


class JacobianMethod(KernelMethod):
    """Per-sample Jacobians by vmap(jacrev), then GEMMs per parameter tensor."""

    name = "jacobian"

    def left(self, x: Batch) -> Params:
        return per_sample_jacobians(self.f, x, self.vmap_chunk)

    def contract(self, left: Params, right: Params) -> torch.Tensor:
        return contract_jacobians(left, right, self.mode)

    def bytes_per_sample(self) -> int:
        return jacobian_bytes(self.f, self.num_outputs)
