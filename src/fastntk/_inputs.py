"""Batched inputs: a tensor, or a tuple/list/dict of tensors, batched on dim 0.

A batch is handed to the model as ``model(x)`` for a tensor, ``model(*x)`` for a
tuple/list and ``model(**x)`` for a dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import torch
from ._torch_private import pytree

from ._errors import InputError, NonFiniteError

Batch = Union[torch.Tensor, tuple, list, Mapping[str, Any]]


@dataclass(frozen=True)
class BatchSpec:
    """What every batch given to one kernel must share: structure, per-sample shapes, dtypes."""

    treespec: pytree.TreeSpec
    sample_shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    devices: tuple[torch.device, ...]


def leaves(x: Batch) -> list[torch.Tensor]:
    """The tensors of a batch, in pytree order."""
    return pytree.tree_leaves(x)


def batch_size(x: Batch) -> int:
    """N, the common size of dim 0 of every tensor in the batch."""
    return leaves(x)[0].shape[0]


def describe(x: Batch, name: str) -> BatchSpec:
    """Validate a batch and return its spec.

    Raises:
        InputError: non-tensor leaves, 0-d tensors, differing or zero batch sizes.
    """
    flat, spec = pytree.tree_flatten(x)
    if not flat:
        raise InputError(f"{name} holds no tensor: pass a tensor batched on dim 0, or a tuple/dict of them")
    for i, leaf in enumerate(flat):
        if not isinstance(leaf, torch.Tensor):
            raise InputError(
                f"{name} contains a {type(leaf).__name__} (leaf {i}): every input must be a tensor "
                "batched on dim 0; bind constant arguments into the model instead (e.g. functools.partial "
                "or a wrapper nn.Module)"
            )
        if leaf.dim() == 0:
            raise InputError(f"{name} has a 0-d tensor (leaf {i}): inputs must be batched on dim 0, e.g. x[None]")
    sizes = {leaf.shape[0] for leaf in flat}
    if len(sizes) > 1:
        raise InputError(f"the tensors of {name} have different batch sizes {sorted(sizes)}: they must agree on dim 0")
    if 0 in sizes:
        raise InputError(f"{name} is an empty batch (0 samples): pass at least one sample")
    return BatchSpec(
        treespec=spec,
        sample_shapes=tuple(leaf.shape[1:] for leaf in flat),
        dtypes=tuple(leaf.dtype for leaf in flat),
        devices=tuple(leaf.device for leaf in flat),
    )


def check_compatible(spec1: BatchSpec, spec2: BatchSpec) -> None:
    """Raise InputError unless x1 and x2 share structure, per-sample shapes, dtypes and devices."""
    if spec1.treespec != spec2.treespec:
        raise InputError(f"x1 and x2 have different structures ({spec1.treespec} vs {spec2.treespec}): pass both the same way")
    for what in ("sample_shapes", "dtypes", "devices"):
        a, b = getattr(spec1, what), getattr(spec2, what)
        if a != b:
            label = what.replace("_", " ")
            raise InputError(
                f"x1 and x2 differ in {label}: {_fmt(a)} vs {_fmt(b)}; "
                "both must be batches of the same kind of sample (only dim 0 may differ)"
            )


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN or inf. A finite sum proves it in one cheap
    reduction (any NaN or inf makes the sum NaN or inf); only a sum that is not finite,
    by overflow or a bad entry, needs the entry-by-entry test."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(x: Batch, name: str, first: int = 0) -> None:
    """Raise NonFiniteError naming the first sample of ``x`` that holds NaN or inf (numbered
    from ``first``: where this batch starts in a larger data set)."""
    for i, leaf in enumerate(leaves(x)):
        if (leaf.is_floating_point() or leaf.is_complex()) and not all_finite(leaf):
            bad = ~torch.isfinite(leaf.reshape(leaf.shape[0], -1)).all(dim=1)
            n = first + int(bad.nonzero()[0])
            raise NonFiniteError(f"{name} (leaf {i}) contains NaN or inf, first in sample {n}: clean the inputs first")


def take(x: Batch, start: int, stop: int) -> Batch:
    """Samples ``start:stop`` of a batch."""
    return pytree.tree_map(lambda t: t[start:stop], x)


def concat(xs: list[Batch]) -> Batch:
    """Concatenate batches of the same structure along dim 0."""
    flats = [pytree.tree_flatten(x) for x in xs]
    spec = flats[0][1]
    return pytree.tree_unflatten([torch.cat(parts) for parts in zip(*(f for f, _ in flats))], spec)


def first_samples(x1: Batch, x2: Batch | None, k: int) -> Batch:
    """Up to k samples: the first of x1, topped up from x2 when x1 has fewer."""
    x = take(x1, 0, min(k, batch_size(x1)))
    if x2 is not None and batch_size(x) < k:
        x = concat([x, take(x2, 0, min(k - batch_size(x), batch_size(x2)))])
    return x


def map_leaves(fn: Callable[[torch.Tensor], torch.Tensor], x: Batch) -> Batch:
    """Apply ``fn`` to every tensor of a batch."""
    return pytree.tree_map(fn, x)


def call_model(model: Callable[..., Any], x: Batch) -> Any:
    """Call a model on a batch the way it expects it: f(x), f(*x) or f(**x)."""
    if isinstance(x, torch.Tensor):
        return model(x)
    if isinstance(x, Mapping):
        return model(**x)
    return model(*x)


def _fmt(values: tuple) -> str:
    return "(" + ", ".join(str(tuple(v)) if isinstance(v, torch.Size) else str(v) for v in values) + ")"
