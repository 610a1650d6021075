"""The empirical NNGP kernel: inner products of a model's outputs, or of one layer's features."""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable

import torch
from torch import nn

from ._api import NTKFunction
from ._errors import ModelError, NonFiniteError, OptionError
from ._functional import activation_bytes
from ._inputs import Batch, all_finite, batch_size
from ._options import options_of
from ._torch_private import pytree
from .blocks.budget import DEFAULT_MAX_MEMORY, INPUT_COPIES, format_bytes
from .blocks.engine import kernel_context
from .reduction import block_shape

Features = Callable[[Batch], torch.Tensor]
"""A batch of b samples -> their features (b, d)."""


def nngp(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    *,
    mode: str | None = None,
    layer: str | nn.Module | None = None,
    dtype: torch.dtype | None = None,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    check: bool = True,
) -> torch.Tensor:
    r"""The empirical NNGP kernel K(x, x') = φ(x) φ(x')ᵀ of one network: φ its outputs (O of
    them per sample, flattened as :func:`fastntk.ntk` flattens them), or the features of one layer.

    The modes reduce the d×d block of each pair as :func:`fastntk.ntk` reduces its O×O block
    (d = O without ``layer``): "full" (N1, N2, d, d) = φ_a(x) φ_b(x'); "diagonal" (N1, N2, d);
    "trace" (N1, N2) = Σ_a φ_a(x) φ_a(x'); "trace_mean" (N1, N2) = the trace / d. "trace_mean"
    is neural-tangents' ``empirical_nngp_fn`` with its default ``trace_axes`` (it divides the
    contraction by the size of the traced axes); "full" is theirs with ``trace_axes=()``.

    Args:
        model: any ``nn.Module``, as for :func:`fastntk.ntk` (in eval mode where it has
            BatchNorm or dropout; no gradients are taken).
        x1: N1 samples, in any form :func:`fastntk.ntk` takes.
        x2: N2 samples, or None for the Gram matrix of x1.
        mode: "full", "trace", "diagonal" or "trace_mean"; default "full" for the outputs and
            "trace_mean" for a ``layer`` (φ φᵀ / d, the usual layer NNGP).
        layer: None for the outputs, or a submodule (its name in ``model.named_modules()``, or
            the module itself) whose output is φ: captured by a forward hook, every tensor it
            returns flattened per sample and concatenated (d numbers per sample). The hook is
            removed when the call ends, also on error.
        dtype: the compute dtype, as for :func:`fastntk.ntk`.
        max_memory: bytes the result, the features, the inputs of a block and the activations
            of its forward pass (measured once on the first samples) may hold, as for
            :func:`fastntk.ntk`; the features of x2 are computed once when they fit, else
            again for every block of x1.
        check: validate the model and inputs and refuse a kernel with NaN or inf.

    Returns:
        The kernel, on the model's device, in its dtype (or ``dtype``).

    Raises:
        OptionError: a bad option, an unknown ``layer``, or ``max_memory`` too small for one sample.
        ModelError: the layer does not run in the forward pass, runs more than once, or returns
            no floating tensor batched on dim 0; or the model fails on the inputs.
        NonFiniteError: the kernel holds NaN or inf (``check=True``).

    Example:
        >>> import torch, fastntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        >>> fastntk.nngp(net, torch.randn(5, 3)).shape
        torch.Size([5, 5, 2, 2])
        >>> fastntk.nngp(net, torch.randn(5, 3), layer="1").shape  # post-ReLU features, φφᵀ/64
        torch.Size([5, 5])
    """
    if mode is None:
        mode = "full" if layer is None else "trace_mean"
    given = dict(mode=mode, params=lambda name, p: True, dtype=dtype, max_memory=max_memory, check=check)
    options = options_of(given, stacklevel=2)
    module = None if layer is None or not isinstance(model, nn.Module) else find_layer(model, layer)
    problem = NTKFunction(model, options)._problem(x1, x2)
    f = problem.f
    name = "" if module is None else layer_name(model, module)

    def features(batch: Batch) -> torch.Tensor:
        if module is None:
            return f(f.primals, batch)
        return layer_features(module, lambda: f(f.primals, batch), batch_size(batch), name)

    with kernel_context():
        d = features(problem.load(1, 0, 1)).shape[1]
        out = blocked_gram(problem, features, d, options.mode, activation_bytes(f, problem.probe1))
    if options.mean:
        out = out / d
    if options.check and not all_finite(out):
        raise NonFiniteError(
            "the NNGP kernel contains NaN or inf although inputs and parameters are finite: the features overflow; "
            "try dtype=torch.float64; the computed values are in this error's .kernel",
            kernel=out,
        )
    return out


def blocked_gram(problem: Any, features: Features, d: int, mode: str, activations: int = 0) -> torch.Tensor:
    """Σ over features of φ(x1) ⊗ φ(x2) in ``mode``, in row blocks of x1 within max_memory: the
    features of x2 (of x1 for a Gram matrix) held whole when they fit beside a block, else
    recomputed for every block of rows, in column blocks. ``activations``: the bytes one
    sample's forward pass holds, beside its inputs and features."""
    f, n1, n2 = problem.f, problem.n1, problem.n2
    size = f.dtype.itemsize
    shape = block_shape(mode, n1, n2, d)  # type: ignore[arg-type]
    pair_bytes = size * int(torch.Size(shape[2:]).numel())
    result_bytes = n1 * n2 * pair_bytes
    per_sample = size * d + INPUT_COPIES * problem.input_bytes + activations
    room = problem.options.max_memory - result_bytes
    held_bytes = n2 * size * d  # x2's features, held whole
    cached = held_bytes + per_sample + n2 * pair_bytes <= room
    least = per_sample + min(held_bytes + n2 * pair_bytes, per_sample + pair_bytes)  # either way, one sample a block
    if not cached and room < least:
        raise OptionError(
            f"max_memory={format_bytes(problem.options.max_memory)} is too small: one sample's features, inputs and activations need "
            f"{format_bytes(least)} beside the {format_bytes(result_bytes)} result; pass max_memory={least + result_bytes} or more"
        )
    out = torch.empty(shape, dtype=f.dtype, device=f.device)
    if cached:  # all of x2's features, then rows of x1 against them
        block = max(1, (room - held_bytes) // (per_sample + n2 * pair_bytes))
        right = torch.cat([features(problem.load(2, s, min(n2, s + block))) for s in range(0, n2, block)])
        for start in range(0, n1, block):
            stop = min(n1, start + block)
            left = right[start:stop] if problem.symmetric else features(problem.load(1, start, stop))
            out[start:stop] = contract(left, right, mode)
        return out
    # b rows and b columns of features and their (b, b) block: 2·b·per_sample + b²·pair_bytes <= room
    block = max(1, int((math.sqrt(per_sample**2 + pair_bytes * room) - per_sample) // pair_bytes))
    for start in range(0, n1, block):
        stop = min(n1, start + block)
        left = features(problem.load(1, start, stop))
        for col in range(0, n2, block):
            end = min(n2, col + block)
            right = left if problem.symmetric and col == start else features(problem.load(2, col, end))
            out[start:stop, col:end] = contract(left, right, mode)
    return out


def contract(left: torch.Tensor, right: torch.Tensor, mode: str) -> torch.Tensor:
    """Features (b1, d) and (b2, d) -> the (b1, b2, ...) block of ``mode`` ("trace" for "trace_mean")."""
    if mode == "full":
        return left[:, None, :, None] * right[None, :, None, :]  # (b1, b2, d, d)
    if mode == "diagonal":
        return left[:, None, :] * right[None, :, :]  # (b1, b2, d)
    return left @ right.T  # (b1, b2)


def find_layer(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    """The submodule named ``layer`` (as in ``model.named_modules()``), or ``layer`` itself if it is one of them.

    Raises:
        OptionError: no such submodule, naming the closest names.
    """
    named = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        if any(m is layer for m in named.values()):
            return layer
        raise OptionError(f"layer= is a {type(layer).__name__} that is not a submodule of the model: pass one of model.modules(), or its name")
    if isinstance(layer, str) and layer in named:
        return named[layer]
    close = difflib.get_close_matches(str(layer), [n for n in named if n], n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "; see model.named_modules()"
    raise OptionError(f"the model has no submodule named {layer!r}{hint}")


def layer_name(model: nn.Module, module: nn.Module) -> str:
    """The submodule's name in ``model`` ("" for the model itself), for messages."""
    return next(name for name, m in model.named_modules() if m is module) or "(the model itself)"


def layer_features(module: nn.Module, run: Callable[[], Any], n: int, name: str) -> torch.Tensor:
    """The output of ``module`` while ``run()`` runs the model on n samples, flattened to (n, d).

    Raises:
        ModelError: the module does not run, runs more than once, or returns no floating tensor batched on dim 0.
    """
    captured: list[Any] = []
    handle = module.register_forward_hook(lambda mod, args, output: captured.append(output))
    try:
        run()
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ModelError(
            f"layer {name!r} ran {len(captured)} times in one forward pass: its features are defined only for a layer "
            "that runs exactly once; pass a layer on the path from input to output that is not shared"
        )
    tensors = [t for t in pytree.tree_leaves(captured[0]) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors or any(t.dim() == 0 or t.shape[0] != n for t in tensors):
        shapes = [tuple(t.shape) for t in tensors]
        raise ModelError(
            f"layer {name!r} returned {type(captured[0]).__name__} with floating tensors of shapes {shapes} for a batch of {n}: "
            "its features must be floating tensors batched on dim 0; pick a layer whose output is per sample"
        )
    return torch.cat([t.reshape(n, -1) for t in tensors], dim=1)
