"""Contractions: the kernel block of two sides' per-sample factors, reduced per mode, by GEMMs.

Every method's contraction is made of these: per-sample Jacobians J (N, O, p) contracted over
their parameters (the Jacobian method, the structured method's fallback and its Jacobian-kind
groups), and the structured method's input Grams X (N1, N2, S1, S2) of layer inputs ("keys"),
which weight the contraction of output cotangents. Products go through :func:`fastntk._gemm.mm`
(oneDNN where that is faster). Shapes per mode: :mod:`fastntk.reduction`.
"""

from __future__ import annotations

from typing import Literal

import torch

from .._gemm import mm
from ..reduction import Mode


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


def summed_over_outputs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_o a[:, o] b[:, o]ᵀ for a (N1, O, p) and b (N2, O, p): (N1, N2), one GEMM over O·p
    (output-major inputs are copied to sample-major first)."""
    n1, o, p = a.shape
    return mm(a.reshape(n1, o * p), b.reshape(b.shape[0], o * p).T)


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


def contract_jacobians(j1: dict[str, torch.Tensor], j2: dict[str, torch.Tensor], mode: Mode) -> torch.Tensor:
    """Σ over parameter tensors of J1 J2ᵀ, reduced per ``mode``."""
    total = None
    for name, a in j1.items():
        part = contract_jacobian_pair(flat_jacobian(a), flat_jacobian(j2[name]), mode)
        total = part if total is None else total.add_(part)
    assert total is not None
    return total


def dot_gram(k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """X[n, m, s, t] = ⟨k1[n, s], k2[m, t]⟩ for keys (N, S, d)."""
    n1, s1, d = k1.shape
    n2, s2, _ = k2.shape
    return mm(k1.reshape(n1 * s1, d), k2.reshape(n2 * s2, d).T).reshape(n1, s1, n2, s2).permute(0, 2, 1, 3)


def index_gram(k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """X[n, m, s, t] = [k1[n, s] == k2[m, t]] for integer keys (N, S): the one-hot Gram, never one-hot."""
    return (k1[:, None, :, None] == k2[None, :, None, :])


def keys_gram(k1: torch.Tensor, k2: torch.Tensor, kind: Literal["dot", "index"], plus_one: bool, dtype: torch.dtype) -> torch.Tensor:
    """X (N1, N2, S1, S2) of two factors' keys, plus 1 when the bias Jacobian is folded in."""
    x = (dot_gram if kind == "dot" else index_gram)(k1, k2).to(dtype)
    return x + 1 if plus_one else x


def pair_contraction_flops(mode: Mode, positions: int, key_dim: int, num_outputs: int, e: int) -> float:
    """FLOPs of contracting one pair of samples in the position-pair form: S² (d + O^k e),
    k = 2 for full, else 1."""
    return 2.0 * positions * positions * (key_dim + (num_outputs * num_outputs if mode == "full" else num_outputs) * e)
