"""Cotangents without autograd for models that are one chain of dense layers and activations.

When everything from the first recorded layer to the model's outputs is a single chain of
``F.linear`` calls, ReLU/tanh/sigmoid/GELU/SiLU activations, reshapes and dropout in eval
mode, each taking the previous
one's output, the cotangents of the recorded layer outputs for k outputs at once are
k·N-row GEMMs against the weights and in-place products with the activations' derivatives:
no autograd graph in the forward pass, no batched autograd in the backward. A dense output
layer's cotangents are its weight rows, broadcast over the samples (no GEMM). Anything else
(a residual branch, a convolution, an op without a rule here) leaves the model to autograd;
the calibration's gradient check covers this path like the other one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F

Kind = Literal["linear", "relu", "tanh", "sigmoid", "gelu", "silu", "reshape"]

ACTIVATIONS: dict[Callable, Kind] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", torch.Tensor.relu: "relu", torch.Tensor.relu_: "relu",
    torch.tanh: "tanh", F.tanh: "tanh", torch.Tensor.tanh: "tanh", torch.Tensor.tanh_: "tanh",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid", torch.Tensor.sigmoid_: "sigmoid",
}
FROM_INPUT: dict[Callable, Kind] = {F.gelu: "gelu", F.silu: "silu"}
"""Activations whose derivative is computed from their input (not in place)."""
RESHAPES = (torch.Tensor.reshape, torch.reshape, torch.Tensor.view, torch.Tensor.flatten, torch.flatten)
DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


@dataclass
class Call:
    """One op the forward pass ran: its function, arguments (and the tensors among them), the
    tensor the model got back, and the index of the recorded use it was (None: not a use)."""

    func: Callable
    args: tuple
    kwargs: dict[str, Any]
    inputs: list[torch.Tensor]
    output: torch.Tensor
    use: int | None


@dataclass
class Step:
    """One link of the chain, from its input (of ``input_shape``) to ``output``."""

    kind: Kind
    input_shape: torch.Size
    output: torch.Tensor
    weight: torch.Tensor | None = None
    use: int | None = None
    version: int = 0
    input: torch.Tensor | None = None
    """The input, for activations whose derivative is computed from it (GELU, SiLU)."""
    input_version: int = 0

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

    def intact(self) -> bool:
        """Whether what the backward pass reads (an activation's output or input) is unchanged."""
        if self.kind in ("gelu", "silu"):
            return self.input is not None and self.input._version == self.input_version
        return self.kind not in ("relu", "tanh", "sigmoid") or self.output._version == self.version


def first_input(call: Call) -> Any:
    return call.args[0] if call.args else call.kwargs.get("input")


def step_of(call: Call, current: torch.Tensor) -> Step | None:
    """The chain link ``call`` is when its input is ``current``, or None when it is not one."""
    inputs = call.inputs
    first = first_input(call)
    if call.func is F.linear:
        weight = call.args[1] if len(call.args) > 1 else call.kwargs.get("weight")
        if first is current and isinstance(weight, torch.Tensor) and weight.dim() == 2 and all(t is not current for t in inputs[1:]):
            return Step("linear", current.shape, call.output, weight, call.use)
        return None
    if call.func is torch.cat and len(inputs) == 1 and inputs[0] is current:  # of one tensor (how outputs are flattened)
        return Step("reshape", current.shape, call.output)
    if len(inputs) != 1 or first is not current:
        return None
    if call.func in ACTIVATIONS:
        return Step(ACTIVATIONS[call.func], current.shape, call.output)
    if call.func in FROM_INPUT and call.output is not current and call.kwargs.get("approximate", "none") == "none" and len(call.args) == 1:
        return Step(FROM_INPUT[call.func], current.shape, call.output, input=current, input_version=current._version)
    if call.func in DROPOUTS:  # in eval mode the identity (in training mode the model was refused before)
        training = call.args[2] if len(call.args) > 2 else call.kwargs.get("training", True)
        return None if training else Step("reshape", current.shape, call.output)
    if call.func in RESHAPES and call.output.dtype == current.dtype and call.output.numel() == current.numel():
        return Step("reshape", current.shape, call.output)  # (not a view as another dtype)
    return None


def chain_of(calls: list[Call], num_uses: int, outputs: torch.Tensor) -> list[Step] | None:
    """The chain from the first recorded use to ``outputs``, or None when the model is not one."""
    start = next((i for i, call in enumerate(calls) if call.use is not None), None)
    if start is None or calls[start].func is not F.linear:
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
        step.version = call.output._version  # activations read their outputs back: checked below
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
    activation and then the dense output layer (rows: that layer's weight rows)."""

    derivative: torch.Tensor
    rows: torch.Tensor

    def formed(self) -> torch.Tensor:
        return self.derivative[:, None, :] * self.rows[None]


def chain_cotangents(
    steps: list[Step], num_uses: int, n: int, start: int, stop: int, sample_major: bool = False, keep_rows: bool = False
) -> list[torch.Tensor | RowsCotangents]:
    """For outputs start..stop-1: each use's cotangents by the chain rule, stored (k, N, ...)
    output by output, or (N, k, ...) sample by sample with ``sample_major`` (the GEMM rows
    can come in either order, so either layout costs nothing to make). With ``keep_rows``,
    cotangents of the form derivative ⊙ rows come as :class:`RowsCotangents`."""
    k = stop - start
    outputs = steps[-1].output

    def laid_out(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """t, of k outputs and samples of ``shape`` (N, ...), in this call's layout."""
        return t.reshape(shape[0], k, *shape[1:]) if sample_major else t.reshape(k, *shape)

    def rows(w: torch.Tensor) -> torch.Tensor:
        """w[a] for each sample: (k, m) rows broadcast over the N samples, in this call's layout."""
        return w[start:stop][None].expand(n, k, w.shape[1]) if sample_major else w[start:stop, None, :].expand(k, n, w.shape[1])

    eye = torch.eye(outputs.shape[1], dtype=outputs.dtype, device=outputs.device)
    g, shape = rows(eye), tuple(outputs.shape)
    basis = True  # g is still the outputs' basis (then a dense layer's cotangents are rows of W)
    owned = False  # whether g may be written in place
    weight_rows: torch.Tensor | None = None  # g is these rows of a weight, broadcast over the samples
    structured: RowsCotangents | None = None  # g is derivative ⊙ rows
    found: list[torch.Tensor | RowsCotangents | None] = [None] * num_uses
    for i in range(len(steps) - 1, -1, -1):
        step = steps[i]
        if step.kind == "linear":
            if step.use is not None:
                found[step.use] = structured if keep_rows and structured is not None else g
            if i == 0:
                break
            weight = step.weight
            assert weight is not None
            if basis and len(shape) == 2:
                g, owned, weight_rows = rows(weight), False, weight[start:stop]
            else:
                g, owned, weight_rows = laid_out(g.reshape(-1, weight.shape[0]) @ weight, tuple(step.input_shape)), True, None
            basis, structured = False, None
        elif step.kind == "reshape":
            basis = basis and tuple(step.input_shape) == shape
            g, structured = laid_out(g, tuple(step.input_shape)), None
            weight_rows = weight_rows if tuple(step.input_shape) == shape else None
        else:
            basis = False
            derivative = step.derivative()
            structured = None if weight_rows is None or len(shape) != 2 else RowsCotangents(derivative.to(g.dtype), weight_rows)
            weight_rows = None
            d = derivative.unsqueeze(1) if sample_major else derivative
            g, owned = (g.mul_(d) if owned else g * d), True
        shape = tuple(step.input_shape)
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
        found = chain_cotangents(steps, num_uses, n, start, stop, sample_major, keep_rows)
        yield [g if sample_major or isinstance(g, RowsCotangents) else g.movedim(0, 1) for g in found]


def samples_of_steps(steps: list[Step], start: int, stop: int) -> list[Step]:
    """The chain of samples start..stop-1 of a block (the weights are shared)."""
    return [
        Step(s.kind, torch.Size((stop - start, *s.input_shape[1:])), s.output[start:stop], s.weight, s.use, s.version)
        for s in steps
    ]
