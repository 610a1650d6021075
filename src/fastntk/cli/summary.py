"""What the commands print about a run: the model's size, the shapes of its inputs, peak memory, a spectrum."""

from __future__ import annotations

import sys
from typing import Any, Mapping

import torch
from torch import nn

from ..analysis import Summary


def count_parameters(model: nn.Module) -> int:
    """P: scalar parameters with requires_grad, tied weights counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe_batch(x: Any) -> str:
    """Shapes and dtypes of a batch, e.g. '(20, 3, 32, 32) float32'."""

    def one(t: torch.Tensor) -> str:
        return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"

    if isinstance(x, torch.Tensor):
        return one(x)
    if isinstance(x, Mapping):
        return "dict {" + ", ".join(f"{k}: {one(v)}" for k, v in x.items()) + "}"
    return f"{type(x).__name__} (" + ", ".join(one(v) for v in x) + ")"


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process in MiB (ru_maxrss), or None where unavailable."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def print_spectrum(s: Summary) -> None:
    """The spectrum lines of ``fastntk compute`` and ``fastntk report``, from :func:`fastntk.analysis.summary`."""
    values = s.eigenvalues
    print(f"spectrum  largest eigenvalue {float(values[0]):.6g}, smallest {float(values[-1]):.6g} (float64 eigvalsh)")
    print(f"          condition number {s.condition_number:.6g}")
    print(f"          effective rank {s.effective_rank:.4g} (entropy, Roy & Vetterli 2007), participation ratio "
          f"{s.participation_ratio:.4g} (between 1 and {values.numel()})")
