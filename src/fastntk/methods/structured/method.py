"""Method "structured": the kernel from the structure of each layer (Novak et al., ICML 2022).

Per block of samples: one forward pass records the inputs of every covered op
(``rules``), backward passes over the whole block give the output cotangents (several
outputs per vmapped pass while they are small, else one output at a time), and each
parameter group's share of the kernel is contracted from those factors without forming
dy/dW. Parameters no rule covers get exact per-sample Jacobians (the fallback),
so every model works and the kernel stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from ..._gemm import fast_matmuls
from ..._errors import ModelError
from ..._functional import FunctionalModel
from ..._inputs import Batch, batch_size, concat, take
from ...reduction import Mode, block_shape
from ..._process import quiet_fallbacks
from ..base import KernelMethod, Kept
from ..contraction import flat_jacobian
from ..jacobian import jacobian_bytes, per_sample_jacobians
from .capture import Capture, Use, capture, per_output_cotangents, samples_of, shape_of
from .chain import RowsCotangents, chain_cotangent_chunks, compact_uses
from .check import failed_groups
from .factors import Factor, FactorShape, JacobianFactor, PairFactor, RowsPairFactor, as_pair
from .rules.base import Roles

Factors = dict[tuple[str, ...], Factor]
T = TypeVar("T")


def mergeable(a: Factor, b: Factor) -> bool:
    """Whether two uses' factors of one parameter group can be combined exactly (in their
    general form, see :func:`as_pair`)."""
    a, b = as_pair(a), as_pair(b)
    if isinstance(a, JacobianFactor) and isinstance(b, JacobianFactor):
        return a.jacobian.shape == b.jacobian.shape
    if isinstance(a, PairFactor) and isinstance(b, PairFactor):
        return a.kind == b.kind and a.plus_one == b.plus_one and a.keys.shape[2:] == b.keys.shape[2:]
    return False


CHECKED_SAMPLES = 2
"""Samples the calibration's check runs on: two, so that reordered samples show."""

CHUNK_BYTES = 16 * 2**20
"""Cotangents of several outputs are computed in one vmapped backward pass up to this size."""


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
    batched_backward: bool
    """Whether the model's backward vmaps over outputs without falling back to loops (False
    also when calibration's block took one output per pass: it was not tried)."""
    direction_bytes: int
    """Bytes of one sample's cotangents for one output."""
    matmul_heavy: bool
    """Whether matrix products make most of the forward FLOPs: then a chain's backward passes
    use oneDNN's and the backward passes are vmapped over several outputs at once."""
    clone_outputs: bool = False
    """Whether the model writes over a recorded layer output in place, so that the forward
    pass must give it copies (see :func:`capture`)."""
    chain: bool = False
    """Whether the model is one chain of layers, activations and affine maps whose cotangents
    come without autograd (see :mod:`.chain`): then the forward passes record no graph."""

    def output_chunk(self, n: int, num_outputs: int) -> int:
        """Outputs whose cotangents are computed together for a block of n samples."""
        if not self.batched_backward:
            return 1
        return output_chunk(n, num_outputs, self.direction_bytes, self.matmul_heavy, n * self.forward_flops)


class StructuredMethod(KernelMethod):
    """Structured derivatives per parameter group, with the Jacobian fallback for the rest.

    Immutable once built: ``calibration`` (a :class:`Layout`, from :meth:`calibrated`) fixes
    which groups are structured and which parameters fall back; ``estimate`` (a Layout read
    off shapes by :meth:`estimated`) serves the cost model and block sizing before that.
    """

    name = "structured"
    calibration: Layout | None

    def __init__(self, f: FunctionalModel, mode: Mode, num_outputs: int, calibration: Layout | None = None, estimate: Layout | None = None) -> None:
        super().__init__(f, mode, num_outputs, calibration)
        self.estimate = estimate

    @property
    def ready(self) -> bool:
        return self.calibration is not None

    @property
    def compact_rows(self) -> bool:
        """Whether a chain's cotangents of the form derivative ⊙ rows stay compact (trace mode:
        see ``RowsPairFactor``), and its cotangents come sample by sample."""
        return self.mode == "trace"

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

    @property
    def layout(self) -> Layout:
        """The calibrated layout, else the estimated one (for the cost model)."""
        layout = self.calibration or self.estimate
        assert layout is not None, "estimated() or calibrated() first"
        return layout

    def estimated(self, x: Batch) -> "StructuredMethod":
        """This method with the layout read off one forward pass on a few samples (no backward
        pass, no kernel, no check): what calibration would find, unless its check sends groups
        to the fallback (the engine then re-sizes its blocks).

        Each covered use's rule gives its factors' shapes (``Rule.factor_shapes``); one
        output's cotangents come on top, and the Jacobian rows of the parameters no rule
        covers. The factors' kinds and contraction FLOPs come from the same shapes (no
        arithmetic). A chain model (:mod:`.chain`) whose factors include compact ones in trace
        mode (``RowsPairFactor``) has its factors of these few samples computed instead, no
        autograd needed.
        """
        if self.calibration is not None or self.estimate is not None:
            return self
        observed = capture(self.f, x, graph=False)
        n, o = observed.outputs.shape
        sizes = {name: p.numel() for name, p in self.f.primals.items()}
        if observed.chain is not None and self.compact_rows and compact_uses(observed.chain):
            factors, conflicts = self.factors_of(observed, chunk=o, chain=True)
            total = sum(f.nbytes() for f in factors.values())
            costs = {group: (kind_of(f), f.pair_flops(self.mode)) for group, f in factors.items()}
        else:
            per_use = [
                {g: shape for part in roles for g, shape in use.rule.factor_shapes(use.saved, use.output, part, sizes, self.mode, o).items()}
                for use, roles in zip(observed.uses, roles_by_use(observed.uses))
            ]
            itemsize = observed.outputs.element_size()
            total = sum(shape.nbytes(n, o, itemsize) for shapes in per_use for shape in shapes.values())  # for all n samples
            shapes, conflicts = merge_uses(per_use, FactorShape.merge)
            costs = {group: (shape.kind, shape.pair_flops(self.mode, o)) for group, shape in shapes.items()}
        fallback = sorted(observed.unstructured & set(self.f.primals))
        size = total // n + direction_bytes(observed) + jacobian_bytes(self.f, o, fallback)
        structured, fallback_names = split_fallback(costs, observed.unstructured | conflicts)
        estimate = self.layout_of(observed, structured, fallback_names, size, True, observed.chain is not None)
        return StructuredMethod(self.f, self.mode, self.num_outputs, estimate=estimate)

    def layout_of(
        self, observed: Capture, costs: dict[tuple[str, ...], tuple[str, float]], fallback: set[str], bytes_: int, batched: bool | None, chain: bool
    ) -> Layout:
        """The layout of a captured block whose structured groups have these kinds and pair FLOPs."""
        n = observed.outputs.shape[0]
        names = set(observed.primals)
        return Layout(
            frozenset(costs),
            tuple(sorted(fallback & names)),
            bytes_,
            {group: flops for group, (_, flops) in costs.items()},
            {group: kind for group, (kind, _) in costs.items()},
            observed.flops / n + 2.0 * sum(self.f.primals[p].numel() for p in observed.unstructured & names),
            batched,
            direction_bytes(observed),
            observed.matmul_flops >= 0.5 * observed.flops > 0,
            observed.cloned,
            chain,
        )

    def use_factors(self, use: Use, cotangents: torch.Tensor | RowsCotangents, roles: list[Roles], num_outputs: int) -> Factors:
        """One use's factors from its cotangents (N, K, *output shape[1:]), or from compact ones."""
        factors: Factors = {}
        for part in roles:
            compact = use.rule.rows_factors(use.saved, cotangents, part, self.mode, num_outputs) if isinstance(cotangents, RowsCotangents) else None
            if compact is None:
                formed = cotangents.formed() if isinstance(cotangents, RowsCotangents) else cotangents
                compact = use.rule.factors(use.saved, formed, part, self.mode, num_outputs)
            factors.update(compact)
        return factors

    def calibrated(self, x: Batch, keep: bool = False) -> tuple["StructuredMethod", Kept | None]:
        """This method bound to the layout that the samples x show, each structured group
        checked against autograd; and with ``keep`` what it computed for x.

        The factors of x are computed; then the check (:mod:`.check`) compares, on the first
        CHECKED_SAMPLES samples of x, what each group contributes to their kernel entries
        (contracted) with autograd's gradients in random
        directions; a group that disagrees (an op used in a way its rule does not model,
        samples reordered inside the model, ...) goes to the Jacobian fallback. A chain's
        hand-made cotangents (:mod:`.chain`) that disagree are dropped for autograd's. Also
        measures the factors' bytes per sample. With ``keep``, x's factors (fallback included)
        are returned for the engine's first ``left(x)``: calibrating on the first block costs
        only the check.
        Reached only through the engine (:func:`fastntk.blocks.engine.calibrate_on_first_block`).
        """
        graph_free = self.estimate is not None and self.estimate.chain  # the estimate saw a chain: no graph needed
        outcome = self.calibrated_once(x, keep, chain_allowed=True, graph_free=graph_free)
        return outcome or self.calibrated_once(x, keep, chain_allowed=False, graph_free=False)  # type: ignore[return-value]

    def calibrated_once(
        self, x: Batch, keep: bool, chain_allowed: bool, graph_free: bool
    ) -> tuple["StructuredMethod", Kept | None] | None:
        """:meth:`calibrated`, taking a chain's cotangents from :mod:`.chain` when allowed; None
        when the check rejects those (then autograd's are to be used)."""
        observed = capture_for(self.f, x, chain=graph_free and chain_allowed)
        n, o = observed.outputs.shape
        per_direction = direction_bytes(observed)
        heavy = observed.matmul_flops >= 0.5 * observed.flops > 0
        chunk = output_chunk(n, o, per_direction, heavy, observed.flops)
        chain = observed.chain is not None and chain_allowed

        batched = True  # a chain's cotangents come without autograd, chunked as any
        if chain:
            factors, conflicts = self.factors_of(observed, chunk=chunk, fast=heavy, chain=True)
        else:
            batched = False
            if chunk > 1:  # learn whether the backward pass vmaps over outputs
                with quiet_fallbacks() as fallbacks:  # this thread's, without swapping the process's filters
                    try:
                        factors, conflicts = self.factors_of(observed, chunk=chunk, retain_graph=True, fast=heavy)
                        batched = not fallbacks
                    except RuntimeError:  # an op whose backward cannot be vmapped over outputs
                        pass
            if not batched:  # (a block of one output per pass at calibration keeps one per pass)
                factors, conflicts = self.factors_of(observed, chunk=1, fast=heavy)
        observed.outputs = shape_of(observed.outputs)  # free the graph before the check
        candidates, _ = split_fallback(factors, observed.unstructured | conflicts)
        probe = take(x, 0, min(n, CHECKED_SAMPLES))
        with fast_matmuls():  # the contractions call _gemm.mm, as they will for the kernel
            failed = failed_groups(self.f, probe, self.mode, o, candidates)
        rejected = {name for group in failed for name in group}
        if chain and rejected:  # the chain's cotangents disagree with autograd's: leave it to autograd
            return None
        structured, fallback = split_fallback(factors, observed.unstructured | conflicts | rejected)
        fallback_names = sorted(fallback & set(observed.primals))
        # kept: the factors; transient: one output's cotangents (a chunk of several is capped by CHUNK_BYTES)
        bytes_ = sum(f.nbytes() for f in structured.values()) // n + per_direction
        bytes_ += jacobian_bytes(self.f, o, fallback_names)
        costs = {group: (kind_of(f), f.pair_flops(self.mode)) for group, f in structured.items()}
        method = StructuredMethod(self.f, self.mode, self.num_outputs, self.layout_of(observed, costs, fallback, bytes_, batched, chain))
        # Kept for the engine's first block, fallback Jacobians added, unless calibration found more
        # bytes per sample than blocks were sized for: the engine then shrinks them and drops this.
        within = self.estimate is None or bytes_ <= self.estimate.bytes_per_sample
        return method, Kept(factors=method.with_fallback(structured, x)) if keep and within else None

    def factors_of(
        self, observed: Capture, chunk: int, retain_graph: bool = False, fast: bool = False, chain: bool = False
    ) -> tuple[Factors, set[str]]:
        """Factors by group for a captured block, ``chunk`` outputs' cotangents at a time, and
        the parameters whose uses cannot be combined exactly; ``fast``: oneDNN products;
        ``chain``: cotangents from the model's chain (:mod:`.chain`) instead of autograd;"""
        uses = observed.uses
        roles_of = roles_by_use(uses)
        parts: list[list[Factors]] = [[] for _ in uses]
        n, o = observed.outputs.shape
        if chain:
            assert observed.chain is not None
            compact = self.compact_rows
            chunks = chain_cotangent_chunks(observed.chain, len(uses), n, o, chunk, sample_major=compact, keep_rows=compact)
        else:
            chunks = per_output_cotangents(observed.outputs, [use.output for use in uses], chunk, retain_graph)
        with fast_matmuls(fast):  # a chain's backward calls _gemm.mm
            for start, cotangents in zip(range(0, o, chunk), chunks):
                for i, use in enumerate(uses):
                    g, cotangents[i] = cotangents[i], None  # each use's cotangents go once its factors are made
                    if g is not None:  # None: this layer does not affect the outputs
                        part = self.use_factors(use, g, roles_of[i], o)
                        parts[i].append(part)
                    del g
                del cotangents
        return merge_uses([stack_outputs(p) for p in parts if p])

    def with_fallback(self, factors: Factors, x: Batch) -> Factors:
        """The structured groups' factors plus the fallback parameters' per-sample Jacobians on x."""
        factors = {group: f for group, f in factors.items() if group in self.groups}
        if self.fallback:
            restricted = self.f.restrict(self.fallback)
            jacobians = per_sample_jacobians(restricted, x)
            self.f.batchable = restricted.batchable  # False once vmap failed: later blocks loop at once
            factors.update({(name,): JacobianFactor(flat_jacobian(j)) for name, j in jacobians.items()})
        return factors

    def left(self, x: Batch) -> Factors:
        return self.block_factors(x)

    def block_factors(self, x: Batch) -> Factors:
        """The factors of the block x, the fallback's included."""
        assert self.calibration is not None, "calibrate first (the engine's calibrate_on_first_block)"
        heavy = self.calibration.matmul_heavy
        observed = capture_for(self.f, x, self.calibration.clone_outputs, chain=self.calibration.chain)
        chain = self.calibration.chain and observed.chain is not None
        n, o = observed.outputs.shape
        chunk = self.calibration.output_chunk(n, o)
        factors, conflicts = self.factors_of(observed, chunk, fast=heavy, chain=chain)
        if not (observed.unstructured | conflicts) & set(self.f.primals) <= set(self.fallback):
            raise ModelError(
                "the model uses its parameters differently from one block of inputs to another (data-dependent "
                "control flow), so the structured method cannot pair its factors; use method='jacobian'"
            )
        return self.with_fallback(factors, x)

    def left_and_right(self, x1: Batch, x2: Batch) -> tuple[Factors, Factors]:
        """For a chain model: one forward pass over x1 and x2 together (taller GEMMs, one pass's
        overhead), then each side's cotangents and factors from its own rows."""
        layout = self.calibration
        if layout is None or not layout.chain:
            return super().left_and_right(x1, x2)
        n1 = batch_size(x1)
        observed = capture(self.f, concat([x1, x2]), layout.clone_outputs, graph=False)
        if observed.chain is None or (observed.unstructured & set(self.f.primals)) - set(self.fallback):
            return super().left_and_right(x1, x2)
        sides = []
        for x, (start, stop) in ((x1, (0, n1)), (x2, (n1, n1 + batch_size(x2)))):
            part = samples_of(observed, start, stop)
            factors, _ = self.factors_of(part, layout.output_chunk(stop - start, part.outputs.shape[1]), fast=layout.matmul_heavy, chain=True)
            sides.append(self.with_fallback(factors, x))
        return sides[0], sides[1]

    def contract(self, left: Factors, right: Factors) -> torch.Tensor:
        total = None
        for group, factor in left.items():
            if group not in right:
                continue  # this group does not affect the other block's outputs
            part = factor.contract(right[group], self.mode)  # type: ignore[arg-type]
            total = part if total is None else total.add_(part)
        if total is None:
            n1, n2 = _samples(left), _samples(right)
            return torch.zeros(block_shape(self.mode, n1, n2, self.num_outputs), dtype=self.f.dtype, device=self.f.device)
        return total

    def bytes_per_sample(self) -> int:
        if self.calibration is not None or self.estimate is not None:
            return self.layout.bytes_per_sample
        return jacobian_bytes(self.f, self.num_outputs)  # at most: every parameter in the fallback


def capture_for(f: FunctionalModel, x: Batch, clone_outputs: bool = False, chain: bool = False) -> Capture:
    """A capture for the cotangents to come: without an autograd graph when they are to come
    from the model's ``chain`` (none is needed), else — or should these inputs not make one
    chain after all — with the graph autograd needs."""
    if chain:
        observed = capture(f, x, clone_outputs, graph=False)
        if observed.chain is not None:
            return observed
    return capture(f, x, clone_outputs)


def direction_bytes(observed: Capture) -> int:
    """Bytes of one sample's cotangents for one output: one per covered use's output."""
    n = observed.outputs.shape[0]
    return sum(use.output.numel() * use.output.element_size() for use in observed.uses) // max(1, n)


SMALL_PASSES = 2**26
"""Forward FLOPs of a block below which its passes are short enough for per-output Python
overhead to dominate."""


def output_chunk(n: int, num_outputs: int, per_direction: int, matmul_heavy: bool, block_flops: float) -> int:
    """Outputs whose cotangents one backward pass computes for n samples.

    Several (as many as fit CHUNK_BYTES) for matrix products (taller GEMMs), or when the
    passes are so small that per-output overhead dominates; else one. PyTorch's batching
    rule for the convolution backward loops over the outputs and stacks the results, so
    bigger convolution blocks get their cotangents one output at a time.
    """
    if not matmul_heavy and block_flops >= SMALL_PASSES:
        return 1
    return max(1, min(num_outputs, CHUNK_BYTES // max(1, n * per_direction)))


def shared_parameters(uses: list[Use]) -> set[str]:
    """Parameters that the uses' rules would put in more than one group (e.g. a weight tied
    across two Linear layers with their own biases): they get one group per parameter."""
    groups_of: dict[str, set[tuple[str, ...]]] = {}
    for use in uses:
        for group in use.rule.groups(use.roles):
            for name in group:
                groups_of.setdefault(name, set()).add(group)
    return {name for name, groups in groups_of.items() if len(groups) > 1}


def roles_by_use(uses: list[Use]) -> list[list[Roles]]:
    """Each use's roles, one at a time for uses of shared parameters (see shared_parameters)."""
    shared = shared_parameters(uses)
    return [[{role: name} for role, name in use.roles.items()] if shared & set(use.roles.values()) else [use.roles] for use in uses]


def split_fallback(factors: dict[tuple[str, ...], T], fallback: set[str]) -> tuple[dict[tuple[str, ...], T], set[str]]:
    """The groups free of fallback parameters, and the fallback grown by the other groups'
    parameters: a group is structured whole or not at all."""
    fallback = set(fallback)
    for group in factors:
        if fallback & set(group):
            fallback.update(group)
    return {group: f for group, f in factors.items() if not fallback & set(group)}, fallback


def stack_outputs(parts: list[Factors]) -> Factors:
    """A use's factors over all outputs from its factors of one output each."""
    return {group: type(factor).stack_outputs([p[group] for p in parts]) for group, factor in parts[0].items()}


def merge_factors(a: Factor, b: Factor) -> Factor | None:
    """Two uses' factors of one group combined exactly, or None where they cannot be."""
    return as_pair(a).merge(as_pair(b)) if mergeable(a, b) else None  # type: ignore[union-attr, arg-type]


def merge_uses(per_use: list[dict[tuple[str, ...], T]], combine: Callable[[T, T], T | None] = merge_factors) -> tuple[dict[tuple[str, ...], T], set[str]]:  # type: ignore[assignment]
    """Combine the uses' factors (or their shapes) group by group; groups that cannot be
    combined (``combine`` gives None) are dropped and their parameters returned (they go to
    the Jacobian fallback)."""
    merged: dict[tuple[str, ...], T] = {}
    conflicts: set[str] = set()
    for factors in per_use:
        for group, factor in factors.items():
            if group not in merged:
                merged[group] = factor
                continue
            combined = combine(merged[group], factor)
            if combined is None:
                conflicts.update(group)
            else:
                merged[group] = combined
    return {group: f for group, f in merged.items() if not conflicts & set(group)}, conflicts


def kind_of(factor: Factor) -> str:
    """How a factor is contracted: "jacobian" or "pair" (input and cotangent Grams)."""
    return "jacobian" if isinstance(factor, JacobianFactor) else "pair"


def _samples(factors: Factors) -> int:
    factor = next(iter(factors.values()), None)
    if factor is None:
        return 0
    if isinstance(factor, RowsPairFactor):
        return factor.derivative.shape[0]
    return (factor.jacobian if isinstance(factor, JacobianFactor) else factor.cotangents).shape[0]
