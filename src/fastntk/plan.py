"""A cost model from shapes: estimated FLOPs and bytes per exact method, and the cheapest plan.

Every exact method first needs, per sample, a forward pass and O reverse passes
(≈ 3 forward passes each): the Jacobian method to form J, the structured method to get
layer inputs and output cotangents. They differ in the contraction:

* jacobian:   2·N1·N2·O^k·P (k = 2 for "full", 1 for "trace"/"diagonal")
* structured: N1·N2·Σ_groups c_g, with c_g each group's per-pair cost (input Gram plus
  cotangent Gram, or its Jacobian contraction), plus the jacobian cost of fallback parameters
* vp:         no contraction, but N2·O forward-mode passes over all N1 samples: 3·N1·N2·O·[FP]

[FP] is counted by the structured method's capture (matmuls and convolutions). Nothing here
computes a kernel or calibrates: the structured method's layout comes from one forward pass
on one sample (``StructuredMethod.estimated``), or from its calibration when an earlier
call made one. Factors that do not fit the memory budget beside a block are recomputed for
every block row, which the model counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .blocks.budget import Sizing
from ._functional import FunctionalModel
from ._inputs import Batch, first_samples
from .reduction import Mode
from .methods import METHODS, KernelMethod, StructuredMethod
from .methods.contraction import jacobian_pair_flops
from .methods.per_sample import loop_overhead

BACKWARD_FACTOR = 3.0
"""A reverse pass (with its forward) costs about this many forward passes."""


@dataclass(frozen=True)
class GroupCost:
    """One parameter group of the structured method."""

    parameters: tuple[str, ...]
    kind: str
    """"pair" (input and cotangent Grams), "jacobian" (per-sample Jacobians), "fallback" (by autograd)."""
    flops: float
    """Estimated FLOPs of contracting this group over all sample pairs."""


@dataclass
class Plan:
    """Estimated cost of each exact method for one kernel, and the chosen one.

    Attributes:
        n1, n2, num_outputs, num_params, mode: the problem (n2 = None: a Gram matrix).
        forward_flops: [FP], FLOPs of one sample's forward pass.
        flops, bytes_per_sample: estimates per method ("jacobian", "vp", "structured").
        groups: the structured method's parameter groups and their contraction FLOPs.
        chosen: the method with the fewest estimated FLOPs.
    """

    n1: int
    n2: int | None
    num_outputs: int
    num_params: int
    mode: Mode
    forward_flops: float
    flops: dict[str, float]
    bytes_per_sample: dict[str, int]
    groups: list[GroupCost] = field(default_factory=list)
    chosen: str = "structured"
    block_size: int | None = None
    """Samples per block of the chosen method (None: it cannot keep within the budget)."""
    min_memory: dict[str, int] = field(default_factory=dict)
    """Per method, the smallest ``max_memory`` it can compute this kernel in (blocks of one
    sample, plus the result when it is held in memory)."""
    unusable: dict[str, str] = field(default_factory=dict)
    """Methods "auto" may not choose, with the reason (no forward-mode rule, over the memory budget)."""

    def __str__(self) -> str:
        pairs = f"{self.n1}x{self.n1 if self.n2 is None else self.n2}{' (Gram)' if self.n2 is None else ''}"
        lines = [
            f"fastntk plan: {pairs} samples, O={self.num_outputs}, P={self.num_params:,}, mode={self.mode}, "
            f"forward {self.forward_flops / 1e6:.3g} MFLOP/sample",
            f"{'method':<12}{'est. GFLOP':>12}{'MiB/sample':>12}",
        ]
        for name, flops in sorted(self.flops.items(), key=lambda kv: kv[1]):
            mark = f"  <- chosen (blocks of {self.block_size} samples)" if name == self.chosen and self.block_size else "  <- chosen" if name == self.chosen else ""
            lines.append(f"{name:<12}{flops / 1e9:>12.3f}{self.bytes_per_sample[name] / 2**20:>12.2f}{mark}")
        lines += [f"{name} cannot be used: {reason}" for name, reason in self.unusable.items()]
        if self.groups:
            lines.append("structured method, contraction per parameter group (GFLOP):")
            for g in self.groups:
                lines.append(f"  {', '.join(g.parameters):<50} {g.kind:<9} {g.flops / 1e9:.4f}")
        return "\n".join(lines)


def sample_pairs(n1: int, n2: int | None) -> float:
    """Sample pairs a kernel contracts: n1·n2, or n1(n1+1)/2 for a Gram matrix (n2 None)."""
    return n1 * (n1 + 1) / 2 if n2 is None else n1 * n2


def estimate(method: KernelMethod, sizing: Sizing, fp: float) -> float:
    """Estimated FLOPs of ``method`` on the kernel ``sizing`` describes."""
    o, p, mode = method.num_outputs, method.f.num_params, method.mode
    n1, symmetric = sizing.n1, sizing.symmetric
    m = n1 if symmetric else sizing.n2
    pairs = sample_pairs(n1, None if symmetric else m)
    factor_samples = n1 if symmetric else n1 + m
    block = 1 if sizing.over(method) else sizing.block(method)
    rows = -(-n1 // block)
    if rows > 1 and m * method.bytes_per_sample() > sizing.cache_capacity(method, block):  # right factors recomputed per block row
        factor_samples = n1 + rows * m
    per_sample = fp + o * BACKWARD_FACTOR * fp
    looped = 0.0 if method.f.batchable else loop_overhead(1, o)  # per sample whose Jacobian is looped
    if method.name == "vp":
        return m * rows * (per_sample + looped) + 3.0 * n1 * m * o * fp
    if method.name == "jacobian":
        return factor_samples * (per_sample + looped) + pairs * jacobian_pair_flops(mode, o, p)
    assert isinstance(method, StructuredMethod)
    layout = method.layout
    fallback = sum(method.f.primals[name].numel() for name in layout.fallback)
    if layout.fallback and looped:  # the fallback's own passes, one sample at a time, beside the batched capture
        per_sample += per_sample + looped
    return factor_samples * per_sample + pairs * (sum(layout.pair_flops.values()) + jacobian_pair_flops(mode, o, fallback))


def make_plan(
    f: FunctionalModel, x: Batch, sizing: Sizing, mode: Mode, num_outputs: int,
    structured: StructuredMethod | None = None, block_given: bool = False,
) -> tuple[Plan, dict[str, KernelMethod]]:
    """Cost every exact method on the kernel ``sizing`` describes and choose; returns the plan
    and the methods it costed.

    Runs no backward pass and computes no kernel: the structured method (``structured``, when
    given, with its calibration from an earlier call if any) reads its layout off one forward
    pass on the first sample of x. Methods that cannot compute the model, or (without a given
    block size) whose factors of one sample exceed the budget, are not chosen while another can be.
    """
    methods = {name: cls(f, mode, num_outputs) for name, cls in METHODS.items()}
    method = (structured or methods["structured"]).estimated(first_samples(x, None, 1))
    assert isinstance(method, StructuredMethod)
    methods["structured"] = method
    layout = method.layout
    fp = max(layout.forward_flops, float(num_outputs))
    flops = {name: estimate(m, sizing, fp) for name, m in methods.items()}
    n2 = None if sizing.symmetric else sizing.n2
    pairs = sample_pairs(sizing.n1, n2)
    groups = [GroupCost(g, layout.kinds[g], pairs * layout.pair_flops[g]) for g in sorted(layout.groups)]
    groups += [
        GroupCost((name,), "fallback", pairs * jacobian_pair_flops(mode, num_outputs, f.primals[name].numel()))
        for name in layout.fallback
    ]
    chosen, unusable = cheapest_usable(methods, flops, x, None if block_given else sizing)
    plan = Plan(
        sizing.n1, n2, num_outputs, f.num_params, mode, fp, flops,
        {name: m.bytes_per_sample() for name, m in methods.items()}, groups, chosen, block_size=None if sizing.over(methods[chosen]) else sizing.block(methods[chosen]),
        min_memory={name: sizing.footprint(m).working(1, 1) + sizing.reserved for name, m in methods.items()}, unusable=unusable,
    )
    return plan, methods


def cheapest_usable(
    methods: dict[str, KernelMethod], flops: dict[str, float], x: Batch, sizing: Sizing | None
) -> tuple[str, dict[str, str]]:
    """The cheapest of ``methods`` by ``flops`` that can compute the model on samples like x
    and, with a ``budget``, whose factors of one sample fit it; and why each method ruled out
    was. Methods are asked in order of cost and only until one can (vp's answer costs a
    forward-mode pass); should none fit the budget, the cheapest that can compute the model
    is returned, and the engine's refusal then says what it needs."""
    over = {name: reason for name, m in methods.items() if sizing is not None and (reason := sizing.over(m))}
    unusable: dict[str, str] = {}
    for name in sorted(flops, key=flops.__getitem__):
        reason = methods[name].unsupported(x)
        if reason is not None:
            unusable[name] = reason
        elif name not in over:
            return name, {**over, **unusable}
    return min((n for n in flops if n not in unusable), key=flops.__getitem__), unusable
