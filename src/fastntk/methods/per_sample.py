"""Per-sample Jacobians of models vmap cannot batch over samples, by one pass per sample.

torch.func.vmap fails on models with recurrent layers (nn.RNN/GRU write their hidden state in
place; nn.LSTM's fused kernel keeps no workspace under no_grad), with ``.item()`` or Python
control flow on tensor values (Hugging Face attention masks), or with in-place updates of
batched state. The methods' per-sample Jacobians then come from :func:`looped_jacobians`: a
forward pass per sample and reverse passes over its outputs (vmapped over the outputs where
the backward allows, else one by one); same FLOPs as vmap(jacrev), but N·(1 + O) passes of
one sample each. :func:`vmapped_or_looped` learns it from the first failure (once per kind
of input for ``ntk_fn``); ``method="auto"`` asks :func:`vmap_failure` first, to cost the loop.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch.func import vmap

from .._functional import FunctionalModel, Params
from .._inputs import Batch, batch_size, take
from .._process import flag, quiet_fallbacks

T = TypeVar("T")

PASS_OVERHEAD_FLOPS = 2e6
"""What one pass of one sample costs beyond its FLOPs (Python, dispatch, small kernels),
in FLOPs: the cost model charges each of the loop's N·(1 + O) passes this much."""


def vmap_failure(f: FunctionalModel, x: Batch) -> str | None:
    """Why vmap cannot batch f over the samples of x (None: it can).

    Runs the forward pass vmapped over the samples of x, under no_grad as the kernel runs:
    that is where vmap refuses recurrent layers (no batching rule), ``.item()``, control
    flow on values and in-place writes of batched values into unbatched tensors, whatever
    the batch size (one sample is enough). The reverse pass is not tried: ``torch.func``'s
    would import ``torch._dynamo`` (a noticeable start-up cost) in every process that costs the
    methods; a model whose backward alone cannot be vmapped is found by
    :func:`vmapped_or_looped` on its first block instead. The model already ran on x
    unbatched, so any failure here is vmap's.
    """
    def one(xn: Batch) -> torch.Tensor:
        return f.single(f.primals, xn)

    try:
        with torch.no_grad(), quiet_fallbacks():  # vmap's "performance drop" notes: only whether it fails matters here
            vmap(one)(x)
    except Exception as exc:  # noqa: BLE001 - any error under vmap means: not batchable
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def vmapped_or_looped(f: FunctionalModel, x: Batch, vmapped: Callable[[], Params]) -> Params:
    """The per-sample Jacobians ``vmapped()`` computes, or, should vmap fail on this model,
    :func:`looped_jacobians` (and ``f.batchable`` set False, so later blocks loop at once).

    The model already ran on these inputs unbatched (the per-sample probe), so a failure
    under vmap is vmap's; running out of memory is not a reason to loop, and is raised.
    """
    if f.batchable:
        try:
            return vmapped()
        except torch.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001 - see vmap_failure for what fails
            f.batchable = False
    return looped_jacobians(f, x)


def looped_jacobians(f: FunctionalModel, x: Batch) -> Params:
    """∂f(θ, x_n)/∂θ for every sample, without vmap over samples: a dict name -> (N, O, *parameter shape).

    Each sample gets its own forward pass (a batch of one) and a reverse pass per output,
    vmapped over its outputs while the model's backward allows (learnt on the first sample).
    """
    primals = {name: p.detach().requires_grad_() for name, p in f.primals.items()}
    tensors = list(primals.values())
    n = batch_size(x)
    rows: Params = {}
    batched = True

    def store(i: int, a: int | slice, grads: tuple[torch.Tensor | None, ...]) -> None:
        for row, g in zip(rows.values(), grads):
            if g is not None:  # None: these outputs do not reach the parameter (its rows stay 0)
                row[i, a] = g

    for i in range(n):
        with torch.enable_grad():  # callers may run under no_grad; indexing the outputs must keep their graph too
            out = f(primals, take(x, i, i + 1))[0]  # (O,)
            o = out.shape[0]
            if not rows:
                rows = {name: torch.zeros((n, o, *p.shape), dtype=out.dtype, device=out.device) for name, p in primals.items()}
            if batched and o > 1:
                basis = torch.eye(o, dtype=out.dtype, device=out.device)
                try:  # the graph is kept should this fail part way, for the passes one by one
                    store(i, slice(None), torch.autograd.grad(out, tensors, basis, retain_graph=True, is_grads_batched=True, allow_unused=True))
                    continue
                except RuntimeError:  # a backward op that cannot be vmapped over outputs: one by one from now on
                    batched = False
            for a in range(o):
                store(i, a, torch.autograd.grad(out[a], tensors, retain_graph=a + 1 < o, allow_unused=True))
    return rows


def loop_overhead(samples: float, num_outputs: int) -> float:
    """FLOPs the cost model adds for :func:`looped_jacobians` on ``samples`` samples (its passes' overhead)."""
    return samples * (1 + num_outputs) * PASS_OVERHEAD_FLOPS


ONEDNN_OFF = flag(lambda: torch.backends.mkldnn.enabled, lambda value: setattr(torch.backends.mkldnn, "enabled", value), False)
"""oneDNN switched off while any thread needs PyTorch's composite kernels (a process-wide flag)."""


def or_on_composite_kernels(run: Callable[[], T]) -> T:
    """``run()`` (forward-mode passes); should an op lack a forward-mode derivative, ``run()``
    again with recurrent layers on PyTorch's composite kernels instead of oneDNN's fused ones,
    which lack it (nn.LSTM on CPU). oneDNN's setting is restored after."""
    try:
        return run()
    except NotImplementedError:
        with ONEDNN_OFF.scope():
            return run()
