"""One forward pass that records every use of a selected parameter, then backward passes for the cotangents.

A TorchFunctionMode sees each functional op with its arguments. An op that a rule covers,
with the selected parameters only in its weight/bias roles, is a structured *use*: its
inputs are saved and its output is kept to receive cotangents. Any other op that touches
a selected parameter sends that parameter to the exact Jacobian fallback.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

from ... import _torch_private
from ..._functional import FunctionalModel, Params
from ..._torch_private import pytree, unchanged, version, versions
from ..._inputs import Batch, batch_size
from .chain import SHAPE_ONLY, Call, Step, chain_of, samples_of_steps
from .flops import CONVOLUTIONS, op_flops
from .rules import RULES, Rule
from .rules.base import Roles, Saved


@dataclass
class Use:
    """One call of a covered op on selected parameters."""

    rule: Rule
    roles: Roles
    saved: Saved
    output: torch.Tensor
    versions: list[tuple[torch.Tensor, int | None]]
    """The version counters of the saved tensors when saved (none when they are copies)."""
    output_version: int | None = 0
    returned: torch.Tensor | None = None
    """What the model got back: ``output``, or a copy of it (see :func:`capture`)."""

    def intact(self) -> bool:
        """Whether no saved input was modified in place after the call."""
        return all(unchanged(t, v) for t, v in self.versions)

    def output_intact(self) -> bool:
        """Whether the recorded output is still the op's result (no in-place op downstream,
        such as ReLU(inplace=True), wrote over it: its cotangents would then be the wrong ones)."""
        return unchanged(self.output, self.output_version)


@dataclass
class Capture:
    """What one forward pass on a block revealed: outputs (N, O), structured uses, other params."""

    primals: Params
    outputs: torch.Tensor
    uses: list[Use]
    unstructured: set[str] = field(default_factory=set)
    flops: float = 0.0
    """Forward FLOPs of the matmuls and convolutions seen, for the whole block."""
    matmul_flops: float = 0.0
    """The part of ``flops`` in matrix products (the rest: convolutions)."""
    cloned: bool = False
    """Whether the recorded outputs are copies (the model writes over some of them in place)."""
    chain: list[Step] | None = None
    """The model as one chain of layers, activations and affine maps, when it is one (see :mod:`.chain`)."""


def samples_of(observed: Capture, start: int, stop: int) -> Capture:
    """Samples start..stop-1 of a captured chain block (what a chain's backward pass reads:
    outputs, the uses' saved inputs and outputs, the chain's links), as a capture of its own."""
    assert observed.chain is not None
    n = observed.outputs.shape[0]

    def rows(value: Any) -> Any:
        return value[start:stop] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n else value

    uses = [Use(u.rule, u.roles, {key: rows(v) for key, v in u.saved.items()}, rows(u.output), []) for u in observed.uses]
    return Capture(
        observed.primals, rows(observed.outputs), uses, observed.unstructured, observed.flops, observed.matmul_flops,
        observed.cloned, samples_of_steps(observed.chain, start, stop),
    )


def batch_first(call: dict[str, Any], output: torch.Tensor, n: int) -> bool:
    """Whether the op's input and output are laid out with the n samples on dim 0."""
    x = call.get("input")
    return isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n and output.dim() > 0 and output.shape[0] == n


class _Recorder(TorchFunctionMode):
    def __init__(self, primals: Params, n: int, clone_outputs: bool) -> None:
        super().__init__()
        self.n = n
        self.clone_outputs = clone_outputs
        self.names = {id(t): name for name, t in primals.items()}
        self.uses: list[Use] = []
        self.unstructured: set[str] = set()
        self.flops = 0.0
        self.matmul_flops = 0.0
        self.calls: list[Call] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        before = len(self.uses)
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        output = self.record(func, args, kwargs, inputs)
        if isinstance(output, torch.Tensor):
            use = before if len(self.uses) > before else None
            self.calls.append(Call(func, args, kwargs, inputs, output, use, version(output), versions(inputs)))
        return output

    def record(self, func, args, kwargs, inputs: list[torch.Tensor]):  # noqa: ANN001, ANN201
        """Run the op; a covered use of selected parameters is recorded (and its output, or a copy, returned)."""
        output = func(*args, **kwargs)
        flops = op_flops(func, args, kwargs, output)
        self.flops += flops
        if func not in CONVOLUTIONS:
            self.matmul_flops += flops
        touched = [self.names[id(t)] for t in inputs if id(t) in self.names]
        if not touched or not any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(output)):
            return output  # no selected parameter, or metadata only (size, dim, ...)
        rule = RULES.get(func)
        if rule is not None and isinstance(output, torch.Tensor):
            call = rule.bind(args, kwargs)
            parameters = rule.parameters(call)
            if parameters is not None and batch_first(call, output, self.n):
                roles = {role: self.names[id(t)] for role, t in parameters.items() if id(t) in self.names}
                if sorted(roles.values()) == sorted(touched):
                    saved = rule.save(call, output)
                    if _torch_private.VERSION_COUNTERS:
                        recorded = [(t, version(t)) for t in pytree.tree_leaves(saved) if isinstance(t, torch.Tensor)]
                    else:  # in-place writes to them would not show: copies the model cannot write to
                        saved = {key: v.clone() if isinstance(v, torch.Tensor) else v for key, v in saved.items()}
                        recorded = []
                    use = Use(rule, roles, saved, output, recorded, version(output), output.clone() if self.clone_outputs else output)
                    self.uses.append(use)
                    return use.returned
        self.unstructured.update(touched)
        return output


def capture(f: FunctionalModel, x: Batch, clone_outputs: bool = False, graph: bool = True) -> Capture:
    """Run f on the block x, recording structured uses of the selected parameters.

    The model continues from the recorded outputs themselves, unless ``clone_outputs``
    gives it copies. Should an in-place op downstream write over a recorded output, the
    pass is run again with copies (``Capture.cloned``; callers pass it on next time).
    ``graph=False`` records no autograd graph (for models whose cotangents come from
    their chain, ``Capture.chain``). Without version counters (:mod:`..._torch_private`),
    in-place writes would not show: the model always gets copies.
    """
    clone_outputs = clone_outputs or not _torch_private.VERSION_COUNTERS
    primals = {name: p.detach().requires_grad_(graph) for name, p in f.primals.items()}
    recorder = _Recorder(primals, batch_size(x), clone_outputs)
    with torch.set_grad_enabled(graph), recorder:
        outputs = f(primals, x)
    if not clone_outputs and not all(use.output_intact() for use in recorder.uses):
        return capture(f, x, clone_outputs=True, graph=graph)
    unstructured = set(recorder.unstructured)
    uses = []
    for use in recorder.uses:
        if use.intact():
            uses.append(use)
        else:
            unstructured.update(use.roles.values())
    chain = chain_of(recorder.calls, len(recorder.uses), outputs) if len(uses) == len(recorder.uses) else None
    if chain is not None and not graph:
        chain = shed_layer_outputs(uses, chain)
    return Capture(primals, outputs, uses, unstructured, recorder.flops, recorder.matmul_flops, clone_outputs, chain)


def shape_of(t: torch.Tensor) -> torch.Tensor:
    """A stand-in with t's shape, dtype and device and no storage of its own."""
    return torch.empty((), dtype=t.dtype, device=t.device).expand(t.shape)


def shed_layer_outputs(uses: list[Use], chain: list[Step]) -> list[Step]:
    """Let the layers' outputs go once a graph-free pass has recorded a chain: its backward
    pass reads only their shapes (the activations keep what their derivatives read), and
    their memory serves the cotangents instead of fresh pages."""
    for use in uses:
        use.output = use.returned = shape_of(use.output)
    return [dataclasses.replace(step, output=shape_of(step.output)) if step.kind in SHAPE_ONLY else step for step in chain]


def per_output_cotangents(
    outputs: torch.Tensor, tensors: list[torch.Tensor], chunk: int = 1, retain_graph: bool = False
) -> Iterator[list[torch.Tensor | None]]:
    """For consecutive chunks of k outputs: ∂ Σ_n outputs[n, a] / ∂ tensors[i], as (N, k, *shape[1:]).

    Since no sample's output depends on another sample, row n is sample n's own cotangent.
    A chunk of one output is a plain backward pass (ops without batching rules run at full
    speed); a larger chunk is one backward pass vmapped over its outputs (bigger GEMMs).
    Only one chunk's cotangents are alive at a time. None where a tensor does not affect
    the outputs.
    """
    n, o = outputs.shape
    if not tensors:
        return
    basis = torch.eye(o, dtype=outputs.dtype, device=outputs.device).unsqueeze(1).expand(o, n, o)
    for start in range(0, o, chunk):
        stop = min(start + chunk, o)
        keep = retain_graph or stop < o
        # no local names the chunk: while suspended, this holds nothing the caller has let go of
        if stop - start == 1:
            yield [None if g is None else g.unsqueeze(1) for g in torch.autograd.grad(outputs, tensors, basis[start], retain_graph=keep, allow_unused=True)]
        else:
            yield [
                None if g is None else g.movedim(0, 1)
                for g in torch.autograd.grad(outputs, tensors, basis[start:stop], retain_graph=keep, is_grads_batched=True, allow_unused=True)
            ]
