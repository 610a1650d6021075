"""An obviously correct float64 eNTK: per-sample Jacobians by plain autograd loops, then einsum.

Slow (N·O backward passes) and memory-hungry (N·O·P); meant for tests and checks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._functional import ParamSelection, flatten_output, select_parameters
from ._inputs import Batch, batch_size, call_model, map_leaves, take
from .reduction import check_mode, reduce_full


def reference_jacobian(model: nn.Module, x: Batch, params: ParamSelection = None, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """J (N, O, P): row (n, a) is ∂ output a of sample n / ∂θ, θ the selected parameters flattened in order.

    Computed in ``dtype`` (float64 by default) on a deep copy of the model, one sample and
    one output at a time.
    """
    model64 = copy.deepcopy(model).to(dtype)
    names = select_parameters(model64, params)
    named = dict(model64.named_parameters())
    theta = [named[name].requires_grad_(True) for name in names]  # a copy: frozen ones may be selected
    x64 = map_leaves(lambda t: t.to(dtype) if t.is_floating_point() else t, x)
    rows = []
    for n in range(batch_size(x64)):
        out = flatten_output(call_model(model64, take(x64, n, n + 1)), 1)[0]
        per_output = []
        for a in range(out.shape[0]):
            grads = torch.autograd.grad(out[a], theta, retain_graph=True, allow_unused=True)
            per_output.append(torch.cat([
                (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, theta)
            ]))
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def reference_ntk(
    model: nn.Module, x1: Batch, x2: Batch | None = None, *, mode: str = "full", params: ParamSelection = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The eNTK by brute force, for checking a kernel: per-sample Jacobians by plain autograd, then einsum.

    A deep copy of the model is cast to ``dtype``; J (N, O, P) is computed one sample and
    one output at a time (N·O backward passes, N·O·P numbers in memory), and the kernel is
    ``einsum("nap,mbp->nmab", J(x1), J(x2))``, reduced to ``mode``. Slow and memory-hungry,
    but obviously correct: the test suite holds every method to it.

    Args:
        model: any ``nn.Module`` (not modified: a copy is differentiated).
        x1: N1 samples, as for :func:`fastntk.ntk`.
        x2: N2 samples, or None for K(x1, x1).
        mode: "full" (N1, N2, O, O), "trace" (N1, N2), "diagonal" (N1, N2, O) or
            "trace_mean" (N1, N2), as for :func:`fastntk.ntk`.
        params: the parameters that count, as for :func:`fastntk.ntk`.
        dtype: the dtype of the brute force. float64 (default) is the reference; the
            model's own dtype shows how much its rounding alone moves the kernel.

    Returns:
        The kernel in ``dtype``, shaped as :func:`fastntk.ntk`'s.

    Raises:
        OptionError: an unknown mode.

    Example:
        >>> import torch, fastntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(4, 3)
        >>> k, ref = fastntk.ntk(net, x, mode="trace"), fastntk.reference_ntk(net, x, mode="trace")
        >>> bool(torch.allclose(k.double(), ref, rtol=1e-4, atol=1e-5))
        True
    """
    j1 = reference_jacobian(model, x1, params, dtype=dtype)
    j2 = j1 if x2 is None else reference_jacobian(model, x2, params, dtype=dtype)
    check_mode(mode)
    return reduce_full(torch.einsum("nap,mbp->nmab", j1, j2), mode)
