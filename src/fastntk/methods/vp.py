"""Method "vp": NTK-vector products, the tutorial's method 2, without its Jacobian of x1.

The rows J(x2)[m, b] are computed by reverse mode (vector-Jacobian products); each is
then pushed through the model on the x1 block by forward mode (a Jacobian-vector
product), giving K[:, m, :, b]. Cost about N2·O·(N1 forward-mode passes); memory O·P
per sample of an x2 block, none for x1. trace and diagonal keep only the needed
entries of each product (memory N1·N2 and N1·N2·O instead of N1·N2·O²) but need the
same products: forward mode yields all outputs of x1 at once.

Forward mode must differentiate the same function reverse mode does: PyTorch's embedding
backward gives the padding row (``padding_idx``) no gradient from lookups, while its
forward-mode rule reads that row's tangent. The forward passes here hold the looked-up
padding rows constant (:class:`PaddingRowsHeld`), so the padding row's columns of J are
what autograd's are: only its other uses (e.g. a tied output projection) count.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.func import jvp, vmap
from torch.overrides import TorchFunctionMode

from .._errors import ModelError
from .._functional import Params
from .._inputs import Batch, batch_size, take
from .._process import FORWARD_AD, Shared, flag
from .base import KernelMethod
from .jacobian import jacobian_bytes, per_sample_jacobians
from .per_sample import or_on_composite_kernels


SAMPLE_EVALUATIONS = 2048
"""Forward-mode passes are vmapped over at most this many (tangent, sample) pairs at once,
which bounds the memory of their intermediate activations."""


class VPMethod(KernelMethod):
    """J(x2) by reverse mode, then K = J(x1)·J(x2)ᵀ by forward mode on x1."""

    name = "vp"
    symmetric_factors = False
    sides_with_factors = 1  # x1's blocks are their inputs: only x2's hold Jacobians

    def left(self, x: Batch) -> Batch:
        return x

    def unsupported(self, x: Batch) -> str | None:
        """Why forward mode cannot differentiate the model (an op without a forward-mode
        rule, e.g. weight_norm or EmbeddingBag), found by one pass on the first sample, run
        as :meth:`contract` runs it (on composite kernels where oneDNN's fused ones lack it)."""
        f, sample = self.f, take(x, 0, 1)
        with forward_mode_kernels():
            try:
                or_on_composite_kernels(lambda: jvp(lambda p: f(p, sample), (f.primals,), (f.primals,)))
            except NotImplementedError as exc:
                return f"forward-mode AD is missing for an operation of this model ({str(exc).splitlines()[0]})"
        return None

    def right(self, x: Batch) -> Params:
        return per_sample_jacobians(self.f, x)

    def contract(self, left: Batch, right: Params) -> torch.Tensor:
        f, primals = self.f, self.f.primals
        n2, o = next(iter(right.values())).shape[:2]
        tangents = {name: j.flatten(0, 1) for name, j in right.items()}  # (N2·O, *p)

        def push(tangent: Params) -> torch.Tensor:
            return jvp(lambda p: f(p, left), (primals,), (tangent,))[1]  # (N1, O)

        chunk = max(1, SAMPLE_EVALUATIONS // batch_size(left))
        with forward_mode_kernels():
            try:
                products = or_on_composite_kernels(lambda: vmap(push, chunk_size=chunk)(tangents))  # K[n, m, a, b] at [m·O + b, n, a]
            except NotImplementedError as exc:
                raise ModelError(
                    f"method='vp' needs forward-mode AD, which an operation of this model lacks ({str(exc).splitlines()[0]}); "
                    "use method='jacobian' or method='auto'"
                ) from exc
        products = products.reshape(n2, o, -1, o)  # [m, b, n, a]
        if self.mode == "full":
            return products.permute(2, 0, 3, 1)
        diagonal = torch.diagonal(products, dim1=1, dim2=3)  # [m, n, a=b]
        if self.mode == "diagonal":
            return diagonal.permute(1, 0, 2)
        return diagonal.sum(-1).T

    def bytes_per_sample(self) -> int:
        return jacobian_bytes(self.f, self.num_outputs)  # the x2 block's Jacobian rows


def fused_kernel_flags() -> list[Shared]:
    """The process-wide flags :func:`forward_mode_kernels` sets: the fused transformer fast
    path off, and of the attention kernels only the composite ("math") one on."""
    flags = []
    mha = getattr(torch.backends, "mha", None)
    if mha is not None and hasattr(mha, "set_fastpath_enabled"):
        flags.append(flag(mha.get_fastpath_enabled, mha.set_fastpath_enabled, False))
    for name, value in (("flash", False), ("mem_efficient", False), ("cudnn", False), ("math", True)):
        get, set_ = getattr(torch.backends.cuda, f"{name}_sdp_enabled", None), getattr(torch.backends.cuda, f"enable_{name}_sdp", None)
        if get is not None and set_ is not None:
            flags.append(flag(get, set_, value))
    return flags


FUSED_KERNEL_FLAGS = fused_kernel_flags()
"""Made once, with the module: every thread must share the same ones."""


@contextlib.contextmanager
def forward_mode_kernels() -> Iterator[None]:
    """Steer PyTorch away from fused inference kernels that have no forward-mode derivative.

    The fused TransformerEncoderLayer fast path and the flash/efficient attention kernels
    lack forward AD; the composite ("math") attention computes the same function with it.
    The flags are process-wide: set while any thread is inside, restored when the last leaves.
    So are forward-AD levels: one thread at a time is inside.
    """
    with FORWARD_AD, contextlib.ExitStack() as stack:
        for shared in FUSED_KERNEL_FLAGS:
            stack.enter_context(shared.scope())
        stack.enter_context(PaddingRowsHeld())
        yield


_EMBEDDING_SIGNATURES: dict[Callable[..., Any], inspect.Signature] = {
    F.embedding: inspect.signature(F.embedding),
    torch.embedding: inspect.Signature([  # aten's order; padding_idx -1 means none
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        for name, default in (("weight", inspect.Parameter.empty), ("input", inspect.Parameter.empty),
                              ("padding_idx", -1), ("scale_grad_by_freq", False), ("sparse", False))
    ]),
}


class PaddingRowsHeld(TorchFunctionMode):
    """Embedding lookups of the padding row carry no tangent, as they carry no gradient in
    reverse mode (the values are unchanged: only forward mode sees the difference)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        signature = _EMBEDDING_SIGNATURES.get(func)
        if signature is None:
            return out
        call = signature.bind(*args, **kwargs).arguments
        padding_idx, weight, indices = call.get("padding_idx", -1 if func is torch.embedding else None), call["weight"], call["input"]
        if padding_idx is None or (func is torch.embedding and padding_idx == -1):
            return out
        if padding_idx < 0:  # F.embedding counts a negative index from the end
            padding_idx += weight.shape[0]
        padded = (indices == padding_idx).unsqueeze(-1)
        return torch.where(padded, out.detach(), out)
