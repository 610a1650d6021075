"""The linearisation of a model around its parameters θ0, as a trainable ``nn.Module``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp

from ._torch_private import pytree
from .methods.vp import forward_mode_kernels


class Linearized(nn.Module):
    """f_lin(θ, x) = f(θ0, x) + J(θ0, x)(θ − θ0), with θ the parameters of ``self.module`` (a copy
    of the model, starting at θ0) and θ0 kept as buffers. The Jacobian-vector product runs in
    forward mode (``torch.func.jvp``); gradients with respect to θ flow through it, so any
    optimiser trains it like the model itself. Buffers (e.g. BatchNorm statistics) and
    train/eval mode are the copy's.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        self._names = [name for name, p in self.module.named_parameters() if p.requires_grad]
        for i, name in enumerate(self._names):
            self.register_buffer(f"initial_{i}", self.module.get_parameter(name).detach().clone())

    def initial(self) -> dict[str, torch.Tensor]:
        """θ0, by parameter name."""
        return {name: getattr(self, f"initial_{i}") for i, name in enumerate(self._names)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        theta0 = self.initial()
        delta = {name: self.module.get_parameter(name) - value for name, value in theta0.items()}

        def f(params: dict[str, torch.Tensor]) -> Any:
            return functional_call(self.module, params, args, kwargs)

        with forward_mode_kernels():  # composite kernels where fused ones lack forward mode, as the vp method's
            value, tangent = jvp(f, (theta0,), (delta,))
        if isinstance(value, torch.Tensor):
            return value + tangent
        values, spec = pytree.tree_flatten(value)
        return pytree.tree_unflatten([v + t for v, t in zip(values, pytree.tree_leaves(tangent))], spec)


def linearize(model: nn.Module) -> Linearized:
    """The first-order Taylor expansion of ``model`` around its current parameters, as a module
    whose parameters start there (the model itself is not changed).

    Example:
        >>> import torch, fastntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> lin = fastntk.linearize(net)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(lin(x), net(x))
        True
    """
    return Linearized(model)
