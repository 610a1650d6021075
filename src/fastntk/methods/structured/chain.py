"""Cotangents without autograd for models that are one chain of layers and activations.

When everything from the first recorded layer to the model's outputs is a single chain of
``F.linear`` calls, convolutions (1d/2d/3d), ReLU/tanh/sigmoid/GELU/SiLU activations,
average pooling, padding, means and sums over a sample's own dims, reshapes and dropout in
eval mode, each taking the previous one's output, the cotangents of
the recorded layer outputs for k outputs at once are k·N-row GEMMs against the weights
(transposed convolutions for a convolution) and the activations' fused backward kernels:
no autograd graph in the forward pass, no batched autograd in the backward.
Between the outputs and the last activation the cotangents are the same for every sample:
they are computed once, for k rows (a dense output layer's are its weight rows), and
broadcast over the samples. Anything else (a residual branch, a normalisation, an op
without a rule here) leaves the model to autograd; the calibration's check (:mod:`.check`)
covers this path like the other one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F

from ..._gemm import mm
from ..._torch_private import activation_backward, unchanged
from .conv_geometry import ARGUMENTS as CONV_ARGUMENTS
from .conv_geometry import ConvGeometry
from .flops import CONVOLUTIONS

Kind = Literal["linear", "conv", "affine", "relu", "tanh", "sigmoid", "gelu", "silu", "reshape"]

ACTIVATIONS: dict[Callable, Kind] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", torch.Tensor.relu: "relu", torch.Tensor.relu_: "relu",
    torch.tanh: "tanh", F.tanh: "tanh", torch.Tensor.tanh: "tanh", torch.Tensor.tanh_: "tanh",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid", torch.Tensor.sigmoid_: "sigmoid",
}
FROM_INPUT: dict[Callable, Kind] = {F.gelu: "gelu", F.silu: "silu"}
"""Activations whose derivative is computed from their input (not in place)."""
FROM_OUTPUT = frozenset({"relu", "tanh", "sigmoid"})
"""Activations whose backward is computed from their output (by PyTorch's fused kernels,
:func:`..._torch_private.activation_backward`; ReLU's output is positive where its input is)."""
AFFINE = (
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.pad, torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum,
)
"""Maps that are affine in their input and act on each sample alone (average pooling, padding,
means and sums over a sample's own dims): the cotangents of their input are their adjoint's."""
REDUCTIONS = (torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum)
SHAPE_ONLY = frozenset({"linear", "conv", "affine", "reshape"})
"""Kinds of link whose backward pass reads only the shape of what they returned."""
RESHAPES = (torch.Tensor.reshape, torch.reshape, torch.Tensor.view, torch.Tensor.flatten, torch.flatten)
DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


@dataclass
class Call:
    """One op the forward pass ran: its function, arguments (and the tensors among them), the
    tensor the model got back, and the index of the recorded use it was (None: not a use);
    the version counters of its output and inputs right after it ran (so that in-place writes
    later in the pass show; None without version counters)."""

    func: Callable
    args: tuple
    kwargs: dict[str, Any]
    inputs: list[torch.Tensor]
    output: torch.Tensor
    use: int | None
    version: int | None = 0
    input_versions: tuple[int | None, ...] = ()


@dataclass
class Step:
    """One link of the chain, from its input (of ``input_shape``) to ``output``."""

    kind: Kind
    input_shape: torch.Size
    output: torch.Tensor
    """What the link returned (for a layer or a reshape, possibly a stand-in of its shape only,
    see :func:`.capture.shed_layer_outputs`)."""
    weight: torch.Tensor | None = None
    use: int | None = None
    version: int | None = 0
    input: torch.Tensor | None = None
    """The input, for activations whose derivative is computed from it (GELU, SiLU)."""
    input_version: int | None = 0
    geometry: ConvGeometry | None = None
    """A convolution's options."""
    affine: Callable[[torch.Tensor], torch.Tensor] | None = None
    """An affine map, applied to a batch (for its adjoint)."""

    def derivative(self) -> torch.Tensor:
        """The activation's elementwise derivative, per sample (N, ...)."""
        if self.kind in ("gelu", "silu"):
            x = self.input
            assert x is not None
            if self.kind == "silu":
                s = torch.sigmoid(x)
                return s * (1 + x * (1 - s))
            return 0.5 * (1 + torch.erf(x * 0.5**0.5)) + x * torch.exp(-0.5 * x * x) * (2 * torch.pi) ** -0.5
        y = self.output
        return y > 0 if self.kind == "relu" else 1 - y * y if self.kind == "tanh" else y * (1 - y)

    def backward(self, g: torch.Tensor, owned: bool, sample_major: bool) -> torch.Tensor:
        """The cotangents of the activation's input from those of its output, g (laid out as
        (k, N, ...), or (N, k, ...) with ``sample_major``); written over g when ``owned``.
        ReLU, tanh and sigmoid use PyTorch's own fused backward kernels."""
        if self.kind not in FROM_OUTPUT:
            d = self.derivative()
            d = d.unsqueeze(1) if sample_major else d
            return g.mul_(d) if owned else g * d
        return activation_backward(self.kind, g, self.output.unsqueeze(1) if sample_major else self.output, in_place=owned)

    def adjoint(self, g: torch.Tensor, sample_shape: tuple[int, ...]) -> torch.Tensor:
        """The cotangents of an affine map's input from those of its output g (B, ...): its
        vector-Jacobian product, taken at zeros (the map's linear part is the same everywhere).
        Plain autograd of a scalar: torch.func and ``grad_outputs`` would import torch._dynamo
        and sympy on their first use in a process, a cost the first call would pay."""
        assert self.affine is not None
        with torch.enable_grad():
            zeros = g.new_zeros((), requires_grad=True).expand(g.shape[0], *sample_shape)
            return torch.autograd.grad(torch.vdot(self.affine(zeros).reshape(-1), g.reshape(-1)), zeros)[0]

    def intact(self) -> bool:
        """Whether what the backward pass reads (an activation's output or input) is unchanged."""
        if self.kind in ("gelu", "silu"):
            return self.input is not None and unchanged(self.input, self.input_version)
        return self.kind not in FROM_OUTPUT or unchanged(self.output, self.version)


def first_input(call: Call) -> Any:
    return call.args[0] if call.args else call.kwargs.get("input")


def step_of(call: Call, current: torch.Tensor) -> Step | None:
    """The chain link ``call`` is when its input is ``current``, or None when it is not one."""
    inputs = call.inputs
    first = first_input(call)
    if call.func is F.linear:
        weight = call.args[1] if len(call.args) > 1 else call.kwargs.get("weight")
        if first is current and isinstance(weight, torch.Tensor) and weight.dim() == 2 and all(t is not current for t in inputs[1:]):
            return Step("linear", current.shape, call.output, weight.detach(), call.use)
        return None
    if call.func in CONVOLUTIONS:
        bound = dict(zip(CONV_ARGUMENTS, call.args), **call.kwargs)
        weight = bound.get("weight")
        if first is current and isinstance(weight, torch.Tensor) and weight.dim() == current.dim() and all(t is not current for t in inputs[1:]):
            return Step("conv", current.shape, call.output, weight.detach(), call.use, geometry=ConvGeometry.of(bound))
        return None
    if call.func is torch.cat and len(inputs) == 1 and inputs[0] is current:  # of one tensor (how outputs are flattened)
        return Step("reshape", current.shape, call.output)
    if len(inputs) != 1 or first is not current:
        return None
    if call.func in ACTIVATIONS:
        return Step(ACTIVATIONS[call.func], current.shape, call.output)
    if call.func in FROM_INPUT and call.output is not current and call.kwargs.get("approximate", "none") == "none" and len(call.args) == 1:
        return Step(FROM_INPUT[call.func], current.shape, call.output, input=current, input_version=call.input_versions[0])
    if call.func in DROPOUTS:  # in eval mode the identity (in training mode the model was refused before)
        training = call.args[2] if len(call.args) > 2 else call.kwargs.get("training", True)
        return None if training else Step("reshape", current.shape, call.output)
    if call.func in RESHAPES and call.output.dtype == current.dtype and call.output.numel() == current.numel():
        return Step("reshape", current.shape, call.output)  # (not a view as another dtype)
    if call.func in AFFINE and call.output.dtype == current.dtype and sample_wise(call, current):
        func, rest, kwargs = call.func, call.args[1:], {k: v for k, v in call.kwargs.items() if k != "input"}
        return Step("affine", current.shape, call.output, affine=lambda t: func(t, *rest, **kwargs))
    return None


def sample_wise(call: Call, current: torch.Tensor) -> bool:
    """Whether a reduction keeps the samples apart: it names its dims, and not the batch's."""
    if call.func not in REDUCTIONS:
        return True
    dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim")
    dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (tuple, list)) else None
    return bool(dims) and all(d % current.dim() != 0 for d in dims)


def chain_of(calls: list[Call], num_uses: int, outputs: torch.Tensor) -> list[Step] | None:
    """The chain from the first recorded use to ``outputs``, or None when the model is not one."""
    start = next((i for i, call in enumerate(calls) if call.use is not None), None)
    if start is None or (calls[start].func is not F.linear and calls[start].func not in CONVOLUTIONS):
        return None
    seen: set[int] = set()
    current: torch.Tensor | None = None
    steps: list[Step] = []
    for call in calls[start:]:
        inputs = call.inputs
        if current is not None and not any(t is current or id(t) in seen for t in inputs):
            continue  # a computation beside the chain (of weights, masks, ...)
        step = step_of(call, first_input(call) if current is None else current)
        if step is None or any(id(t) in seen for t in inputs if t is not current):
            return None  # an op the chain has no rule for, or a branch off an earlier link
        step.version = call.version  # activations read their outputs back: checked below
        steps.append(step)
        if current is not None:
            seen.add(id(current))
        current = call.output
    uses = {step.use for step in steps if step.use is not None}
    if current is not outputs or uses != set(range(num_uses)):
        return None
    n = outputs.shape[0]
    if any(step.input_shape[:1] != (n,) or step.output.shape[:1] != (n,) for step in steps):
        return None  # a reshape across samples
    if not all(step.intact() for step in steps):
        return None  # an in-place op wrote over what the backward pass reads
    return steps


@dataclass
class RowsCotangents:
    """Cotangents (N, k, e) that are derivative[n] ⊙ rows[a]: a dense layer's, when it feeds an
    activation after which the cotangents are the same for every sample (rows: those, e.g. the
    dense output layer's weight rows)."""

    derivative: torch.Tensor
    rows: torch.Tensor

    def formed(self) -> torch.Tensor:
        return self.derivative[:, None, :] * self.rows[None]


ACTIVATION_KINDS = frozenset(ACTIVATIONS.values()) | frozenset(FROM_INPUT.values())


def compact_uses(steps: list[Step]) -> set[int]:
    """The uses whose cotangents :func:`chain_cotangents` keeps as :class:`RowsCotangents`: a
    dense layer right before the chain's last activation, when that activation takes one
    vector per sample (after it, the cotangents are common to all samples)."""
    last = next((i for i in range(len(steps) - 1, 0, -1) if steps[i].kind in ACTIVATION_KINDS), None)
    if last is None or len(steps[last].input_shape) != 2:
        return set()
    before = steps[last - 1]
    return {before.use} if before.kind == "linear" and before.use is not None else set()


@torch.no_grad()
def chain_cotangents(
    steps: list[Step], num_uses: int, n: int, start: int, stop: int, sample_major: bool = False, keep_rows: bool = False
) -> list[torch.Tensor | RowsCotangents]:
    """For outputs start..stop-1: each use's cotangents by the chain rule, stored (k, N, ...)
    output by output, or (N, k, ...) sample by sample with ``sample_major`` (the GEMM rows
    can come in either order, so either layout costs nothing to make). Cotangents that are
    the same for every sample (after the last activation) are broadcast views. With
    ``keep_rows``, cotangents of the form derivative ⊙ rows come as :class:`RowsCotangents`.
    No autograd graph is recorded (the forward pass may have recorded one)."""
    k = stop - start
    outputs = steps[-1].output

    def laid_out(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """t, of k outputs and samples of ``shape`` (N, ...), in this call's layout."""
        return t.reshape(shape[0], k, *shape[1:]) if sample_major else t.reshape(k, *shape)

    def spread(rows: torch.Tensor) -> torch.Tensor:
        """Rows (k, ...) common to all samples, broadcast over the N samples in this call's layout."""
        return rows[None].expand(n, *rows.shape) if sample_major else rows[:, None].expand(k, n, *rows.shape[1:])

    common: torch.Tensor | None = torch.eye(outputs.shape[1], dtype=outputs.dtype, device=outputs.device)[start:stop]
    """The cotangents while they are the same for every sample: (k, *sample shape), else None."""
    g = outputs  # the per-sample cotangents (laid out) once ``common`` is None
    shape = tuple(outputs.shape)
    basis = True  # common is still the outputs' basis (then a dense layer's are rows of its weight)
    owned = False  # whether g may be written in place
    structured: RowsCotangents | None = None  # g is derivative ⊙ rows
    compact = compact_uses(steps) if keep_rows else set()
    found: list[torch.Tensor | RowsCotangents | None] = [None] * num_uses
    for i in range(len(steps) - 1, -1, -1):
        step = steps[i]
        if step.use is not None:
            found[step.use] = structured if structured is not None else g if common is None else spread(common)
        if i == 0:
            break
        input_shape = tuple(step.input_shape)
        weight = step.weight
        if step.kind == "linear":
            assert weight is not None
            if common is None:
                g, owned = laid_out(mm(g.reshape(-1, weight.shape[0]), weight), input_shape), True
            elif basis and len(shape) == 2:
                common = weight[start:stop]
            else:
                common = mm(common.reshape(-1, weight.shape[0]), weight).reshape(k, *input_shape[1:])
            basis, structured = False, None
        elif step.kind == "conv":
            assert weight is not None and step.geometry is not None
            if common is None:
                g, owned = laid_out(step.geometry.input_cotangents(g.reshape(-1, *shape[1:]), weight, input_shape[1:]), input_shape), True
            else:
                common = step.geometry.input_cotangents(common, weight, input_shape[1:])
            basis, structured = False, None
        elif step.kind == "affine":
            if common is None:  # (a sum's adjoint is a broadcast view: not to be written in place)
                g, owned = laid_out(step.adjoint(g.reshape(-1, *shape[1:]), input_shape[1:]), input_shape), False
            else:
                common = step.adjoint(common, input_shape[1:])
            basis, structured = False, None
        elif step.kind == "reshape":
            basis = basis and input_shape == shape
            if common is None:
                g = laid_out(g, input_shape)
            else:
                common = common.reshape(k, *input_shape[1:])
            structured = None
        else:
            if common is not None:
                structured = RowsCotangents(step.derivative().to(common.dtype), common) if steps[i - 1].use in compact else None
                g, owned, common = spread(common), False, None
            else:
                structured = None
            g, owned = step.backward(g, owned, sample_major), True
            basis = False
        shape = input_shape
    assert all(t is not None for t in found)
    return found  # type: ignore[return-value]


def chain_cotangent_chunks(
    steps: list[Step], num_uses: int, n: int, num_outputs: int, chunk: int, sample_major: bool = False, keep_rows: bool = False
) -> Iterator[list[torch.Tensor | RowsCotangents]]:
    """Like :func:`.capture.per_output_cotangents`: for consecutive chunks of outputs, each
    use's cotangents as (N, k, *output shape[1:]), stored output- or sample-major (or as
    :class:`RowsCotangents` with ``keep_rows``)."""
    for start in range(0, num_outputs, chunk):
        stop = min(start + chunk, num_outputs)
        # no local names the chunk: while suspended, this holds nothing the caller has let go of
        yield [
            g if sample_major or isinstance(g, RowsCotangents) else g.movedim(0, 1)
            for g in chain_cotangents(steps, num_uses, n, start, stop, sample_major, keep_rows)
        ]


def samples_of_steps(steps: list[Step], start: int, stop: int) -> list[Step]:
    """The chain of samples start..stop-1 of a block (the weights are shared)."""
    return [
        dataclasses.replace(
            s,
            input_shape=torch.Size((stop - start, *s.input_shape[1:])),
            output=s.output[start:stop],
            input=None if s.input is None else s.input[start:stop],
        )
        for s in steps
    ]
