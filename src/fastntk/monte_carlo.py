"""Monte-Carlo averages of a kernel over seeded initialisations of a model."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ._errors import InputError, OptionError
from ._options import is_positive_int


@dataclass(frozen=True)
class MonteCarloKernel:
    """The mean of a kernel over S seeded draws of a model, and its standard error.

    Attributes:
        mean: the average kernel, float64, in the kernel function's shape.
        standard_error: the standard error of each entry of ``mean``, sqrt(s² / S) with s² the
            unbiased sample variance over draws (float64, same shape); NaN for S = 1.
        samples: S, the number of draws.
    """

    mean: torch.Tensor
    standard_error: torch.Tensor
    samples: int


def monte_carlo(
    kernel: Callable[..., torch.Tensor],
    model_factory: Callable[[], nn.Module],
    x1: Any,
    x2: Any = None,
    *,
    samples: int = 8,
    seed: int = 0,
    **kernel_options: Any,
) -> MonteCarloKernel:
    r"""E_θ[K_θ(x1, x2)] over random initialisations, estimated from ``samples`` draws: draw i
    builds ``model_factory()`` with torch's generator seeded ``seed + i`` and computes
    ``kernel(model, x1, x2, **kernel_options)`` (still under that seed). The mean and the variance run in float64
    (Welford's update), so memory holds two kernels besides the current one, whatever S.

    The caller's random state is left as it was: every draw runs inside
    ``torch.random.fork_rng`` (CPU and CUDA generators restored after).

    Args:
        kernel: :func:`fastntk.ntk`, :func:`fastntk.nngp`, or any callable
            ``(model, x1, x2, **kernel_options) -> tensor`` giving the same shape for every draw.
        model_factory: builds a fresh model on each call (its initialisation draws from torch's
            global generator, which is seeded per draw).
        x1: the first inputs, passed to ``kernel`` as they are.
        x2: the second inputs, or None (passed on as None: the Gram matrix of x1).
        samples: S >= 1, the number of draws.
        seed: the first draw's seed; draw i uses ``seed + i``.
        **kernel_options: passed to ``kernel`` (e.g. ``mode="trace"``, ``layer="1"``).

    Returns:
        A :class:`MonteCarloKernel` with the float64 mean, its standard error and S.

    Raises:
        OptionError: ``samples`` or ``seed`` not a whole number of the right sign, or ``kernel``
            / ``model_factory`` not callable.
        InputError: the factory returns something other than an ``nn.Module``, or two draws'
            kernels differ in shape.

    Example:
        >>> import torch, fastntk
        >>> factory = lambda: torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        >>> mc = fastntk.monte_carlo(fastntk.nngp, factory, torch.randn(4, 3), samples=4, mode="trace")
        >>> mc.mean.shape, mc.standard_error.shape, mc.samples
        (torch.Size([4, 4]), torch.Size([4, 4]), 4)
    """
    if not callable(kernel) or not callable(model_factory):
        raise OptionError("kernel and model_factory must be callables: e.g. monte_carlo(fastntk.ntk, lambda: MyNet(), x)")
    if not is_positive_int(samples):
        raise OptionError(f"samples={samples!r}: pass a positive number of draws")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise OptionError(f"seed={seed!r}: pass a non-negative integer")
    mean: torch.Tensor | None = None
    squares: torch.Tensor | None = None  # Σ (K_i − mean)², Welford's M2
    for i in range(samples):
        with torch.random.fork_rng():  # the draw, and anything random in the kernel, seeded
            torch.manual_seed(int(seed) + i)
            model = model_factory()
            if not isinstance(model, nn.Module):
                raise InputError(f"model_factory returned {type(model).__name__}: it must build and return a torch.nn.Module")
            value = kernel(model, x1, x2, **kernel_options).detach().to(torch.float64)
        if mean is None or squares is None:
            mean, squares = value.clone(), torch.zeros_like(value)
            continue
        if value.shape != mean.shape:
            raise InputError(f"draw {i} gave a kernel of shape {tuple(value.shape)}, the first {tuple(mean.shape)}: every draw must give the same shape")
        step = value - mean
        mean += step / (i + 1)
        squares += step * (value - mean)
    assert mean is not None and squares is not None
    if samples == 1:
        error = torch.full_like(mean, float("nan"))
    else:
        error = (squares / (samples - 1) / samples).sqrt()
    return MonteCarloKernel(mean, error, int(samples))
