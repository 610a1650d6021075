"""Method "jacobian": contract per-sample Jacobians, parameter tensor by parameter tensor.

Cost about N·O·[FP] for the Jacobians plus N1·N2·O²·P for ``full`` (N1·N2·O·P for
``trace`` and ``diagonal``); memory O·P per sample of a block.
"""

from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from .._functional import FunctionalModel, Params
from .._gemm import mm
from .._inputs import Batch
from .._modes import Mode
from .base import KernelMethod
from .per_sample import vmapped_or_looped


def jacobian_bytes(f: FunctionalModel, num_outputs: int, names: list[str] | None = None) -> int:
    """Peak bytes of one sample's Jacobian rows for the primals ``names`` (all by default):
    O·p numbers, twice (the rows and jacrev's intermediates)."""
    params = f.num_params if names is None else sum(f.primals[name].numel() for name in names)
    return 2 * num_outputs * params * f.dtype.itemsize


def per_sample_jacobians(f: FunctionalModel, x: Batch, chunk_size: int | None = None) -> Params:
    """∂f(θ, x_n)/∂θ for every sample: a dict name -> (N, O, *parameter shape)."""
    return vmapped_or_looped(f, x, lambda: vmap(jacrev(f.single), in_dims=(None, 0), chunk_size=chunk_size)(f.primals, x))


def flat_jacobian(j: torch.Tensor) -> torch.Tensor:
    """(N, O, *parameter shape) -> (N, O, p), 0-d parameters included."""
    return j.reshape(j.shape[0], j.shape[1], -1)


def jacobian_pair_flops(mode: Mode, num_outputs: int, params: int) -> float:
    """FLOPs of contracting one pair of samples' Jacobians over ``params`` parameters."""
    return 2.0 * (num_outputs**2 if mode == "full" else num_outputs) * params


def is_output_major(t: torch.Tensor) -> bool:
    """Whether t (N, O, ...) is stored output by output, as a contiguous (O, N, ...) tensor (the
    layout of a backward pass vmapped over outputs), rather than sample by sample."""
    return not t.is_contiguous() and t.transpose(0, 1).is_contiguous()


def output_rows(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """t (N, O, p) as an (N·O, p) matrix, its rows in storage order (no copy when t is stored
    either way), and whether that order is output-major."""
    if is_output_major(t):
        return t.transpose(0, 1).reshape(-1, t.shape[-1]), True
    return t.reshape(-1, t.shape[-1]), False


PER_OUTPUT_GEMM_FLOPS = 2**20
"""Below this, one GEMM per output costs more in calls than copying to one big GEMM."""


def summed_over_outputs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_o a[:, o] b[:, o]ᵀ for a (N1, O, p) and b (N2, O, p): (N1, N2), read in place.

    Sample-major inputs make one GEMM over (O·p); output-major ones one GEMM per output,
    unless those would be small (then copying to sample-major and one GEMM is faster).
    """
    n1, o, p = a.shape
    n2 = b.shape[0]
    if (is_output_major(a) or is_output_major(b)) and 2 * n1 * n2 * p >= PER_OUTPUT_GEMM_FLOPS:
        total = mm(a[:, 0], b[:, 0].T)
        for i in range(1, o):
            total += mm(a[:, i], b[:, i].T)
        return total
    return mm(a.reshape(n1, o * p), b.reshape(n2, o * p).T)


def contract_jacobian_pair(a: torch.Tensor, b: torch.Tensor, mode: Mode) -> torch.Tensor:
    """One parameter's share of the kernel from Jacobians a (N1, O, p) and b (N2, O, p), stored
    sample- or output-major (the result may be a permuted view)."""
    n1, o, p = a.shape
    n2 = b.shape[0]
    if mode == "full":
        rows1, major1 = output_rows(a)
        rows2, major2 = output_rows(b)
        product = mm(rows1, rows2.T)
        # to (N1, N2, O, O) from the storage orders of the two sides
        shape = [o, n1] if major1 else [n1, o]
        shape += [o, n2] if major2 else [n2, o]
        order = [1 if major1 else 0, 3 if major2 else 2, 0 if major1 else 1, 2 if major2 else 3]
        return product.reshape(shape).permute(order)
    if mode == "trace":
        return summed_over_outputs(a, b)
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
