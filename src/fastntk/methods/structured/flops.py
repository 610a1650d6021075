"""Forward FLOPs of the ops a capture sees, for the cost model (matmuls and convolutions)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F


def _linear(args: tuple, kwargs: dict, out: torch.Tensor) -> float:
    return 2.0 * out.numel() * args[0].shape[-1]


def _conv(args: tuple, kwargs: dict, out: torch.Tensor) -> float:
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    return 2.0 * out.numel() * math.prod(weight.shape[1:])


def _matmul(args: tuple, kwargs: dict, out: torch.Tensor) -> float:
    a = args[0]
    return 2.0 * out.numel() * (a.shape[-1] if isinstance(a, torch.Tensor) and a.dim() > 0 else 1)


def _addmm(args: tuple, kwargs: dict, out: torch.Tensor) -> float:
    return 2.0 * out.numel() * args[1].shape[-1]


def _recurrent(args: tuple, kwargs: dict, out: torch.Tensor) -> float:
    """nn.RNN/GRU/LSTM: every weight matrix multiplies every step of every sample (the input's
    rows, N·T, or a packed sequence's steps)."""
    packed = isinstance(args[1], torch.Tensor) and args[1].dim() == 1  # (data, batch_sizes, hx, params, ...)
    weights = args[3] if packed else args[2]  # else (input, hx, params, ...)
    return 2.0 * args[0].numel() / args[0].shape[-1] * sum(w.numel() for w in weights if w.dim() == 2)


FLOPS: dict[Callable, Callable[[tuple, dict, torch.Tensor], float]] = {
    F.linear: _linear,
    torch.conv1d: _conv,
    torch.conv2d: _conv,
    torch.conv3d: _conv,
    torch.matmul: _matmul,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.__matmul__: _matmul,
    torch.mm: _matmul,
    torch.bmm: _matmul,
    torch.addmm: _addmm,
    torch.baddbmm: _addmm,
    torch.lstm: _recurrent,
    torch.gru: _recurrent,
    torch.rnn_tanh: _recurrent,
    torch.rnn_relu: _recurrent,
}


CONVOLUTIONS = frozenset({torch.conv1d, torch.conv2d, torch.conv3d})


def op_flops(func: Callable, args: tuple, kwargs: dict, output: Any) -> float:
    """FLOPs of one call of a matmul-like op or convolution; 0 for anything else."""
    count = FLOPS.get(func)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        output = output[0]  # a recurrent layer's (outputs, final states)
    if count is None or not isinstance(output, torch.Tensor):
        return 0.0
    try:
        return count(args, kwargs, output)
    except (IndexError, KeyError, AttributeError):
        return 0.0
