"""Refusals: models whose per-sample NTK is not defined as asked."""

from __future__ import annotations

import torch
from torch import nn

from . import _torch_private
from ._errors import ModelError
from ._functional import FunctionalModel
from ._inputs import Batch, batch_size, first_samples, leaves, map_leaves, take

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_BATCH_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
)
"""PyTorch's batch norms (the public classes; another module normalising over the batch is
found by :func:`check_per_sample`'s probe instead)."""


def check_training_mode(model: nn.Module) -> None:
    """Refuse modules that couple samples or draw random numbers in training mode.

    Raises:
        ModelError: naming the first BatchNorm in training mode or active dropout.
    """
    for name, module in model.named_modules():
        if not module.training and not isinstance(module, _BATCH_NORMS):
            continue
        label = f"{type(module).__name__} {name or '(the model)'!r}"
        if isinstance(module, _BATCH_NORMS) and not module.track_running_stats:
            raise ModelError(
                f"{label} has track_running_stats=False: it normalises with the statistics of the batch in every "
                "mode, so one sample's output depends on the others; construct it with track_running_stats=True "
                "(and call model.eval()), or use LayerNorm/GroupNorm"
            )
        if isinstance(module, _BATCH_NORMS) and module.training:
            raise ModelError(
                f"{label} is in training mode: its output for one sample depends on the other samples of the "
                "batch, so the per-sample NTK is not defined; call model.eval() (uses the running statistics), "
                "or put just the norm layers in eval mode"
            )
        p = getattr(module, "p", 0.0) if isinstance(module, _DROPOUT) else getattr(module, "dropout", 0.0)
        if isinstance(module, (*_DROPOUT, nn.MultiheadAttention)) and isinstance(p, float) and p > 0:
            raise ModelError(
                f"{label} (p={p}) is active in training mode: the model is random, so its NTK is not defined; "
                "call model.eval(), or set its probability to 0"
            )


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for outputs that should agree up to rounding: sqrt(eps) of ``dtype``."""
    return torch.finfo(dtype).eps ** 0.5


def check_per_sample(f: FunctionalModel, x1: Batch, x2: Batch | None, probe: int = 3) -> tuple[int, int]:
    """Probe the model on a few samples; return O, the number of outputs per sample, and how many were probed.

    The model must be deterministic and give each sample the output it gives it alone.

    Raises:
        ModelError: the model fails, writes to its inputs, is random, or mixes samples of a batch.
    """
    original = first_samples(x1, x2, probe)
    x = map_leaves(torch.clone, original)  # a copy: the model may write to it
    n = batch_size(x)
    with torch.no_grad(), torch.random.fork_rng(devices=[f.device] if f.device.type == "cuda" else []):
        try:
            together = f(f.primals, x)
            check_inputs_unchanged(x, original)
            again = f(f.primals, x)
            alone = torch.cat([f(f.primals, take(x, i, i + 1)) for i in range(n)])
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(
                f"the model failed on the inputs ({type(exc).__name__}: {exc}); check that x1/x2 have the shapes "
                "and structure the model expects, batched on dim 0 (a single sample needs x[None])"
            ) from exc
    scale = together.abs().max().item() + torch.finfo(f.dtype).tiny
    tol = tolerance(f.dtype) * scale
    if (together - again).abs().max().item() > tol:
        raise ModelError(
            "the model gives different outputs for the same inputs: it draws random numbers (dropout or "
            "similar), so its NTK is not defined; call model.eval() or remove the randomness"
        )
    if n > 1 and (together - alone).abs().max().item() > tol:
        raise ModelError(
            "the model's output for one sample depends on the other samples of the batch (batch statistics, "
            "a norm over dim 0 or the like), so the per-sample NTK is not defined; put such layers in eval "
            "mode (model.eval()) or make them per-sample"
        )
    return together.shape[1], n


def check_inputs_unchanged(x: Batch, original: Batch) -> None:
    """Raise ModelError if the model wrote to the tensors of the batch x it was just called on,
    a fresh copy of ``original`` (their version counters moved; without version counters, their
    values differ from the original's): every method calls it many times on the same inputs,
    and they are the caller's tensors (the probe runs on a copy, so those are left as they were)."""
    for i, (leaf, before) in enumerate(zip(leaves(x), leaves(original))):
        written = _torch_private.version(leaf)
        if written is None:
            written = not _same(leaf, before)
        if written:
            raise ModelError(
                f"the model modifies its input in place (leaf {i}; e.g. x.mul_(2), x += 1 or x[...] = v in forward): "
                "fastntk calls the model many times on the caller's tensors, which would be changed and give each call "
                "other inputs; write that operation out of place (x = x * 2) or copy the input first (x = x.clone())"
            )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b hold the same values (NaNs where the other has NaNs)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) or (a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all()))
