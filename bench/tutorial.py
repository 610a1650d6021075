"""The two methods of the PyTorch tutorial "Neural Tangent Kernels" (torch.func).

Written after the tutorial's code, kept faithful to it (same transforms,
same einsums, same vmap nesting), so that the benchmark measures what a user
copying the tutorial gets:

* method 1, ``empirical_ntk_jacobian_contraction``: per-sample Jacobians by
  ``vmap(jacrev(fnet_single))`` for x1 and x2, then one einsum per parameter
  tensor, stacked and summed;
* method 2, ``empirical_ntk_ntk_vps``: for each pair (x1_n, x2_m), a vjp of
  the x1 function, then a jvp of the x2 function for every column of the
  O x O identity, ``vmap(vmap(get_ntk))`` over the pairs.

Both take ``fnet_single(params, x)`` built by :func:`make_fnet_single` with
the model's parameters detached, as the tutorial does.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

Params = dict[str, torch.Tensor]
FnetSingle = Callable[[Params, torch.Tensor], torch.Tensor]

#: method-1 einsum for each mode (as in the tutorial)
_CONTRACTIONS = {
    "full": "Naf,Mbf->NMab",
    "trace": "Naf,Maf->NM",
    "diagonal": "Naf,Maf->NMa",
}


def make_fnet_single(model: nn.Module) -> tuple[FnetSingle, Params]:
    """The tutorial's ``fnet_single`` and detached parameter dict."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    return fnet_single, params


def empirical_ntk_jacobian_contraction(
    fnet_single: FnetSingle,
    params: Params,
    x1: torch.Tensor,
    x2: torch.Tensor,
    compute: str = "full",
) -> torch.Tensor:
    """Tutorial method 1: Jacobian contraction."""
    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]

    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]

    expr = _CONTRACTIONS[compute]
    result = torch.stack([torch.einsum(expr, j1, j2) for j1, j2 in zip(jac1, jac2)])
    return result.sum(0)


def empirical_ntk_ntk_vps(
    func: FnetSingle,
    params: Params,
    x1: torch.Tensor,
    x2: torch.Tensor,
    compute: str = "full",
) -> torch.Tensor:
    """Tutorial method 2: NTK-vector products."""

    def get_ntk(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        def func_x1(params: Params) -> torch.Tensor:
            return func(params, x1)

        def func_x2(params: Params) -> torch.Tensor:
            return func(params, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec: torch.Tensor) -> torch.Tensor:
            vjps = vjp_fn(vec)
            _, jvps = jvp(func_x2, (params,), vjps)
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device)
        basis = basis.view(output.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    result = vmap(vmap(get_ntk, (None, 0)), (0, None))(x1, x2)

    if compute == "full":
        return result
    # Some published versions of the tutorial write
    # ``torch.einsum('NMKK->NM')`` here, without the operand, which raises.
    # The evident intent, implemented here, is the trace (sum over outputs)
    # and the diagonal of each full O x O block.
    if compute == "trace":
        return torch.einsum("NMKK->NM", result)
    if compute == "diagonal":
        return torch.einsum("NMKK->NMK", result)
    raise ValueError(f"unknown compute {compute!r}")


METHODS = {
    "tutorial-jac": empirical_ntk_jacobian_contraction,
    "tutorial-vp": empirical_ntk_ntk_vps,
}


def tutorial_ntk_fn(
    model: nn.Module, method: str, mode: str
) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """A callable ``(x1, x2=None) -> K`` running one tutorial method.

    The tutorial has no Gram shortcut: x2=None is passed as x2=x1.
    """
    fnet_single, params = make_fnet_single(model)
    impl = METHODS[method]

    def ntk(x1: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
        return impl(fnet_single, params, x1, x1 if x2 is None else x2, mode)

    return ntk
