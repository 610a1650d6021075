"""Per-sample factors of one parameter group and their contraction into a kernel block.

Two kinds:

* ``JacobianFactor``: the group's per-sample Jacobian J (N, O, p), contracted by GEMMs.
* ``PairFactor``: layer inputs (keys) and output cotangents g (N, O, S, e) of a layer
  y_s = W k_s (+ b) applied at S positions. The group's kernel is
  Σ_{s,t} X(k_{n,s}, k'_{m,t}) ⟨g_{n,a,s}, g'_{m,b,t}⟩, with X the input Gram (plus 1 when
  the bias is folded in, since the bias Jacobian is Σ_s g_s); dy/dW is never formed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from ..._gemm import mm
from ...reduction import Mode
from ..contraction import contract_jacobian_pair, is_output_major, jacobian_pair_flops, keys_gram, pair_contraction_flops, summed_over_outputs

@dataclass
class JacobianFactor:
    """J (N, O, p): a parameter group's per-sample Jacobian, flattened."""

    jacobian: torch.Tensor

    def contract(self, other: "JacobianFactor", mode: Mode) -> torch.Tensor:
        return contract_jacobian_pair(self.jacobian, other.jacobian, mode)

    def head(self, k: int) -> "JacobianFactor":
        """The factor of the first k samples."""
        return JacobianFactor(self.jacobian[:k])

    def outputs(self, index: torch.Tensor) -> "JacobianFactor":
        """The factor of the outputs ``index`` only."""
        return JacobianFactor(self.jacobian[:, index])

    def projected(self, directions: torch.Tensor) -> "JacobianFactor":
        """One pseudo-sample whose m outputs are Σ_{n,a} directions[c, n, a] J[n, a]: its full
        contraction with itself is R F Rᵀ (m, m), F this factor's (directions (m, N, O))."""
        return JacobianFactor(torch.einsum("cna,nap->cp", directions, self.jacobian)[None])

    @staticmethod
    def stack_outputs(parts: list["JacobianFactor"]) -> "JacobianFactor":
        """The factor of all outputs from factors of consecutive output slices."""
        return JacobianFactor(stack_along_outputs([p.jacobian for p in parts]))

    def pair_flops(self, mode: Mode) -> float:
        """FLOPs of contracting one pair of samples."""
        o, p = self.jacobian.shape[1:]
        return jacobian_pair_flops(mode, o, p)

    def merge(self, other: "JacobianFactor") -> "JacobianFactor":
        """Two uses of one parameter: their Jacobians add."""
        return JacobianFactor(self.jacobian + other.jacobian)

    def nbytes(self) -> int:
        return self.jacobian.numel() * self.jacobian.element_size()


def output_major(g: torch.Tensor) -> torch.Tensor:
    """g (N, O, ...) stored output by output (as a (O, N, ...) tensor, the layout backward
    passes batched over outputs produce), viewed as (N, O, ...); copies only if it is not."""
    return g.transpose(0, 1).contiguous().transpose(0, 1)


def stack_along_outputs(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (N, O_i, ...) parts along the outputs, output-major if they all are."""
    if len(parts) == 1:
        return parts[0]
    if all(is_output_major(p) for p in parts):
        return torch.cat([p.transpose(0, 1) for p in parts]).transpose(0, 1)
    return torch.cat(parts, dim=1)


@dataclass
class PairFactor:
    """Keys and cotangents g (N, O, S, e) of a linear map applied at S positions.

    ``kind`` "dot": keys (N, S, d) are layer inputs, X = ⟨k, k'⟩; "index": keys (N, S)
    are embedding indices, X = [k == k']. The cotangents are kept output-major (see
    :func:`output_major`), the layout they are computed in, so no contraction copies them;
    with ``sample_major`` they are copied once, sample by sample, so that each trace
    contraction of a single-position layer is one GEMM over O·e rather than O smaller ones.
    """

    keys: torch.Tensor
    cotangents: torch.Tensor
    kind: Literal["dot", "index"]
    plus_one: bool
    sample_major: bool = False

    def __post_init__(self) -> None:
        self.cotangents = self.cotangents.contiguous() if self.sample_major else output_major(self.cotangents)

    def merge(self, other: "PairFactor") -> "PairFactor":
        """Two uses of one weight: their positions concatenate."""
        return PairFactor(
            torch.cat([self.keys, other.keys], dim=1),
            torch.cat([self.cotangents, other.cotangents], dim=2),
            self.kind,
            self.plus_one,
            self.sample_major,
        )

    @staticmethod
    def stack_outputs(parts: list["PairFactor"]) -> "PairFactor":
        """The factor of all outputs from factors of consecutive output slices (same keys)."""
        first = parts[0]
        cotangents = stack_along_outputs([p.cotangents for p in parts])
        return first if cotangents is first.cotangents else PairFactor(first.keys, cotangents, first.kind, first.plus_one, first.sample_major)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.cotangents))

    def pair_flops(self, mode: Mode) -> float:
        """FLOPs of contracting one pair of samples (see :func:`pair_contraction_flops`)."""
        o, s, e = self.cotangents.shape[1:]
        return pair_contraction_flops(mode, s, self.keys.shape[-1] if self.kind == "dot" else 1, o, e)

    def head(self, k: int) -> "PairFactor":
        """The factor of the first k samples."""
        return PairFactor(self.keys[:k], self.cotangents[:k], self.kind, self.plus_one, self.sample_major)

    def outputs(self, index: torch.Tensor) -> "PairFactor":
        """The factor of the outputs ``index`` only."""
        return PairFactor(self.keys, self.cotangents[:, index], self.kind, self.plus_one, self.sample_major)

    def projected(self, directions: torch.Tensor) -> "PairFactor":
        """One pseudo-sample whose positions are every sample's, with the cotangents of its m
        outputs Σ_a directions[c, n, a] g[n, a] at sample n's: its full contraction with itself
        is R F Rᵀ (m, m), F this factor's (the contraction is bilinear in the cotangents)."""
        n, _, s, e = self.cotangents.shape
        keys = self.keys.reshape(1, n * s, *self.keys.shape[2:])
        cotangents = torch.einsum("cna,nase->cnse", directions, self.cotangents).reshape(1, -1, n * s, e)
        return PairFactor(keys, cotangents, self.kind, self.plus_one)

    def contract(self, other: "Factor", mode: Mode) -> torch.Tensor:
        other = as_pair(other)
        assert isinstance(other, PairFactor)
        n1, o, s1, e = self.cotangents.shape
        n2, _, s2, _ = other.cotangents.shape
        x = keys_gram(self.keys, other.keys, self.kind, self.plus_one, self.cotangents.dtype)  # (N1, N2, S1, S2)
        if s1 == 1 and s2 == 1:
            x = x.reshape(n1, n2)
            product = contract_jacobian_pair(self.cotangents.reshape(n1, o, e), other.cotangents.reshape(n2, o, e), mode)
            return product.mul_(x if mode == "trace" else x[:, :, None, None] if mode == "full" else x[:, :, None])
        # rows (N·S, O, e), views of the output-major cotangents
        g1 = self.cotangents.transpose(1, 2).reshape(n1 * s1, o, e)
        g2 = other.cotangents.transpose(1, 2).reshape(n2 * s2, o, e)
        if mode == "full":
            cot = contract_jacobian_pair(g1, g2, "full").reshape(n1, s1, n2, s2, o, o)
            return torch.einsum("nsmtab,nmst->nmab", cot, x)
        if mode == "trace":
            return torch.einsum("nsmt,nmst->nm", summed_over_outputs(g1, g2).reshape(n1, s1, n2, s2), x)
        cot = contract_jacobian_pair(g1, g2, "diagonal").reshape(n1, s1, n2, s2, o)
        return torch.einsum("nsmta,nmst->nma", cot, x)


@dataclass
class RowsPairFactor:
    """A dense layer whose output cotangents are g[n, a] = derivative[n] ⊙ rows[a]: the layer
    right before a chain's last activation (derivative = that activation's, per sample; rows =
    the cotangents after it, common to all samples, e.g. the dense output layer's weight
    rows; see :func:`.chain.compact_uses`). Stored as keys (N, 1, d),
    derivative (N, e) and rows (O, e) instead of N·O·e cotangents; in trace mode
    Σ_a ⟨g[n, a], g'[m, a]⟩ = Σ_k derivative[n, k] derivative'[m, k] Σ_a rows[a, k]², one
    N1×e×N2 GEMM instead of an O times larger one. Other modes use the cotangents themselves.
    """

    keys: torch.Tensor
    derivative: torch.Tensor
    rows: torch.Tensor
    plus_one: bool

    def materialized(self) -> PairFactor:
        """The same factor with its cotangents (N, O, 1, e) formed."""
        g = self.derivative[:, None, None, :] * self.rows[None, :, None, :]
        return PairFactor(self.keys, g, "dot", self.plus_one)

    def contract(self, other: "Factor", mode: Mode) -> torch.Tensor:
        if mode != "trace" or not isinstance(other, RowsPairFactor):
            return self.materialized().contract(as_pair(other), mode)
        assert self.rows.shape == other.rows.shape  # the output layer's rows, on both sides
        x = keys_gram(self.keys, other.keys, "dot", self.plus_one, self.derivative.dtype)
        weights = self.rows.square().sum(0)  # Σ_a rows[a, k]²
        product = mm(self.derivative * weights, other.derivative.T)
        return product.mul_(x.reshape(product.shape))

    def head(self, k: int) -> "RowsPairFactor":
        """The factor of the first k samples (the rows are common to all)."""
        return RowsPairFactor(self.keys[:k], self.derivative[:k], self.rows, self.plus_one)

    def outputs(self, index: torch.Tensor) -> "RowsPairFactor":
        """The factor of the outputs ``index`` only."""
        return RowsPairFactor(self.keys, self.derivative, self.rows[index], self.plus_one)

    def projected(self, directions: torch.Tensor) -> PairFactor:
        """See :meth:`PairFactor.projected`."""
        return self.materialized().projected(directions)

    @staticmethod
    def stack_outputs(parts: list["RowsPairFactor"]) -> "RowsPairFactor":
        """The factor of all outputs from factors of consecutive output slices (same derivative)."""
        first = parts[0]
        return RowsPairFactor(first.keys, first.derivative, torch.cat([p.rows for p in parts]), first.plus_one)

    def nbytes(self) -> int:
        """Bytes that grow with the samples (the O×e rows are the output layer's, shared)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.derivative))

    def pair_flops(self, mode: Mode) -> float:
        d, e = self.keys.shape[-1], self.derivative.shape[-1]
        if mode != "trace":  # contracted in its formed shape
            return pair_contraction_flops(mode, 1, d, self.rows.shape[0], e)
        return 2.0 * (d + e)


@dataclass(frozen=True)
class FactorShape:
    """What the cost model needs of a factor, from shapes alone: "jacobian" of ``size``
    parameters, or "pair" with keys of ``size`` (1 for indices) at ``positions`` positions
    and cotangents of ``e`` numbers per position."""

    kind: Literal["jacobian", "pair"]
    size: int
    positions: int = 1
    e: int = 0
    key_kind: Literal["dot", "index"] = "dot"
    plus_one: bool = False

    def pair_flops(self, mode: Mode, num_outputs: int) -> float:
        """FLOPs of contracting one pair of samples (as the factor's ``pair_flops``)."""
        if self.kind == "jacobian":
            return jacobian_pair_flops(mode, num_outputs, self.size)
        return pair_contraction_flops(mode, self.positions, self.size, num_outputs, self.e)

    def nbytes(self, n: int, num_outputs: int, itemsize: int) -> int:
        """Bytes of the factor of n samples (indices as int64)."""
        if self.kind == "jacobian":
            return n * num_outputs * self.size * itemsize
        keys = n * self.positions * self.size * (8 if self.key_kind == "index" else itemsize)
        return keys + n * num_outputs * self.positions * self.e * itemsize

    def merge(self, other: "FactorShape") -> "FactorShape | None":
        """Two uses of one group (as ``merge``: Jacobians add, positions concatenate), or None
        where they cannot be combined."""
        if dataclasses.replace(self, positions=other.positions) != other:
            return None
        return self if self.kind == "jacobian" else dataclasses.replace(self, positions=self.positions + other.positions)


def as_pair(factor: "Factor") -> "Factor":
    """A factor in its general form (a RowsPairFactor with its cotangents formed)."""
    return factor.materialized() if isinstance(factor, RowsPairFactor) else factor


Factor = JacobianFactor | PairFactor | RowsPairFactor
