"""Per-sample self-kernels: Θ(x_i, x_i) for each sample alone, N per-sample products instead of N² pairs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._api import NTKFunction
from ._errors import NonFiniteError, OptionError
from ._functional import ParamSelection
from ._inputs import all_finite
from ._options import options_of
from .blocks.budget import DEFAULT_MAX_MEMORY, INPUT_COPIES, OUTPUT_COPIES, format_bytes
from .blocks.engine import kernel_context
from .methods.contraction import flat_jacobian
from .methods.jacobian import JacobianMethod
from .reduction import mean_over_outputs


def self_ntk(
    model: nn.Module,
    x: Any,
    *,
    mode: str = "full",
    params: ParamSelection = None,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    check: bool = True,
    **renamed: Any,
) -> torch.Tensor:
    r"""Θ(x_i, x_i) for every sample i: the diagonal of the Gram matrix over *samples*, without
    the N² pairs (uncertainty, active learning, loss weighting need only these).

    Not to be confused with ``mode="diagonal"``, the diagonal over *outputs* of every pair;
    ``mode`` here reduces each sample's O×O block the same way.

    Args:
        model: any ``nn.Module``, as for :func:`fastntk.ntk`.
        x: N samples, in any form :func:`fastntk.ntk` takes.
        mode: "full" -> (N, O, O); "trace" -> (N,); "diagonal" -> (N, O); "trace_mean" -> (N,).
        params: as for :func:`fastntk.ntk`.
        dtype: as for :func:`fastntk.ntk`.
        block_size: samples per block (each holds its per-sample Jacobians, O·P numbers);
            default: as many as ``max_memory`` holds.
        max_memory: as for :func:`fastntk.ntk`.
        check: as for :func:`fastntk.ntk`.

    Returns:
        The self-kernels, on the model's device, in its dtype (or ``dtype``).

    Example:
        >>> import torch, fastntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> fastntk.self_ntk(net, torch.randn(5, 3), mode="trace").shape
        torch.Size([5])
    """
    given = dict(mode=mode, method="jacobian", params=params, dtype=dtype, block_size=block_size, max_memory=max_memory, check=check)
    options = options_of({**given, **renamed}, stacklevel=2)
    problem = NTKFunction(model, options)._problem(x, None)
    f, n, o = problem.f, problem.n1, problem.num_outputs
    method = JacobianMethod(f, "full", o)
    shape = {"full": (n, o, o), "diagonal": (n, o), "trace": (n,)}[options.mode]
    result_bytes = f.dtype.itemsize * int(torch.Size(shape).numel())
    per_sample = method.bytes_per_sample() + INPUT_COPIES * problem.input_bytes + OUTPUT_COPIES * f.dtype.itemsize * o * o
    room = options.max_memory - result_bytes
    if room < per_sample:
        raise OptionError(
            f"max_memory={format_bytes(options.max_memory)} is too small: one sample's Jacobian and inputs need "
            f"{format_bytes(per_sample)} beside the {format_bytes(result_bytes)} result; pass max_memory={per_sample + result_bytes} "
            "or more, or differentiate fewer parameters (params=)"
        )
    block = options.block_size or max(1, room // per_sample)
    out = torch.empty(shape, dtype=f.dtype, device=f.device)
    with kernel_context():
        for start in range(0, n, block):
            stop = min(n, start + block)
            jacobians = [flat_jacobian(j) for j in method.left(problem.load(1, start, stop)).values()]
            if options.mode == "full":
                value = sum(torch.bmm(j, j.transpose(1, 2)) for j in jacobians)  # (b, O, O)
            else:
                value = sum(j.square().sum(-1) for j in jacobians)  # (b, O): each output's own entry
                if options.mode == "trace":
                    value = value.sum(-1)
            out[start:stop] = value
    if options.mean:
        out = mean_over_outputs(out, o)
    if options.check and not all_finite(out):
        raise NonFiniteError(
            "the self-kernels contain NaN or inf although inputs and parameters are finite: the model's derivatives "
            "overflow or are undefined there; try dtype=torch.float64; the computed values are in this error's .kernel",
            kernel=out,
        )
    return out
